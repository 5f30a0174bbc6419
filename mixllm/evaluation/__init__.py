"""How good a router is: baselines, AIQ and λ sweeps, bootstrap intervals, λ calibrated to a budget,
replays of a log as a live stream, off-policy estimators, drift statistics and the savings summary.

Pure functions over frames and arrays; imports `mixllm.core` and `mixllm.config` only.
"""

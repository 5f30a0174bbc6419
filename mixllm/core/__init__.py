"""The router and its parts: a pure library in scikit-learn style (no I/O beyond the router's own
save format, no servers).

The query encoder and its backends, tags and domains, features, the Bayesian quality heads and cost
models, the decision rule, `MixLLMRouter` (fit, route, learn online, change the pool), the check of
what callers send, the budget pacer, and the shared types and errors. Imports only `mixllm.config`.
"""

"""Prefect flows: thin wiring of mixllm.pipeline steps into tasks, plus their scheduled deployments."""

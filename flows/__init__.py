"""Prefect flows: thin wiring of the training stages (mixllm.training.STAGES) and the continual steps (mixllm.continual) into tasks, plus their scheduled deployments."""

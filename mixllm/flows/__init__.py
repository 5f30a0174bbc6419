"""Prefect flows: thin wiring of the training stages (mixllm.jobs.training.STAGES) and the continual steps (mixllm.jobs.continual) into tasks, plus their scheduled deployments."""

"""The `continual` flow: the paper's continual learning as a scheduled job.

Feedback logged since the watermark -> pool changes from params.yaml + partial_fit of the
champion (each row updates only the LLM it is about) -> evaluate -> register through the gate ->
advance the watermark -> check drift, and retrain (the training job) when the traffic has moved.
The watermark moves only after registering, so a failed run re-reads the same feedback next time
and no feedback is counted twice.

The steps and their order live in one place, mixllm.jobs.continual.run_continual; this flow hands it a
step runner that runs each step (mixllm.jobs.continual.CONTINUAL_STEPS) as a Prefect task of the same name.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from mixllm.flows.common import config_for, library_logs_to_prefect
from mixllm.jobs import continual as job


def run_as_task(step: job.ContinualStep, config: Any, *args: Any) -> Any:
    """Run one step as a Prefect task named after it (the step's own retries; nothing cached)."""
    step_task = task(step.run, name=step.description, retries=step.retries,
                     retry_delay_seconds=5 if step.retries else 0, cache_policy=NO_CACHE)
    return step_task(config, *args)


@flow(name="continual")
def continual(params_path: str | None = None) -> dict[str, Any]:
    """Learn from new feedback; registers a version only when there is feedback to learn from."""
    library_logs_to_prefect()  # run_continual logs what it learned and registered
    return job.run_continual(config_for(params_path), run_step=run_as_task).to_dict()


if __name__ == "__main__":  # pragma: no cover
    continual()

"""The `continual` flow: the paper's continual learning as a scheduled job.

Feedback logged since the watermark -> pool changes from params.yaml + partial_fit of the
champion (each row updates only the LLM it is about) -> evaluate -> register through the gate ->
advance the watermark -> check drift, and retrain (the training job) when the traffic has moved. The watermark moves only in the last task, so a failed run re-reads the
same feedback next time and no feedback is counted twice.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.common import config_for, library_logs_to_prefect
from mixllm import continual as job


@task(name="read feedback past the watermark", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def read_feedback(params_path: str | None) -> tuple[Any, int]:
    config = config_for(params_path)
    job.recover_watermark(config)
    return job.read_new_feedback(config)


@task(name="update the champion (pool changes + partial_fit)", cache_policy=NO_CACHE)
def update(params_path: str | None, rows: Any) -> tuple[str, int, list[str]]:
    router_dir, version, changes = job.update_champion(config_for(params_path), rows)
    return str(router_dir), version, changes


# No retries: a retry after the version was created would register it twice. A failed
# registration changes neither the champion nor the watermark; the next run repeats it.
@task(name="validate and register through the gate", cache_policy=NO_CACHE)
def register(params_path: str | None, router_dir: str, champion_version: int, rows: Any, before: int) -> dict[str, Any]:
    from pathlib import Path

    registration = job.register_update(config_for(params_path), Path(router_dir), champion_version, rows, before)
    return registration.to_dict()


@task(name="advance the watermark", cache_policy=NO_CACHE)
def advance(params_path: str | None, value: int, _after: Any = None) -> int:
    job.advance_watermark(config_for(params_path), value)
    return value


@task(name="compact the decision log", cache_policy=NO_CACHE)
def compact(params_path: str | None, _after: Any = None) -> dict[str, int]:
    return job.compact_decisions(config_for(params_path))


@task(name="check drift and retrain on it", cache_policy=NO_CACHE)
def drift(params_path: str | None, _after: Any = None) -> dict[str, Any]:
    from mixllm.monitoring import watch_drift

    return watch_drift(config_for(params_path))


@flow(name="continual")
def continual(params_path: str | None = None) -> dict[str, Any]:
    """Learn from new feedback; registers a version only when there is feedback to learn from."""
    library_logs_to_prefect()
    logger = get_run_logger()
    config = config_for(params_path)
    rows, before = read_feedback(params_path)
    if len(rows) < config.pipeline.min_feedback_rows:
        logger.info("%d new feedback rows past watermark %d: nothing to learn, nothing registered", len(rows), before)
        compact(params_path)
        return {"feedback_rows": len(rows), "watermark": before, "registration": None, "drift": drift(params_path)}
    router_dir, champion_version, changes = update(params_path, rows)
    registration = register(params_path, router_dir, champion_version, rows, before)
    after = advance(params_path, int(rows["feedback_id"].max()), registration)
    compact(params_path, after)
    logger.info("learned from %d feedback rows (watermark %d -> %d); pool changes: %s; version %s: %s",
                len(rows), before, after, ", ".join(changes) or "none", registration["version"],
                registration["verdict"])
    return {"feedback_rows": len(rows), "watermark": after, "pool_changes": changes, "registration": registration,
            "drift": drift(params_path, after)}


if __name__ == "__main__":  # pragma: no cover
    continual()

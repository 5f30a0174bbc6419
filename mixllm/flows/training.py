"""The `training` flow: ingest -> split -> tags -> encoder -> predictors -> replay -> evaluate (with
the baselines in parallel) -> compare with the champion -> log and register -> promote through the gate.

The cached stages are tasks made from the stage table (mixllm.jobs.training.STAGES), one per stage, each
cached by the stage's key (mixllm.jobs.training.stage_keys: exactly its data and settings), so a re-run
with unchanged data and params re-embeds and re-fine-tunes nothing. Evaluation is split into one
task for MixLLM and one per baseline so the task runner can run them in parallel.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from mixllm.flows.common import config_for, library_logs_to_prefect, task_runner
from mixllm.io.data import ingest_pending
from mixllm.io.workspace import Workspace, load_split
from mixllm.jobs import training as job
from mixllm.jobs.continual import stage_replay
from mixllm.jobs.report import EvaluationReport, evaluate_router, finish_report, measure_baseline


def _stage_cache_key(stage: str):
    """Cache key = the stage's key (mixllm.jobs.training.stage_keys): same data and params, same key."""

    def key(context: Any, parameters: dict[str, Any]) -> str:
        config = config_for(parameters.get("params_path"))
        return f"mixllm-{stage}-{job.stage_keys(config)[stage]}"

    return key


def _stage_task(stage: job.Stage) -> Any:
    def stage_task(params_path: str | None, _after: Any = None) -> str:
        return str(job.run_stage(config_for(params_path), stage.name))

    stage_task.__name__ = f"stage_{stage.name}"
    return task(name=stage.description, cache_key_fn=_stage_cache_key(stage.name), persist_result=True)(stage_task)


# The stages that make router/; evaluation follows below (MixLLM and each baseline in parallel).
STAGE_TASKS = {name: _stage_task(job.STAGE[name]) for name in ("split", *job.ROUTER_STAGES)}


def _cached(stage: str, params_path: str | None) -> Any:
    """The stage's task as is, or forced to run when its output was deleted (a cache hit would point at nothing)."""
    stage_task = STAGE_TASKS[stage]
    present = job.stage_output(Workspace.of(config_for(params_path)), stage).exists()
    return stage_task if present else stage_task.with_options(refresh_cache=True)


@task(name="ingest new interaction logs", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def ingest(params_path: str | None) -> list[dict[str, Any]]:
    reports = ingest_pending(config_for(params_path))
    logger = get_run_logger()
    for report in reports:
        logger.info(report.summary())
    return [r.to_dict() for r in reports]


@task(name="replay feedback already learned", cache_policy=NO_CACHE)
def replay(params_path: str | None, _after: Any = None) -> tuple[str, dict[str, str]]:
    router_dir, replayed = stage_replay(config_for(params_path))
    return str(router_dir), replayed.tags()


@task(name="evaluate on the holdout", cache_policy=NO_CACHE)
def evaluate_mixllm(params_path: str | None, router_dir: str) -> EvaluationReport:
    config = config_for(params_path)
    from pathlib import Path

    from mixllm.core.router import MixLLMRouter

    router = MixLLMRouter.load(Path(router_dir), progress=False)
    router.cache_dir = Workspace.of(config).cache
    return evaluate_router(config, router, load_split(config), baselines=[])


@task(name="measure a baseline", cache_policy=NO_CACHE)
def evaluate_baseline(params_path: str | None, name: str, _after: Any = None) -> Any:
    config = config_for(params_path)
    from mixllm.core.router import MixLLMRouter

    # The router's own encoder (its chosen backend), as `mixllm train` measures the baselines.
    router = MixLLMRouter.load(Workspace.of(config).router, progress=False)
    return measure_baseline(config, name, load_split(config), router.enabled_llms_, router.encoder_)


# No retries: a retry after the version was created would register it twice. A failed
# registration changes neither the champion nor the watermark; the next run repeats it.
@task(name="compare with the champion, log and register", cache_policy=NO_CACHE)
def register(params_path: str | None, report: EvaluationReport, router_dir: str,
             tags: dict[str, str]) -> dict[str, Any]:
    from pathlib import Path

    config = config_for(params_path)
    return job.register_training_run(config, Path(router_dir), report, load_split(config), tags).to_dict()


@flow(name="training")
def training(params_path: str | None = None, register_model: bool = True) -> dict[str, Any]:
    """Retrain the router from the training store and register it; promoted only through the gate."""
    library_logs_to_prefect()
    logger = get_run_logger()
    config = config_for(params_path)
    ingested = ingest(params_path)
    done: Any = ingested
    for stage in ("split", *job.ROUTER_STAGES):
        done = _cached(stage, params_path)(params_path, done)
    router_done = done
    router_dir, replay_tags = replay(params_path, router_done)
    report = evaluate_mixllm.submit(params_path, router_dir)
    # The baselines are independent of each other: the task runner runs them in parallel.
    baseline_curves = evaluate_baseline.map(params_path, list(config.evaluation.baselines), router_done)
    report = finish_report(config, report.result(), [future.result() for future in baseline_curves])
    logger.info("MixLLM on the holdout: %s", report.headline())
    result: dict[str, Any] = {"headline": report.headline(), "metrics": report.metrics}
    if register_model:
        registration = register(params_path, report, router_dir, replay_tags)
        logger.info("registered version %s: %s", registration["version"], registration["verdict"])
        result["registration"] = registration
    return result


def run(params_path: str | None = None, register_model: bool = True) -> dict[str, Any]:
    """Run the flow on the task runner chosen in params.yaml (pipeline.task_runner)."""
    config = config_for(params_path)
    return training.with_options(task_runner=task_runner(config))(params_path=params_path, register_model=register_model)


if __name__ == "__main__":  # pragma: no cover
    run()

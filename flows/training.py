"""The `training` flow: ingest -> split -> tags -> encoder -> predictors -> evaluate (with baselines)
-> compare with the champion -> log and register -> promote through the gate.

Each step is a mixllm.pipeline function; tasks add names, retries and caching. The expensive
tasks are cached by a key built from exactly their inputs (mixllm.pipeline.stage_keys), so a
re-run with unchanged data and params re-embeds and re-fine-tunes nothing.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.common import config_for, library_logs_to_prefect, task_runner
from mixllm import pipeline
from mixllm.data import ingest_pending


def _stage_cache_key(stage: str):
    """Cache key = the stage's input key (mixllm.pipeline.stage_keys): same data and params, same key."""

    def key(context: Any, parameters: dict[str, Any]) -> str:
        config = config_for(parameters.get("params_path"))
        return f"mixllm-{stage}-{pipeline.stage_keys(config)[stage]}"

    return key


def _cached(stage_task: Any, stage: str, params_path: str | None) -> Any:
    """The task as is, or forced to run when its output was deleted (a cache hit would point at nothing)."""
    outputs = pipeline._stage_outputs(pipeline.Workspace.of(config_for(params_path)))
    return stage_task if outputs[stage].exists() else stage_task.with_options(refresh_cache=True)


@task(name="ingest new interaction logs", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def ingest(params_path: str | None) -> list[dict[str, Any]]:
    reports = ingest_pending(config_for(params_path))
    logger = get_run_logger()
    for report in reports:
        logger.info(report.summary())
    return [r.to_dict() for r in reports]


@task(name="split by query", cache_key_fn=_stage_cache_key("split"), persist_result=True)
def split(params_path: str | None, _after: Any = None) -> str:
    return str(pipeline.stage_split(config_for(params_path)))


@task(name="find the query domains", cache_key_fn=_stage_cache_key("tags"), persist_result=True)
def tags(params_path: str | None, _after: Any = None) -> str:
    return str(pipeline.stage_tags(config_for(params_path)))


@task(name="fine-tune the encoder", cache_key_fn=_stage_cache_key("encoder"), persist_result=True)
def encoder(params_path: str | None, _after: Any = None) -> str:
    return str(pipeline.stage_encoder(config_for(params_path)))


@task(name="fit quality and cost predictors", cache_key_fn=_stage_cache_key("predictors"), persist_result=True)
def predictors(params_path: str | None, _after: Any = None) -> str:
    return str(pipeline.stage_predictors(config_for(params_path)))


@task(name="replay feedback already learned", cache_policy=NO_CACHE)
def replay(params_path: str | None, _after: Any = None) -> tuple[str, dict[str, str]]:
    router_dir, replayed = pipeline.stage_replay(config_for(params_path))
    return str(router_dir), replayed.tags()


@task(name="evaluate on the holdout", cache_policy=NO_CACHE)
def evaluate_mixllm(params_path: str | None, router_dir: str) -> pipeline.EvaluationReport:
    config = config_for(params_path)
    from pathlib import Path

    from mixllm.router import MixLLMRouter

    workspace = pipeline.Workspace.of(config)
    router = MixLLMRouter.load(Path(router_dir), progress=False)
    router.cache_dir = workspace.cache
    return pipeline.evaluate_router(config, router, pipeline.load_split(config), baselines=[])


@task(name="measure a baseline", cache_policy=NO_CACHE)
def evaluate_baseline(params_path: str | None, name: str, _after: Any = None) -> Any:
    config = config_for(params_path)
    from mixllm.embeddings import QueryEncoder
    from mixllm.router import MixLLMRouter

    workspace = pipeline.Workspace.of(config)
    llms = MixLLMRouter.load(workspace.router, progress=False).enabled_llms_
    return pipeline.measure_baseline(config, name, pipeline.load_split(config), llms, QueryEncoder.load(workspace.encoder))


# No retries: a retry after the version was created would register it twice. A failed
# registration changes neither the champion nor the watermark; the next run repeats it.
@task(name="compare with the champion, log and register", cache_policy=NO_CACHE)
def register(params_path: str | None, report: pipeline.EvaluationReport, router_dir: str,
             tags: dict[str, str]) -> dict[str, Any]:
    from pathlib import Path

    config = config_for(params_path)
    workspace = pipeline.Workspace.of(config)
    registration = pipeline.register_candidate(
        config, Path(router_dir), report, pipeline.load_split(config), run_name="training", extra_tags=tags,
        artifacts=[workspace.plot, workspace.table, workspace.curve, workspace.tags, workspace.metrics],
    )
    return registration.to_dict()


@flow(name="training")
def training(params_path: str | None = None, register_model: bool = True) -> dict[str, Any]:
    """Retrain the router from the interaction store and register it; promoted only through the gate."""
    library_logs_to_prefect()
    logger = get_run_logger()
    config = config_for(params_path)
    ingested = ingest(params_path)
    split_done = _cached(split, "split", params_path)(params_path, ingested)
    tags_done = _cached(tags, "tags", params_path)(params_path, split_done)
    encoder_done = _cached(encoder, "encoder", params_path)(params_path, tags_done)
    router_done = _cached(predictors, "predictors", params_path)(params_path, encoder_done)
    router_dir, replay_tags = replay(params_path, router_done)
    report = evaluate_mixllm.submit(params_path, router_dir)
    # The baselines are independent of each other: the task runner runs them in parallel.
    baseline_curves = evaluate_baseline.map(params_path, list(config.evaluation.baselines), router_done)
    report = report.result()
    report.curves.extend(future.result() for future in baseline_curves)
    report.metrics = pipeline.flat_metrics(report, config)
    pipeline.write_evaluation(config, report, pipeline.Workspace.of(config))
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

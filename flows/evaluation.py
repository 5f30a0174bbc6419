"""The `evaluate on feedback` flow: off-policy estimates (IPS, SNIPS, DR) of a registered version
on the decisions the service logged with feedback, beside the champion's (what
`mixllm evaluate --on-feedback VERSION` prints)."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.common import config_for, library_logs_to_prefect


@task(name="off-policy estimates on logged feedback", cache_policy=NO_CACHE)
def off_policy_estimates(params_path: str | None, version: str, against: str = "champion") -> dict[str, Any]:
    from mixllm.evaluate import to_jsonable
    from mixllm.policy_evaluation import evaluate_on_feedback, logged_feedback
    from mixllm.registry import Registry

    config = config_for(params_path)
    registry = Registry(config)
    logged = logged_feedback(config)
    baseline, baseline_version = registry.load_router(int(against) if against.isdigit() else against)
    judged, judged_version = registry.load_router(int(version) if version.isdigit() else version)
    settings = {"lambda_": baseline.default_lambda, "cost_scale_usd": baseline.cost_scale_usd_,
                "resamples": config.evaluation.bootstrap_resamples, "confidence": config.evaluation.confidence_level,
                "seed": config.evaluation.seed}
    return to_jsonable({"logged": len(logged), "version": judged_version, "against": baseline_version,
                        "estimates": evaluate_on_feedback(judged, logged, **settings),
                        "baseline": evaluate_on_feedback(baseline, logged, **settings)})


@flow(name="evaluate on feedback")
def evaluate_on_feedback_flow(version: str, params_path: str | None = None, against: str = "champion") -> dict[str, Any]:
    library_logs_to_prefect()
    result = off_policy_estimates(params_path, str(version), against)
    estimates = result["estimates"]
    if estimates.get("n"):
        get_run_logger().info("version %s on %d logged decisions: DR score %s (version %s: %s)", result["version"],
                              estimates["n"], estimates["score"]["dr"], result["against"],
                              result["baseline"]["score"]["dr"] if result["baseline"].get("n") else "n/a")
    return result

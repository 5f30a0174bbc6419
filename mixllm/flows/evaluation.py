"""The `evaluate on feedback` flow: off-policy estimates (IPS, SNIPS, DR) of a registered version
on the decisions the service logged with feedback, beside the champion's (what
`mixllm evaluate --on-feedback VERSION` prints)."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from mixllm.flows.common import config_for, library_logs_to_prefect


@task(name="off-policy estimates on logged feedback", cache_policy=NO_CACHE)
def off_policy_estimates(params_path: str | None, version: str, against: str = "champion") -> dict[str, Any]:
    from mixllm.evaluation.results import to_jsonable
    from mixllm.jobs.policy_evaluation import versions_on_feedback

    return to_jsonable(versions_on_feedback(config_for(params_path), version, against))


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

"""Judging a router version on production evidence: off-policy estimates of its mean quality, cost
and score on the decisions the service logged and got feedback for (`mixllm evaluate --on-feedback`,
the Prefect task, and the promotion gate)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from mixllm.config import MixLLMConfig
from mixllm.core.router import MixLLMRouter
from mixllm.evaluation.off_policy import LoggedBandit, off_policy_estimates

logger = logging.getLogger(__name__)


def logged_feedback(config: MixLLMConfig) -> pd.DataFrame:
    """The service's logged decisions with feedback; empty when there is no decision log yet."""
    from mixllm.io.store import existing_log

    store = existing_log(config.sqlalchemy_url(config.service.feedback_store_url))
    if store is None:
        return pd.DataFrame(columns=["decision_id", "query", "llm", "chosen_llm", "propensity", "quality", "cost_usd"])
    try:
        return store.decisions_with_feedback()
    finally:
        store.dispose()


def compare_on_feedback(config: MixLLMConfig, judged: MixLLMRouter, baseline: MixLLMRouter, logged: pd.DataFrame,
                        resamples: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both versions' estimates on the same logged decisions, their scores made with the baseline's
    lambda and cost scale (so they compare)."""
    evaluation = config.evaluation
    settings = {"lambda_": baseline.default_lambda, "cost_scale_usd": baseline.cost_scale_usd_,
                "resamples": resamples or evaluation.bootstrap_resamples, "confidence": evaluation.confidence_level,
                "seed": evaluation.seed}
    return evaluate_on_feedback(judged, logged, **settings), evaluate_on_feedback(baseline, logged, **settings)


def versions_on_feedback(config: MixLLMConfig, version: str, against: str = "champion") -> dict[str, Any]:
    """Two registered versions (numbers or aliases) judged on the logged decisions with feedback:
    what `mixllm evaluate --on-feedback` prints and the Prefect flow returns."""
    from mixllm.io.registry import Registry

    registry = Registry(config)
    logged = logged_feedback(config)
    baseline, baseline_version = registry.load_router(int(against) if against.isdigit() else against)
    judged, judged_version = registry.load_router(int(version) if version.isdigit() else version)
    mine, theirs = compare_on_feedback(config, judged, baseline, logged)
    return {"logged": len(logged), "version": judged_version, "against": baseline_version,
            "lambda": baseline.default_lambda, "cost_scale_usd": baseline.cost_scale_usd_,
            "estimates": mine, "baseline": theirs}


def evaluate_on_feedback(router: MixLLMRouter, logged: pd.DataFrame, *, lambda_: float, cost_scale_usd: float,
                         resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Off-policy estimates (IPS, SNIPS, DR) of `router` serving the logged queries: its mean
    quality, mean cost, and mean score quality - lambda x cost / cost_scale_usd (the same lambda and
    scale for every version compared, so their scores compare). The logged probability of each
    choice is the decision's propensity (1 when it was logged without one: an argmax policy).
    Decisions whose LLM this router does not serve are left out and counted, and so are those
    another LLM answered than the one the policy chose (a failover, a session kept on its LLM):
    their propensity is not the answer's, and weighing them by it would bias every estimate."""
    llms = list(router.enabled_llms_)
    overridden = (logged["chosen_llm"].notna() & (logged["chosen_llm"] != logged["llm"]) if "chosen_llm" in logged
                  else pd.Series(False, index=logged.index))
    policy_choices = logged[~overridden]
    usable = (policy_choices[policy_choices["llm"].isin(llms)].reset_index(drop=True) if len(policy_choices)
              else policy_choices)
    result: dict[str, Any] = {"logged": int(len(logged)), "not_policy_choice": int(overridden.sum()),
                              "unknown_llm": int(len(policy_choices) - len(usable))}
    if not len(usable):
        return {**result, "n": 0}
    scored = [{c.llm: c for c in d.candidates} for d in router.route(usable["query"].tolist())]
    target, quality, cost = (np.array([[getattr(by_llm[llm], field) for llm in llms] for by_llm in scored])
                             for field in ("probability", "quality", "cost_usd"))
    actions = usable["llm"].map(llms.index).to_numpy()
    rows = np.arange(len(usable))
    logged_probability = pd.to_numeric(usable["propensity"], errors="coerce").fillna(1.0).to_numpy(dtype=float)
    observed_cost = pd.to_numeric(usable["cost_usd"], errors="coerce").to_numpy(dtype=float)
    result["cost_predicted_for"] = int(np.isnan(observed_cost).sum())  # no cost reported: the prediction stands in
    observed_cost = np.where(np.isnan(observed_cost), cost[rows, actions], observed_cost)
    observed_quality = usable["quality"].to_numpy(dtype=float)
    outcomes = {"quality": (observed_quality, quality), "cost_usd": (observed_cost, cost),
                "score": (observed_quality - lambda_ * observed_cost / cost_scale_usd,
                          quality - lambda_ * cost / cost_scale_usd)}
    for name, (observed, predicted) in outcomes.items():
        result[name] = off_policy_estimates(
            LoggedBandit(actions, logged_probability, observed, target, predicted),
            resamples=resamples, confidence=confidence, seed=seed)
    result["n"] = int(len(usable))
    result["agreement"] = float(np.mean(target[rows, actions] > 0.5))  # share of logged choices it would make too
    return result

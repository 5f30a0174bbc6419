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
from mixllm.evaluation.off_policy import LoggedBandit, off_policy_estimates, paired_difference

logger = logging.getLogger(__name__)


def logged_feedback(config: MixLLMConfig) -> pd.DataFrame:
    """The service's logged decisions with feedback, the most recent gate.max_logged_feedback;
    empty when there is no decision log yet."""
    from mixllm.io.store import existing_log

    store = existing_log(config.sqlalchemy_url(config.service.feedback_store_url))
    if store is None:
        return pd.DataFrame(columns=["decision_id", "query", "llm", "chosen_llm", "propensity", "quality", "cost_usd"])
    try:
        return store.decisions_with_feedback(limit=config.gate.max_logged_feedback)
    finally:
        store.dispose()


def compare_on_feedback(config: MixLLMConfig, judged: MixLLMRouter, baseline: MixLLMRouter, logged: pd.DataFrame,
                        resamples: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both versions' estimates on the same logged decisions, and `judged` minus `baseline` paired
    (in the first dict, "versus_baseline": per outcome, each estimator's difference with its
    interval from the same resamples). Scores use the baseline's lambda and cost scale, so they
    compare; doubly-robust estimates of both read one reward model, the two versions' predictions
    averaged, so neither version fills the gaps of the log (the choices the logging policy never
    made) with its own forecasts: judged by itself, every version looks right where it disagrees.
    For an LLM only one of them serves (a newcomer added to the candidate), that one's prediction is
    the only one there is, and it stands in."""
    evaluation = config.evaluation
    settings = {"lambda_": baseline.default_lambda, "cost_scale_usd": baseline.cost_scale_usd_,
                "resamples": resamples or evaluation.bootstrap_resamples, "confidence": evaluation.confidence_level,
                "seed": evaluation.seed}
    return tuple(_judge([judged, baseline], logged, **settings))


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
    their propensity is not the answer's, and weighing them by it would bias every estimate.
    DR's reward model is the router's own predictions (compare_on_feedback shares one instead)."""
    return _judge([router], logged, lambda_=lambda_, cost_scale_usd=cost_scale_usd, resamples=resamples,
                  confidence=confidence, seed=seed)[0]


def _judge(routers: list[MixLLMRouter], logged: pd.DataFrame, *, lambda_: float, cost_scale_usd: float,
           resamples: int, confidence: float, seed: int) -> list[dict[str, Any]]:
    """Each router's estimates on the logged decisions every one of them can judge (see
    evaluate_on_feedback), DR with the routers' predictions averaged as its reward model; with two,
    the first's paired difference to the second ("versus_baseline")."""
    served = [set(router.enabled_llms_) for router in routers]
    llms = list(dict.fromkeys(llm for router in routers for llm in router.enabled_llms_))
    overridden = (logged["chosen_llm"].notna() & (logged["chosen_llm"] != logged["llm"]) if "chosen_llm" in logged
                  else pd.Series(False, index=logged.index))
    policy_choices = logged[~overridden]
    usable = policy_choices[policy_choices["llm"].isin(set.intersection(*served))].reset_index(drop=True)
    counts: dict[str, Any] = {"logged": int(len(logged)), "not_policy_choice": int(overridden.sum()),
                              "unknown_llm": int(len(policy_choices) - len(usable))}
    if not len(usable):
        return [{**counts, "n": 0} for _ in routers]
    queries = usable["query"].tolist()
    tables = [_policy_table(router, queries, llms) for router in routers]
    # The reward model: per LLM, the mean prediction of the routers that serve it.
    quality, cost = (np.nanmean(np.stack([table[field] for table in tables]), axis=0) for field in ("quality", "cost_usd"))
    actions = usable["llm"].map(llms.index).to_numpy()
    rows = np.arange(len(usable))
    logged_probability = pd.to_numeric(usable["propensity"], errors="coerce").fillna(1.0).to_numpy(dtype=float)
    observed_cost = pd.to_numeric(usable["cost_usd"], errors="coerce").to_numpy(dtype=float)
    cost_predicted_for = int(np.isnan(observed_cost).sum())  # no cost reported: the prediction stands in
    observed_cost = np.where(np.isnan(observed_cost), cost[rows, actions], observed_cost)
    observed_quality = usable["quality"].to_numpy(dtype=float)
    outcomes = {"quality": (observed_quality, quality), "cost_usd": (observed_cost, cost),
                "score": (observed_quality - lambda_ * observed_cost / cost_scale_usd,
                          quality - lambda_ * cost / cost_scale_usd)}
    bandits = {name: [LoggedBandit(actions, logged_probability, observed, table["probability"], predicted)
                      for table in tables] for name, (observed, predicted) in outcomes.items()}
    bootstrap = {"resamples": resamples, "confidence": confidence, "seed": seed}
    results = []
    for i, table in enumerate(tables):
        result: dict[str, Any] = {**counts, "cost_predicted_for": cost_predicted_for}
        for name in outcomes:
            result[name] = off_policy_estimates(bandits[name][i], **bootstrap)
        result["n"] = int(len(usable))
        result["agreement"] = float(np.mean(table["probability"][rows, actions] > 0.5))  # logged choices it would make too
        results.append(result)
    if len(routers) == 2:
        results[0]["versus_baseline"] = {name: paired_difference(*bandits[name], **bootstrap) for name in outcomes}
    return results


def _policy_table(router: MixLLMRouter, queries: list[str], llms: list[str]) -> dict[str, np.ndarray]:
    """The router's probability of choosing each of `llms` (0 for one it does not serve) and its
    predicted quality and cost of each (NaN for one it does not serve), one row per query."""
    scored = [{c.llm: c for c in decision.candidates} for decision in router.route(queries)]
    table = {"probability": np.array([[by_llm[llm].probability if llm in by_llm else 0.0 for llm in llms]
                                      for by_llm in scored])}
    for field in ("quality", "cost_usd"):
        table[field] = np.array([[getattr(by_llm[llm], field) if llm in by_llm else np.nan for llm in llms]
                                 for by_llm in scored])
    return table

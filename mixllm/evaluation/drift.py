"""Is the traffic still what the router was trained on? (pure maths over a fitted router)

Three signals, each compared with a sample of the training queries the router keeps
(`MixLLMRouter.drift_reference_`, the query features its heads read):

- the domain mix: the population stability index (PSI) between the domains the router's domain
  model gives the training sample and the recent queries (a common rule of thumb: above 0.2 the
  mix has moved);
- the query features: the shift of their mean, in training standard deviations (root mean square
  over features), with a permutation test of it (the recent and training rows pooled and split at
  random), so a shift is reported only when it is both large and not chance;
- the feedback: per LLM, mean feedback quality minus the router's predicted quality on the same
  queries, once an LLM has enough feedback (its predictions have gone stale).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from mixllm.config import DriftConfig


@dataclass
class DriftReport:
    queries: int
    domain_psi: float | None = None
    feature_shift: float | None = None
    feature_shift_p_value: float | None = None
    feedback_gap: dict[str, float] = field(default_factory=dict)
    drifted: bool = False
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def population_stability_index(expected: np.ndarray, actual: np.ndarray, floor: float = 1e-4) -> float:
    """PSI = sum (a - e) ln(a / e) over bins (here: domains), with shares floored to stay finite."""
    e = np.maximum(np.asarray(expected, dtype=float), floor)
    a = np.maximum(np.asarray(actual, dtype=float), floor)
    e, a = e / e.sum(), a / a.sum()
    return float(np.sum((a - e) * np.log(a / e)))


def mean_shift(reference: np.ndarray, recent: np.ndarray, permutations: int, seed: int = 0) -> tuple[float, float]:
    """(RMS shift of the feature means in reference SDs, its permutation p-value)."""
    scale = reference.std(axis=0) + 1e-9

    def statistic(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.sqrt(np.mean(((a.mean(axis=0) - b.mean(axis=0)) / scale) ** 2)))

    observed = statistic(recent, reference)
    pooled = np.vstack([reference, recent])
    rng = np.random.default_rng(seed)
    exceed = 0
    for _ in range(permutations):
        order = rng.permutation(len(pooled))
        exceed += statistic(pooled[order[:len(recent)]], pooled[order[len(recent):]]) >= observed
    return observed, (exceed + 1) / (permutations + 1)


def measure_drift(router: Any, recent_queries: list[str], feedback: pd.DataFrame | None,
                  settings: DriftConfig) -> DriftReport:
    """The three signals on recent traffic (`feedback`: query, llm, quality of recent rated calls)."""
    report = DriftReport(queries=len(recent_queries))
    reference = getattr(router, "drift_reference_", None)
    if reference is None:
        report.reasons.append("this model keeps no training sample (trained before drift monitoring)")
        return report
    if len(recent_queries) >= settings.min_queries:
        X = router.features(recent_queries)
        base = X[:, : router.n_base_features_]
        domains = router.domain_model_
        report.domain_psi = population_stability_index(domains.predict_proba(reference, None).mean(axis=0),
                                                       domains.predict_proba(base, None).mean(axis=0))
        report.feature_shift, report.feature_shift_p_value = mean_shift(reference, base, settings.permutations)
        if report.domain_psi > settings.psi_threshold:
            report.reasons.append(f"domain mix PSI {report.domain_psi:.3f} > {settings.psi_threshold}")
        if report.feature_shift > settings.min_feature_shift and report.feature_shift_p_value < settings.p_value:
            report.reasons.append(f"query features shifted {report.feature_shift:.3f} SD (p = "
                                  f"{report.feature_shift_p_value:.3f})")
    if feedback is not None and len(feedback):
        known = feedback[feedback["llm"].isin(router.llms_)]
        counts = known["llm"].value_counts()
        rated = known[known["llm"].isin(counts[counts >= settings.min_feedback_per_llm].index)]
        if len(rated):
            predictions = router.predict(rated["query"].tolist())
            columns = rated["llm"].map(predictions.llms.index).to_numpy()
            predicted = predictions.quality[np.arange(len(rated)), columns]
            gaps = (rated["quality"].to_numpy(dtype=float) - predicted)
            for llm, gap in pd.Series(gaps, index=rated["llm"].to_numpy()).groupby(level=0).mean().items():
                report.feedback_gap[str(llm)] = float(gap)
                if abs(gap) > settings.feedback_gap:
                    report.reasons.append(f"{llm}: feedback quality {gap:+.3f} from its predictions")
    report.drifted = any(not r.startswith("this model") for r in report.reasons)
    return report

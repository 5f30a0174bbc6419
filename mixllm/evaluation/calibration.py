"""Choosing lambda on validation for a cost budget, with a bound on the cost it will realise on new
queries (a budget that holds, not one met on average)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from mixllm.core.decision import Predictions
from mixllm.core.errors import MixLLMError
from mixllm.evaluation.evaluate import (
    OperatingPoint,
    Outcomes,
    Reference,
    decision_path,
    operating_point,
    outcome_columns,
    path_means,
    segment_lambdas,
)


CalibrationTarget = Literal["cost_share", "budget_usd_per_1k", "quality_share"]


@dataclass(frozen=True)
class Calibration:
    target: str
    value: float
    lambda_: float
    validation: OperatingPoint
    met: bool  # False when no lambda met the target on validation (the closest is returned)
    confidence: float = 0.5  # of the cost bound; 0.5: the plain validation mean had to meet the budget
    cost_bound: float | None = None  # upper confidence bound of the cost (share or USD/query) at lambda_


def calibrate_lambda(predictions: Predictions, outcomes: Outcomes, reference: Reference, cost_scale_usd: float,
                     target: CalibrationTarget, value: float, *, confidence: float = 0.5,
                     window_queries: int | None = None, reference_cost_usd: np.ndarray | None = None) -> Calibration:
    """The lambda that meets a target on validation data, searched over the exact lambda path.

    cost_share: the best quality whose cost stays within `value` x the reference's cost;
    budget_usd_per_1k: the same with an absolute budget (dollars per 1,000 queries);
    quality_share: the cheapest point whose quality is at least `value` x the reference's.

    A budget must hold on traffic the router has not seen, not only on validation. With
    `confidence` above 0.5 the budget must hold for the one-sided upper confidence bound of the
    spend over a window of `window_queries` new queries (default: as many as validation has):
    mean(d) + z * sd(d) * sqrt(1/n_validation + 1/n_window) <= 0 with d_i = cost_i - budget_i per
    query, budget_i = value x the reference's cost on query i (or value / 1000 USD). The sd comes
    from the validation queries at that lambda, so a spiky policy gets a wider margin.
    """
    from statistics import NormalDist

    if target not in ("cost_share", "budget_usd_per_1k", "quality_share"):
        raise MixLLMError(f"unknown calibration target '{target}'; choose cost_share, budget_usd_per_1k or quality_share")
    if value <= 0:
        raise MixLLMError(f"calibration target value must be > 0, got {value}")
    if not 0.5 <= confidence < 1:
        raise MixLLMError(f"budget confidence must be in [0.5, 1), got {confidence}")
    path = decision_path(predictions.quality, predictions.cost_usd, cost_scale_usd, predictions.llms)
    quality, cost = outcome_columns(outcomes, predictions.llms)
    mean_q, mean_c = path_means(path, quality, cost)
    lambdas = segment_lambdas(path)
    n = len(quality)
    if target == "quality_share":
        meeting = np.flatnonzero(mean_q >= value * reference.mean_quality)
        met = len(meeting) > 0
        k = int(meeting[np.lexsort((-mean_q[meeting], mean_c[meeting]))[0]]) if met else int(np.argmax(mean_q))
        point = operating_point(path.choices_at(float(lambdas[k])), predictions.llms, outcomes, reference, float(lambdas[k]))
        return Calibration(target, value, float(lambdas[k]), point, met)
    if target == "cost_share":
        per_query_ref = (np.full(n, reference.mean_cost_usd) if reference_cost_usd is None
                         else np.asarray(reference_cost_usd, dtype=np.float64))
        allowance = value * per_query_ref
    else:
        allowance = np.full(n, value / 1000.0)
    excess = cost - allowance[:, None]  # d_i for every LLM choice
    mean_d, mean_d2 = path_means(path, excess, excess**2)
    z = NormalDist().inv_cdf(confidence)
    window = n if window_queries is None else max(int(window_queries), 1)
    sd = np.sqrt(np.maximum(mean_d2 - mean_d**2, 0.0) * n / max(n - 1, 1))
    bound = mean_d + z * sd * np.sqrt(1.0 / n + 1.0 / window)
    meeting = np.flatnonzero(bound <= 1e-15)
    met = len(meeting) > 0
    if met:
        k = int(meeting[np.lexsort((mean_c[meeting], -mean_q[meeting]))[0]])
    else:
        k = int(np.argmin(bound))
    point = operating_point(path.choices_at(float(lambdas[k])), predictions.llms, outcomes, reference, float(lambdas[k]))
    mean_allowance = float(allowance.mean())
    bound_cost = float(bound[k] + mean_allowance)  # the bound on mean cost in USD per query
    cost_bound = bound_cost / reference.mean_cost_usd if target == "cost_share" else bound_cost
    return Calibration(target, value, float(lambdas[k]), point, met, confidence, cost_bound)

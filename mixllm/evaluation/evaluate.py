"""Measuring routers: quality-cost curves, AIQ and operating points. Their confidence intervals are
in bootstrap.py, lambda's calibration to a budget in calibration.py, tables and plots in results.py.

All figures are against a reference LLM on the same queries ("X% of GPT-4's quality at Y% of its
cost"). A router's curve is its operating points over a lambda sweep. Two routing policies can be
mixed at random per query, so every point on the segment between two points is reachable: the
curve a user can get is the upper convex hull of the points, made non-decreasing (more budget never
has to hurt). AIQ (RouterBench's average improvement in quality) is the mean of that hull over a
stated cost range: from the cheapest single LLM's mean cost to the reference LLM's, on the same
queries, so every router in a run is measured over the same range. Below a router's cheapest
point its hull is 0 (it cannot spend that little); above its dearest point the hull stays flat.

The lambda sweep is exact: for each query the score of LLM m is a line in lambda
(q_m + bonus_m - lambda * c_m / scale), so the choice changes only where the upper envelope of
those lines has a corner. `decision_path` finds every such corner; the curve has one operating
point per distinct corner, so no grid can make a hull coarse.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from mixllm.core.decision import Predictions, decide
from mixllm.core.errors import MixLLMError
from mixllm.core.units import outcome_tables


@dataclass(frozen=True)
class Outcomes:
    """What each LLM really scored and cost on each query of an evaluation set (full information)."""

    query_ids: list[str]
    llms: list[str]
    quality: np.ndarray  # (n_queries, n_llms)
    cost_usd: np.ndarray

    @classmethod
    def from_log(cls, log: pd.DataFrame, query_ids: Sequence[str], llms: Sequence[str]) -> Outcomes:
        quality_table, cost_table = outcome_tables(log, llms, query_ids)
        quality, cost = quality_table.to_numpy(dtype=float), cost_table.to_numpy(dtype=float)
        if np.isnan(quality).any() or np.isnan(cost).any():
            missing = int(np.isnan(quality).sum())
            raise MixLLMError(
                f"evaluation needs every LLM's outcome on every query; {missing} (query, LLM) pairs are missing. "
                "Evaluate on a full-information log (e.g. RouterBench), not a bandit log"
            )
        return cls(list(query_ids), list(llms), quality, cost)

    def realised(self, choices: np.ndarray, llms: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Quality and cost of choosing column `choices[i]` of `llms` for query i."""
        index = np.array([self.llms.index(m) for m in llms])[choices]
        rows = np.arange(len(choices))
        return self.quality[rows, index], self.cost_usd[rows, index]


@dataclass(frozen=True)
class Reference:
    """The yardstick: one LLM's mean quality and cost on the evaluation queries."""

    llm: str
    mean_quality: float
    mean_cost_usd: float
    cheapest_mean_cost_usd: float

    @classmethod
    def of(cls, outcomes: Outcomes, llm: str, yardstick: Outcomes | None = None) -> Reference:
        """`llm`'s means from `yardstick` (default: `outcomes`), so the reference can be an LLM
        that is not in the routed pool (e.g. disabled); the cheapest comes from the pool."""
        yardstick = outcomes if yardstick is None else yardstick
        if llm not in yardstick.llms:
            raise MixLLMError(f"reference LLM '{llm}' has no outcomes here; known: {', '.join(yardstick.llms)}")
        j = yardstick.llms.index(llm)
        return cls(llm, float(yardstick.quality[:, j].mean()), float(yardstick.cost_usd[:, j].mean()),
                   float(outcomes.cost_usd.mean(axis=0).min()))


def best_single_llm(log: pd.DataFrame) -> str:
    """The LLM with the best mean quality (ties: the cheaper) — the default reference."""
    stats = log.groupby("llm").agg(quality=("quality", "mean"), cost=("cost_usd", "mean"))
    return str(stats.sort_values(["quality", "cost"], ascending=[False, True]).index[0])


@dataclass(frozen=True)
class OperatingPoint:
    lambda_: float | None
    mean_quality: float
    mean_cost_usd: float
    quality_share: float  # of the reference's mean quality
    cost_share: float  # of the reference's mean cost
    traffic: dict[str, float] = field(default_factory=dict)  # share of queries per LLM


def operating_point(choices: np.ndarray, llms: Sequence[str], outcomes: Outcomes, reference: Reference,
                    lambda_: float | None = None) -> OperatingPoint:
    quality, cost = outcomes.realised(choices, llms)
    counts = np.bincount(choices, minlength=len(llms)) / max(len(choices), 1)
    return OperatingPoint(
        lambda_=lambda_, mean_quality=float(quality.mean()), mean_cost_usd=float(cost.mean()),
        quality_share=float(quality.mean() / reference.mean_quality),
        cost_share=float(cost.mean() / reference.mean_cost_usd),
        traffic={llm: float(share) for llm, share in zip(llms, counts) if share > 0},
    )


def upper_hull(costs: Sequence[float], qualities: Sequence[float]) -> np.ndarray:
    """The non-decreasing upper convex hull of (cost, quality) points, as sorted (k, 2) vertices."""
    points = sorted(set(zip(map(float, costs), map(float, qualities))))
    hull: list[tuple[float, float]] = []
    for point in points:
        # Keep only points that raise quality: a dearer point with no better quality is never chosen.
        if hull and point[1] <= hull[-1][1]:
            continue
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            # Pop the middle vertex when it lies on or under the chord (not concave).
            if (x2 - x1) * (point[1] - y1) - (y2 - y1) * (point[0] - x1) >= 0:
                hull.pop()
            else:
                break
        hull.append(point)
    return np.array(hull, dtype=float).reshape(-1, 2)


def hull_quality(hull: np.ndarray, cost: float) -> float:
    """Best mean quality reachable at mean cost `cost` (0 below the cheapest vertex)."""
    if len(hull) == 0 or cost < hull[0, 0]:
        return 0.0
    return float(np.interp(cost, hull[:, 0], hull[:, 1]))


def aiq(hull: np.ndarray, cost_low: float, cost_high: float, grid: int = 2001) -> float:
    """Mean of the hull's quality over [cost_low, cost_high] (RouterBench's AIQ, normalised by the range)."""
    if cost_high <= cost_low:
        raise MixLLMError(f"AIQ needs a cost range with high > low, got [{cost_low}, {cost_high}]")
    xs = np.linspace(cost_low, cost_high, grid)
    ys = np.array([hull_quality(hull, x) for x in xs])
    return float(np.trapezoid(ys, xs) / (cost_high - cost_low))


def least_cost_for_quality(hull: np.ndarray, quality: float) -> float | None:
    """The smallest mean cost whose hull quality reaches `quality`; None when never reached."""
    if len(hull) == 0 or hull[-1, 1] < quality:
        return None
    if hull[0, 1] >= quality:
        return float(hull[0, 0])
    return float(np.interp(quality, hull[:, 1], hull[:, 0]))


@dataclass(frozen=True)
class DecisionPath:
    """Every choice of argmax_m (q_m + bonus_m - lambda * c_m / scale) as lambda grows from 0.

    `initial[i]` is query i's choice at lambda = 0; event k (sorted by `lambdas`) moves query
    `rows[k]` from LLM `from_[k]` to the cheaper `to[k]` at lambda `lambdas[k]`. Column indices
    refer to `llms`. Ties go as in `router.decide`: to the lower predicted cost.
    """

    llms: list[str]
    initial: np.ndarray
    lambdas: np.ndarray
    rows: np.ndarray
    from_: np.ndarray
    to: np.ndarray

    def choices_at(self, lambda_: float) -> np.ndarray:
        """Each query's choice at `lambda_` (events at exactly lambda_ applied)."""
        choices = self.initial.copy()
        upto = int(np.searchsorted(self.lambdas, lambda_, side="right"))
        # A row's events are in lambda order: its last event up to lambda_ holds its choice.
        rows, to = self.rows[:upto][::-1], self.to[:upto][::-1]
        unique_rows, last = np.unique(rows, return_index=True)
        choices[unique_rows] = to[last]
        return choices


def decision_path(quality: np.ndarray, cost_usd: np.ndarray, cost_scale_usd: float, llms: Sequence[str],
                  bonus: np.ndarray | None = None) -> DecisionPath:
    """The exact lambda path of the shared decision rule (see DecisionPath), vectorised over queries."""
    intercept = np.asarray(quality, dtype=np.float64) + (0.0 if bonus is None else np.asarray(bonus, dtype=np.float64))
    slope = np.asarray(cost_usd, dtype=np.float64) / cost_scale_usd
    n, m = intercept.shape
    rows = np.arange(n)
    best = intercept.max(axis=1, keepdims=True)
    tied = np.isclose(intercept, best, rtol=0.0, atol=1e-12)
    current = np.where(tied, slope, np.inf).argmin(axis=1)
    initial = current.copy()
    at = np.zeros(n)
    events: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    for _ in range(m - 1):
        own_slope = slope[rows, current][:, None]
        cheaper = slope < own_slope - 1e-15
        with np.errstate(divide="ignore", invalid="ignore"):
            cross = np.where(cheaper, (intercept[rows, current][:, None] - intercept) / (own_slope - slope), np.inf)
        cross = np.where(cheaper, np.maximum(cross, at[:, None]), np.inf)
        nearest = cross.min(axis=1)
        moving = np.isfinite(nearest)
        if not moving.any():
            break
        ties = np.isclose(cross, nearest[:, None], rtol=1e-12, atol=0.0) & cheaper
        following = np.where(ties, slope, np.inf).argmin(axis=1)
        events.append((nearest[moving], rows[moving], current[moving], following[moving]))
        current = np.where(moving, following, current)
        at = np.where(moving, nearest, at)
    if events:
        lambdas, event_rows, sources, targets = (np.concatenate(parts) for parts in zip(*events))
        order = np.argsort(lambdas, kind="stable")
        lambdas, event_rows, sources, targets = lambdas[order], event_rows[order], sources[order], targets[order]
    else:
        lambdas = np.zeros(0)
        event_rows = sources = targets = np.zeros(0, dtype=int)
    return DecisionPath(list(llms), initial, lambdas, event_rows, sources, targets)


def path_means(path: DecisionPath, quality: np.ndarray, cost_usd: np.ndarray,
               weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean realised quality and cost at lambda = 0 and after every event: arrays of k + 1, or
    (B, k + 1) for B rows of bootstrap `weights` (counts per query)."""
    n = len(path.initial)
    index = np.arange(n)
    start_q, start_c = quality[index, path.initial], cost_usd[index, path.initial]
    step_q = quality[path.rows, path.to] - quality[path.rows, path.from_]
    step_c = cost_usd[path.rows, path.to] - cost_usd[path.rows, path.from_]
    if weights is None:
        return (np.concatenate([[start_q.sum()], start_q.sum() + np.cumsum(step_q)]) / n,
                np.concatenate([[start_c.sum()], start_c.sum() + np.cumsum(step_c)]) / n)
    total = weights.sum(axis=1, keepdims=True)
    q0, c0 = weights @ start_q, weights @ start_c
    w = weights[:, path.rows]
    return (np.hstack([q0[:, None], q0[:, None] + np.cumsum(w * step_q, axis=1)]) / total,
            np.hstack([c0[:, None], c0[:, None] + np.cumsum(w * step_c, axis=1)]) / total)


def segment_lambdas(path: DecisionPath) -> np.ndarray:
    """A lambda inside each of the k + 1 constant stretches of the path: 0, then midpoints, then
    twice the last corner (plus one, so a last corner at 0 still moves)."""
    corners = path.lambdas
    if len(corners) == 0:
        return np.zeros(1)
    middles = (corners[:-1] + corners[1:]) / 2
    return np.concatenate([[0.0], middles, [2 * corners[-1] + 1.0]])


def pareto_indices(costs: np.ndarray, qualities: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats on both cost and quality, by rising cost."""
    order = np.lexsort((-qualities, costs))
    best_so_far = np.maximum.accumulate(qualities[order])
    keep = np.concatenate([[True], qualities[order][1:] > best_so_far[:-1]])
    return order[keep]


@dataclass
class RouterCurve:
    """One router's measured behaviour on an evaluation set: its Pareto-efficient operating points
    (all points of the exact sweep are kept in `path` for the bootstrap)."""

    name: str
    points: list[OperatingPoint]
    ms_per_query: float
    sweeps_lambda: bool = True
    calibrated: OperatingPoint | None = None  # at the lambda calibrated on validation, if any
    path: DecisionPath | None = None

    def hull(self) -> np.ndarray:
        return upper_hull([p.mean_cost_usd for p in self.points], [p.mean_quality for p in self.points])

    def summary(self, reference: Reference, budget_share: float, quality_share: float) -> dict[str, Any]:
        hull = self.hull()
        least = least_cost_for_quality(hull, quality_share * reference.mean_quality)
        parity = least_cost_for_quality(hull, reference.mean_quality)
        best = max(self.points, key=lambda p: (p.mean_quality, -p.mean_cost_usd))
        row = {
            "router": self.name,
            # No cost range (the reference is the cheapest LLM) means no area to average: NaN.
            "aiq": (aiq(hull, reference.cheapest_mean_cost_usd, reference.mean_cost_usd) / reference.mean_quality
                    if reference.mean_cost_usd > reference.cheapest_mean_cost_usd else float("nan"))
            if self.sweeps_lambda else float("nan"),
            "quality_at_budget_pct": 100 * hull_quality(hull, budget_share * reference.mean_cost_usd) / reference.mean_quality,
            "least_cost_for_target_pct": None if least is None else 100 * least / reference.mean_cost_usd,
            "least_cost_for_reference_pct": None if parity is None else 100 * parity / reference.mean_cost_usd,
            "best_quality_pct": 100 * best.quality_share,
            "best_quality_cost_pct": 100 * best.cost_share,
            "ms_per_query": self.ms_per_query,
        }
        if self.calibrated is not None:
            row["calibrated_lambda"] = self.calibrated.lambda_
            row["calibrated_quality_pct"] = 100 * self.calibrated.quality_share
            row["calibrated_cost_pct"] = 100 * self.calibrated.cost_share
            row["calibrated_cost_over_budget"] = self.calibrated.cost_share / budget_share
        return row


def sweep(predictions: Predictions, outcomes: Outcomes, reference: Reference, lambdas: Sequence[float],
          cost_scale_usd: float, *, exploration: float = 0.0, penalty: np.ndarray | None = None) -> list[OperatingPoint]:
    """Operating points of one set of predictions at given lambdas (predictions computed once)."""
    penalty = np.zeros_like(predictions.quality) if penalty is None else penalty
    points = []
    for lambda_ in lambdas:
        choices, _ = decide(predictions.quality, predictions.cost_usd, predictions.uncertainty, penalty,
                            lambda_=float(lambda_), exploration=exploration, cost_scale_usd=cost_scale_usd)
        points.append(operating_point(choices, predictions.llms, outcomes, reference, float(lambda_)))
    return points


def exact_sweep(predictions: Predictions, outcomes: Outcomes, reference: Reference,
                cost_scale_usd: float) -> tuple[list[OperatingPoint], DecisionPath]:
    """Every Pareto-efficient operating point of the exact lambda sweep, and the path itself."""
    path = decision_path(predictions.quality, predictions.cost_usd, cost_scale_usd, predictions.llms)
    quality, cost = outcome_columns(outcomes, predictions.llms)
    mean_q, mean_c = path_means(path, quality, cost)
    lambdas = segment_lambdas(path)
    points = []
    for k in pareto_indices(mean_c, mean_q):
        choices = path.choices_at(float(lambdas[k]))
        points.append(operating_point(choices, predictions.llms, outcomes, reference, float(lambdas[k])))
    return points, path


def outcome_columns(outcomes: Outcomes, llms: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    index = [outcomes.llms.index(llm) for llm in llms]
    return outcomes.quality[:, index], outcomes.cost_usd[:, index]


def measure_router(name: str, router: Any, queries: pd.DataFrame, outcomes: Outcomes, reference: Reference,
                   ms_per_query: float | None = None) -> RouterCurve:
    """Predict once, then sweep lambda exactly. The prediction is timed as the router's overhead
    per query unless `ms_per_query` was measured separately (e.g. without an embedding cache)."""
    started = time.perf_counter()
    predictions = router.predict(queries)
    elapsed_ms = 1000 * (time.perf_counter() - started) / max(len(queries), 1)
    if ms_per_query is not None:
        elapsed_ms = ms_per_query
    if getattr(router, "sweeps_lambda", True):
        points, path = exact_sweep(predictions, outcomes, reference, getattr(router, "cost_scale_usd_", 1.0) or 1.0)
        return RouterCurve(name, points, elapsed_ms, True, path=path)
    scale = getattr(router, "cost_scale_usd_", 1.0) or 1.0
    choices, _ = decide(predictions.quality, predictions.cost_usd, predictions.uncertainty,
                        np.zeros_like(predictions.quality), lambda_=0.0, exploration=0.0, cost_scale_usd=scale)
    point = operating_point(choices, predictions.llms, outcomes, reference, 0.0)
    path = DecisionPath(list(predictions.llms), choices, np.zeros(0), *(np.zeros(0, dtype=int),) * 3)
    return RouterCurve(name, [point], elapsed_ms, False, path=path)


def routing_overhead_ms(router: Any, queries: Sequence[str], sample: int = 64, clock: Any = time.perf_counter) -> float:
    """Milliseconds per query to route a batch of up to `sample` queries end to end, cache off."""
    texts = list(queries)[:sample]
    cache_dir = getattr(router, "cache_dir", None)
    try:
        if hasattr(router, "cache_dir"):
            router.cache_dir = None
        router.route(texts[:2])  # warm-up: first-call allocations are not routing overhead
        started = clock()
        router.route(texts)
        return 1000 * (clock() - started) / max(len(texts), 1)
    finally:
        if hasattr(router, "cache_dir"):
            router.cache_dir = cache_dir

"""Confidence intervals for routing figures: a bootstrap over the evaluation queries, with the same
resampled queries for every router so that differences between routers are paired."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mixllm.core.errors import MixLLMError
from mixllm.evaluation.evaluate import DecisionPath, Outcomes, RouterCurve, outcome_columns, pareto_indices, path_means


def _hull_arrays(costs: np.ndarray, qualities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The non-decreasing upper convex hull of points as (costs, qualities) vertex arrays (the
    Pareto front first, so the monotone chain runs over few points)."""
    keep = pareto_indices(costs, qualities)
    # Python floats: the chain's arithmetic on numpy scalars was most of a 1,000-resample bootstrap.
    xs, ys = costs[keep].tolist(), qualities[keep].tolist()
    hull_x, hull_y = [xs[0]], [ys[0]]
    for x, y in zip(xs[1:], ys[1:]):
        while len(hull_x) >= 2 and (hull_x[-1] - hull_x[-2]) * (y - hull_y[-2]) - (hull_y[-1] - hull_y[-2]) * (x - hull_x[-2]) >= 0:
            hull_x.pop()
            hull_y.pop()
        hull_x.append(x)
        hull_y.append(y)
    return np.array(hull_x), np.array(hull_y)


def _hull_metrics(hull_x: np.ndarray, hull_y: np.ndarray, cheapest: float, ref_quality: float, ref_cost: float,
                  budget_share: float, quality_share: float, sweeps: bool) -> tuple[float, float, float, float]:
    """(AIQ, quality at the budget %, least cost % for the target, least cost % for parity) of one hull."""
    def at(cost: np.ndarray | float) -> np.ndarray:
        return np.where(np.asarray(cost) < hull_x[0], 0.0, np.interp(cost, hull_x, hull_y))

    def least(target: float) -> float:
        if hull_y[-1] < target:
            return float("nan")
        if hull_y[0] >= target:
            return 100 * float(hull_x[0]) / ref_cost
        return 100 * float(np.interp(target, hull_y, hull_x)) / ref_cost

    if sweeps and ref_cost > cheapest:
        xs = np.linspace(cheapest, ref_cost, 2001)
        area = float(np.trapezoid(at(xs), xs) / (ref_cost - cheapest) / ref_quality)
    else:
        area = float("nan")
    return (area, 100 * float(at(budget_share * ref_cost)) / ref_quality, least(quality_share * ref_quality),
            least(ref_quality))


BOOTSTRAP_METRICS = ("aiq", "quality_at_budget_pct", "least_cost_for_target_pct", "least_cost_for_reference_pct")


def bootstrap_weights(n_queries: int, n_boot: int, seed: int) -> np.ndarray:
    """Counts per query for `n_boot` resamples with replacement (shared by every router: paired)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_queries, np.full(n_queries, 1.0 / n_queries), size=n_boot).astype(np.float64)


def bootstrap_metrics(curve: RouterCurve, outcomes: Outcomes, reference_quality: np.ndarray,
                      reference_cost: np.ndarray, weights: np.ndarray, budget_share: float,
                      quality_share: float, chunk: int = 200) -> dict[str, np.ndarray]:
    """Each metric of `curve` on every bootstrap resample (rows of `weights`), the reference and
    the cheapest LLM re-measured on the same resample. NaN where a target is not reached."""
    if curve.path is None:
        raise MixLLMError(f"router {curve.name!r} has no decision path; measure it with measure_router")
    quality, cost = outcome_columns(outcomes, curve.path.llms)
    out = {name: np.zeros(len(weights)) for name in BOOTSTRAP_METRICS}
    for start in range(0, len(weights), chunk):
        block = weights[start:start + chunk]
        total = block.sum(axis=1)
        mean_q, mean_c = path_means(curve.path, quality, cost, block)
        ref_q, ref_c = block @ reference_quality / total, block @ reference_cost / total
        cheapest = (block @ outcomes.cost_usd / total[:, None]).min(axis=1)
        for b in range(len(block)):
            hull_x, hull_y = _hull_arrays(mean_c[b], mean_q[b])
            values = _hull_metrics(hull_x, hull_y, cheapest[b], ref_q[b], ref_c[b], budget_share, quality_share,
                                   curve.sweeps_lambda)
            for name, value in zip(BOOTSTRAP_METRICS, values):
                out[name][start + b] = value
    return out


def at_lambda_bootstrap(path: DecisionPath, lambda_: float, outcomes: Outcomes, reference_quality: np.ndarray,
                        reference_cost: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Quality and cost shares of one fixed lambda on every resample (e.g. the calibrated one)."""
    quality, cost = outcome_columns(outcomes, path.llms)
    choices = path.choices_at(lambda_)
    rows = np.arange(len(choices))
    return {"quality_pct": 100 * (weights @ quality[rows, choices]) / (weights @ reference_quality),
            "cost_pct": 100 * (weights @ cost[rows, choices]) / (weights @ reference_cost)}


@dataclass(frozen=True)
class Interval:
    """A point estimate with its percentile bootstrap interval (NaN-free replicates only)."""

    estimate: float
    low: float
    high: float
    reached: float = 1.0  # share of resamples where the metric exists (e.g. a target was reached)

    @classmethod
    def of(cls, estimate: float | None, replicates: np.ndarray, level: float = 0.95) -> Interval:
        finite = replicates[np.isfinite(replicates)]
        estimate = float("nan") if estimate is None else float(estimate)
        if len(finite) == 0:
            return cls(estimate, float("nan"), float("nan"), 0.0)
        tail = 100 * (1 - level) / 2
        low, high = np.percentile(finite, [tail, 100 - tail])
        return cls(estimate, float(low), float(high), len(finite) / len(replicates))

    def format(self, digits: int = 4) -> str:
        if not np.isfinite(self.estimate):
            return "–"
        text = f"{self.estimate:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"
        return text if self.reached >= 0.999 else f"{text} ({100 * self.reached:.0f}% of resamples)"

"""Measuring routers: quality-cost curves, AIQ, budgets, calibration, and the Pareto plot.

All figures are against a reference LLM on the same queries ("X% of GPT-4's quality at Y% of its
cost"). A router's curve is its operating points over a lambda sweep. Two routing policies can be
mixed at random per query, so every point on the segment between two points is reachable: the
curve a user can get is the upper convex hull of the points, made non-decreasing (more budget never
has to hurt). AIQ (RouterBench's average improvement in quality) is the mean of that hull over a
stated cost range: from the cheapest single LLM's mean cost to the reference LLM's, on the same
queries, so every router in a run is measured over the same range. Below a router's cheapest
point its hull is 0 (it cannot spend that little); above its dearest point the hull stays flat.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from mixllm.errors import MixLLMError
from mixllm.router import Predictions, decide

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcomes:
    """What each LLM really scored and cost on each query of an evaluation set (full information)."""

    query_ids: list[str]
    llms: list[str]
    quality: np.ndarray  # (n_queries, n_llms)
    cost_usd: np.ndarray

    @classmethod
    def from_log(cls, log: pd.DataFrame, query_ids: Sequence[str], llms: Sequence[str]) -> Outcomes:
        quality = log.pivot_table(index="query_id", columns="llm", values="quality", aggfunc="first")
        cost = log.pivot_table(index="query_id", columns="llm", values="cost_usd", aggfunc="first")
        quality = quality.reindex(index=list(query_ids), columns=list(llms)).to_numpy(dtype=float)
        cost = cost.reindex(index=list(query_ids), columns=list(llms)).to_numpy(dtype=float)
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


@dataclass
class RouterCurve:
    """One router's measured behaviour on an evaluation set."""

    name: str
    points: list[OperatingPoint]
    ms_per_query: float
    sweeps_lambda: bool = True
    calibrated: OperatingPoint | None = None  # at the lambda calibrated on validation, if any

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
        return row


def sweep(predictions: Predictions, outcomes: Outcomes, reference: Reference, lambdas: Sequence[float],
          cost_scale_usd: float, *, exploration: float = 0.0, penalty: np.ndarray | None = None) -> list[OperatingPoint]:
    """Operating points of one set of predictions over `lambdas` (predictions computed once)."""
    penalty = np.zeros_like(predictions.quality) if penalty is None else penalty
    points = []
    for lambda_ in lambdas:
        choices, _ = decide(predictions.quality, predictions.cost_usd, predictions.uncertainty, penalty,
                            lambda_=float(lambda_), exploration=exploration, cost_scale_usd=cost_scale_usd)
        points.append(operating_point(choices, predictions.llms, outcomes, reference, float(lambda_)))
    return points


def measure_router(name: str, router: Any, queries: pd.DataFrame, outcomes: Outcomes, reference: Reference,
                   lambdas: Sequence[float], ms_per_query: float | None = None) -> RouterCurve:
    """Predict once, then sweep lambda. The prediction is timed as the router's overhead per query
    unless `ms_per_query` was measured separately (e.g. without an embedding cache)."""
    started = time.perf_counter()
    predictions = router.predict(queries)
    elapsed_ms = 1000 * (time.perf_counter() - started) / max(len(queries), 1)
    if ms_per_query is not None:
        elapsed_ms = ms_per_query
    sweeps = getattr(router, "sweeps_lambda", True)
    grid = lambdas if sweeps else [0.0]
    points = sweep(predictions, outcomes, reference, grid, getattr(router, "cost_scale_usd_", 1.0) or 1.0)
    return RouterCurve(name, points, elapsed_ms, sweeps)


def routing_overhead_ms(router: Any, queries: Sequence[str], sample: int = 64) -> float:
    """Milliseconds per query to route a batch of up to `sample` queries end to end, cache off."""
    texts = list(queries)[:sample]
    cache_dir = getattr(router, "cache_dir", None)
    try:
        if hasattr(router, "cache_dir"):
            router.cache_dir = None
        router.route(texts[:2])  # warm-up: first-call allocations are not routing overhead
        started = time.perf_counter()
        router.route(texts)
        return 1000 * (time.perf_counter() - started) / max(len(texts), 1)
    finally:
        if hasattr(router, "cache_dir"):
            router.cache_dir = cache_dir


# -------------------------------------------------------------------------------- calibration

CalibrationTarget = Literal["cost_share", "budget_usd_per_1k", "quality_share"]


@dataclass(frozen=True)
class Calibration:
    target: str
    value: float
    lambda_: float
    validation: OperatingPoint
    met: bool  # False when no lambda met the target on validation (the closest is returned)


def calibration_grid() -> np.ndarray:
    return np.concatenate([[0.0], np.logspace(-3, 3, 121)])


def calibrate_lambda(predictions: Predictions, outcomes: Outcomes, reference: Reference, cost_scale_usd: float,
                     target: CalibrationTarget, value: float, lambdas: Sequence[float] | None = None) -> Calibration:
    """The lambda that meets a target on validation data.

    cost_share: the best quality whose cost is at most `value` x the reference's cost;
    budget_usd_per_1k: the same with an absolute budget (dollars per 1,000 queries);
    quality_share: the cheapest point whose quality is at least `value` x the reference's.
    """
    if target not in ("cost_share", "budget_usd_per_1k", "quality_share"):
        raise MixLLMError(f"unknown calibration target '{target}'; choose cost_share, budget_usd_per_1k or quality_share")
    if value <= 0:
        raise MixLLMError(f"calibration target value must be > 0, got {value}")
    points = sweep(predictions, outcomes, reference, calibration_grid() if lambdas is None else lambdas, cost_scale_usd)
    if target == "quality_share":
        meeting = [p for p in points if p.quality_share >= value]
        if meeting:
            chosen = min(meeting, key=lambda p: (p.mean_cost_usd, -p.mean_quality))
            return Calibration(target, value, float(chosen.lambda_), chosen, True)
        chosen = max(points, key=lambda p: p.mean_quality)
        return Calibration(target, value, float(chosen.lambda_), chosen, False)
    limit = value * reference.mean_cost_usd if target == "cost_share" else value / 1000.0
    meeting = [p for p in points if p.mean_cost_usd <= limit]
    if meeting:
        chosen = max(meeting, key=lambda p: (p.mean_quality, -p.mean_cost_usd))
        return Calibration(target, value, float(chosen.lambda_), chosen, True)
    chosen = min(points, key=lambda p: p.mean_cost_usd)
    return Calibration(target, value, float(chosen.lambda_), chosen, False)


# ---------------------------------------------------------------------------------- reporting


def results_table(curves: Sequence[RouterCurve], reference: Reference, budget_share: float,
                  quality_share: float) -> pd.DataFrame:
    return pd.DataFrame([c.summary(reference, budget_share, quality_share) for c in curves])


def format_table(table: pd.DataFrame) -> str:
    """The table as GitHub markdown, numbers rounded for people."""
    def fmt(value: Any, digits: int = 2) -> str:
        if value is None or (isinstance(value, float) and not np.isfinite(value)):
            return "–"
        return f"{value:.{digits}f}" if isinstance(value, (float, np.floating)) else str(value)

    columns = [c for c in ("router", "calibrated_quality_pct", "calibrated_cost_pct", "aiq", "quality_at_budget_pct",
                           "least_cost_for_target_pct", "least_cost_for_reference_pct", "best_quality_pct",
                           "best_quality_cost_pct", "ms_per_query")
               if c in table.columns]
    header = "| " + " | ".join(columns) + " |"
    lines = [header, "|" + "|".join("---" for _ in columns) + "|"]
    for row in table[columns].itertuples(index=False):
        lines.append("| " + " | ".join(fmt(v, 4 if c == "aiq" else 2) for v, c in zip(row, columns)) + " |")
    return "\n".join(lines)


def pareto_plot(curves: Sequence[RouterCurve], reference: Reference, single_llm_points: dict[str, OperatingPoint],
                path: Path | str, title: str = "Quality vs cost", budget_share: float | None = None,
                quality_share: float | None = None) -> Path:
    """Every router's hull (and points) and the single LLMs as squares, as shares of the reference;
    dashed lines mark the cost budget and the quality target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
    palette = plt.get_cmap("tab20").colors
    for index, curve in enumerate(c for c in curves if c.sweeps_lambda):
        hull = curve.hull()
        xs = 100 * hull[:, 0] / reference.mean_cost_usd
        ys = 100 * hull[:, 1] / reference.mean_quality
        if index == 0:  # the router under test
            style = {"linewidth": 3.0, "color": "black", "zorder": 5}
        elif curve.name.startswith(curves[0].name):  # its ablations
            style = {"linewidth": 1.2, "linestyle": "--", "color": palette[(2 * index + 1) % len(palette)]}
        else:  # baselines
            style = {"linewidth": 1.4, "color": palette[(2 * index) % len(palette)]}
        line, = ax.plot(xs, ys, marker=".", label=curve.name, **style)
        raw_x = [100 * p.cost_share for p in curve.points]
        raw_y = [100 * p.quality_share for p in curve.points]
        ax.scatter(raw_x, raw_y, s=6, color=line.get_color(), alpha=0.35)
    for llm, point in single_llm_points.items():
        ax.scatter([100 * point.cost_share], [100 * point.quality_share], marker="s", s=30, color="black")
        ax.annotate(llm.split("/")[-1], (100 * point.cost_share, 100 * point.quality_share), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.axhline(100, color="grey", linewidth=0.8, linestyle=":")
    if budget_share is not None:
        ax.axvline(100 * budget_share, color="grey", linewidth=0.8, linestyle="--")
    if quality_share is not None:
        ax.axhline(100 * quality_share, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xscale("log")
    lowest = min([p.cost_share for p in single_llm_points.values()]
                 + [p.cost_share for c in curves for p in c.points if p.cost_share > 0] or [0.01])
    ax.set_xlim(left=100 * lowest * 0.7, right=130)
    ax.set_xlabel(f"cost, % of {reference.llm}")
    ax.set_ylabel(f"quality, % of {reference.llm}")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def curve_records(curves: Sequence[RouterCurve]) -> pd.DataFrame:
    """Every operating point of every router, long format (for DVC plots and MLflow artifacts)."""
    rows = []
    for curve in curves:
        for point in curve.points:
            rows.append({"router": curve.name, "lambda": point.lambda_, "cost_pct": 100 * point.cost_share,
                         "quality_pct": 100 * point.quality_share, "mean_cost_usd": point.mean_cost_usd,
                         "mean_quality": point.mean_quality})
    return pd.DataFrame(rows)


def to_jsonable(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return to_jsonable(asdict(value))
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value

"""Evaluation results for people: the results table, the Pareto plot, and JSON-ready records."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mixllm.evaluation.evaluate import OperatingPoint, Reference, RouterCurve


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

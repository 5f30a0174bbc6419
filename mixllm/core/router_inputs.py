"""What the router accepts: checks on queries, task labels, numbers and interaction logs, each
failing with a RoutingError that says what to send instead (the service turns it into a 4xx)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from mixllm.core.errors import RoutingError

if TYPE_CHECKING:  # pandas is imported where a frame is made: a service start (logs, router, a route) never needs it
    import pandas as pd


def check_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise RoutingError(f"{name} must be a number >= 0, got {value!r}", field=name)
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise RoutingError(f"{name} must be a finite number >= 0, got {value}", field=name)
    return value


def check_queries(queries: Sequence[str]) -> list[str]:
    if isinstance(queries, str):
        raise RoutingError("queries must be a list of strings; wrap a single query in a list")
    queries = list(queries)
    if not queries:
        raise RoutingError("no queries given")
    for i, query in enumerate(queries):
        if not isinstance(query, str):
            raise RoutingError(f"query {i} must be text, got {type(query).__name__}")
        if not query.strip():
            raise RoutingError(f"query {i} is empty; send the text to route")
    return queries


def check_tasks(tasks: Sequence[str | None] | None, n: int) -> list[str | None] | None:
    if tasks is None:
        return None
    if isinstance(tasks, str):
        raise RoutingError("tasks must be a list (one label or None per query); wrap a single task in a list")
    tasks = list(tasks)
    if len(tasks) != n:
        raise RoutingError(f"got {len(tasks)} tasks for {n} queries; give one (or None) per query")
    for i, task in enumerate(tasks):
        if task is not None and not isinstance(task, str):
            raise RoutingError(f"task {i} must be text or None, got {type(task).__name__}")
    return [task if task else None for task in tasks]


def check_log(log: pd.DataFrame, need_query_id: bool = True, allow_missing_cost: bool = False) -> pd.DataFrame:
    needed = ["query", "llm", "quality", "cost_usd"] + (["query_id"] if need_query_id else [])
    missing = [c for c in needed if c not in log.columns]
    if missing:
        raise RoutingError(f"interactions need column(s) {', '.join(missing)}")
    if log.empty:
        raise RoutingError("no interactions given")
    import pandas as pd

    quality = pd.to_numeric(log["quality"], errors="coerce")
    cost = pd.to_numeric(log["cost_usd"], errors="coerce")
    missing_cost = log["cost_usd"].isna()  # unknown; anything else must be a finite number
    bad_cost = (~np.isfinite(cost) & ~missing_cost) | (missing_cost & (not allow_missing_cost))
    if not np.isfinite(quality).all() or bad_cost.any():
        raise RoutingError("interactions have a missing or non-finite quality or cost; validate them with mixllm.io.data first")
    check_queries(log["query"].tolist())
    return log.reset_index(drop=True)


def token_columns(rows: pd.DataFrame) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The rows' input and output token counts, when the log has them (else both None)."""
    if "input_tokens" in rows and "output_tokens" in rows and rows["output_tokens"].notna().any():
        return rows["input_tokens"].to_numpy(dtype=float), rows["output_tokens"].to_numpy(dtype=float)
    return None, None

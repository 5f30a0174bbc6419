"""Formulas the library shares, each in one place: a call's price, tokens from characters, and the
long log pivoted into (query x LLM) tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:  # pandas is imported where a frame is made: a service start (logs, router, a route) never needs it
    import pandas as pd

# Tokens in English text, roughly: one per four characters (OpenAI's rule of thumb). Used only when
# a log or a response gives no token counts.
CHARS_PER_TOKEN = 4.0
# Output tokens assumed for an LLM whose log has neither token counts nor responses.
DEFAULT_OUTPUT_TOKENS = 100.0


def call_cost_usd(input_tokens: Any, output_tokens: Any, input_usd_per_1k: float, output_usd_per_1k: float) -> Any:
    """Dollars for a call from its tokens and the catalogue's prices per 1,000 tokens (arrays work too)."""
    return (input_tokens * input_usd_per_1k + output_tokens * output_usd_per_1k) / 1000.0


def tokens_from_chars(chars: Any) -> Any:
    """Estimated tokens in a text of `chars` characters (arrays work too)."""
    return chars / CHARS_PER_TOKEN


def outcome_tables(log: pd.DataFrame, llms: Sequence[str] | None = None,
                   query_ids: Sequence[Any] | None = None,
                   repeats: Literal["first", "mean"] = "first") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(quality, cost) as query_id x llm tables from a long log; missing pairs are NaN. A (query,
    LLM) pair logged more than once counts by its first row (evaluation: one outcome per pair) or
    by the mean of its rows (training: every observation teaches). `llms` / `query_ids` fix the
    columns / rows and their order."""
    quality = log.pivot_table(index="query_id", columns="llm", values="quality", aggfunc=repeats)
    cost = log.pivot_table(index="query_id", columns="llm", values="cost_usd", aggfunc=repeats)
    if llms is not None:
        quality, cost = quality.reindex(columns=list(llms)), cost.reindex(columns=list(llms))
    if query_ids is not None:
        quality, cost = quality.reindex(index=list(query_ids)), cost.reindex(index=list(query_ids))
    return quality, cost


def output_tokens_table(log: pd.DataFrame, query_ids: Sequence[Any], llms: Sequence[str]) -> np.ndarray:
    """Output tokens per (query, LLM): logged tokens, else response characters / 4, else 100."""
    if "output_tokens" in log and log["output_tokens"].notna().any():
        values = log.pivot_table(index="query_id", columns="llm", values="output_tokens", aggfunc="first")
    elif "response" in log and log["response"].notna().any():
        frame = log.assign(_tokens=tokens_from_chars(log["response"].fillna("").str.len()))
        values = frame.pivot_table(index="query_id", columns="llm", values="_tokens", aggfunc="first")
    else:
        return np.full((len(query_ids), len(llms)), DEFAULT_OUTPUT_TOKENS)
    return values.reindex(index=list(query_ids), columns=list(llms)).fillna(DEFAULT_OUTPUT_TOKENS).to_numpy(dtype=float)


def typical_output_tokens(rows: pd.DataFrame) -> float:
    """Mean output tokens of one LLM's rows: logged tokens, else response characters / 4, else 100."""
    if "output_tokens" in rows and rows["output_tokens"].notna().any():
        return float(rows["output_tokens"].mean())
    if "response" in rows and rows["response"].notna().any():
        return float(tokens_from_chars(rows["response"].dropna().str.len().mean()))
    return DEFAULT_OUTPUT_TOKENS

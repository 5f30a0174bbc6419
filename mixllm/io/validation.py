"""Row checks on interaction logs: every row is accepted (typed) or quarantined with all its
reasons; values past the plausibility limits (data.limits) are mistakes, not measurements."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pandera.pandas as pa

from mixllm.config import PlausibilityConfig
from mixllm.core.errors import DataError
from mixllm.core.schemas import (
    COLUMN_ALIASES,
    FEEDBACK_KINDS,
    INTERACTION_COLUMNS,
    KEY_COLUMNS,
    NUMERIC_COLUMNS,
    REQUIRED_COLUMNS,
    TEXT_COLUMNS,
    is_blank,
)
from mixllm.io.readers import ORIGIN

logger = logging.getLogger(__name__)

_MISSING_TEXT = {"", "nan", "NaN", "NAN", "NA", "N/A", "null", "NULL", "None", "none"}
_SURROGATE = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8, kept by surrogateescape
_VALUE_COLUMNS = tuple(c for c in INTERACTION_COLUMNS if c not in KEY_COLUMNS)

# --------------------------------------------------------------------------------------------
# Validation


def normalise_columns(frame: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    renames = {
        alias: target
        for alias, target in COLUMN_ALIASES.items()
        if alias in frame.columns and target not in frame.columns
    }
    frame = frame.rename(columns=renames)
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing and len(frame.columns) <= 2:  # one real column (plus the origin tag): another delimiter?
        header = str(frame.columns[0])
        for delimiter, name in ((";", "semicolons"), ("\t", "tabs"), ("|", "pipes")):
            if delimiter in header:
                raise DataError(f"the log's header is one column with {name} in it ({header[:80]!r}): CSV logs "
                                "must be comma-separated; re-save it with commas, or as JSONL or Parquet")
    if missing:
        raise DataError(
            f"log has no column(s) {', '.join(missing)}; an interaction log needs "
            f"{', '.join(REQUIRED_COLUMNS)} (found: {', '.join(map(str, frame.columns))})"
        )
    ignored = [c for c in frame.columns if c not in INTERACTION_COLUMNS and c != ORIGIN]
    frame = frame.reindex(columns=[ORIGIN, *INTERACTION_COLUMNS])
    return frame, ignored


def _as_text(value: Any) -> Any:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, (list, dict, tuple, set)):
        return value  # flagged as bad_type below
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="surrogateescape")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _looks_missing(value: Any) -> bool:
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return True
    return isinstance(value, str) and value.strip() in _MISSING_TEXT


def _normalise_split(value: Any) -> Any:
    if value is None:
        return None
    text = str(value).strip().lower()
    if "test" in text or text == "holdout":  # RouterDC's "test/train" duplicates are held out
        return "holdout"
    if text in ("val", "valid", "validation", "dev"):
        return "validation"
    if text == "train":
        return "train"
    return None


def implausible_values(limits: PlausibilityConfig, **values: float | None) -> dict[str, str]:
    """The given numbers (cost_usd, latency_s, input_tokens, output_tokens; None = not given) that
    are not finite or lie past `limits`, each with a message that names the setting. The service's
    /feedback answers 400 with these; imports quarantine with the same bounds (_interaction_schema)."""
    bounds = {"cost_usd": ("max_cost_usd", limits.max_cost_usd), "latency_s": ("max_latency_s", limits.max_latency_s),
              "input_tokens": ("max_tokens", limits.max_tokens), "output_tokens": ("max_tokens", limits.max_tokens)}
    problems = {}
    for name, value in values.items():
        if value is None:
            continue
        setting, bound = bounds[name]
        if not math.isfinite(value) or value > bound:
            problems[name] = (f"{name}={value!r} is not plausible for one call (limit {bound:g}, "
                              f"data.limits.{setting} in params.yaml)")
    return problems


def _interaction_schema(known_llms: Collection[str] | None, max_query_chars: int,
                        limits: PlausibilityConfig) -> pa.DataFrameSchema:
    """Per-row checks; each check's `error` is the reason code a failing row is quarantined with."""

    def text_column(*checks: pa.Check, nullable: bool = False) -> pa.Column:
        return pa.Column(object, checks=list(checks), nullable=nullable, coerce=False)

    def number_column(*checks: pa.Check, nullable: bool) -> pa.Column:
        return pa.Column(float, checks=list(checks), nullable=nullable, coerce=False)

    plausible_tokens = [pa.Check(lambda s: np.isfinite(s) & (s <= limits.max_tokens), error="tokens_implausible")]
    llm_checks = []
    if known_llms is not None:
        llm_checks.append(pa.Check.isin(sorted(known_llms), error="unknown_llm"))
    return pa.DataFrameSchema(
        {
            "query_id": text_column(pa.Check(lambda s: s.str.strip().str.len() > 0, error="empty_query_id")),
            "query": text_column(
                pa.Check(lambda s: ~s.map(is_blank).astype(bool), error="empty_query"),
                pa.Check(lambda s: s.str.len() <= max_query_chars, error="query_too_long"),
            ),
            "llm": text_column(pa.Check(lambda s: s.str.strip().str.len() > 0, error="empty_llm"), *llm_checks),
            "quality": number_column(pa.Check.in_range(0.0, 1.0, error="quality_out_of_range"), nullable=False),
            "cost_usd": number_column(
                pa.Check.ge(0.0, error="negative_cost"),
                pa.Check(lambda s: np.isfinite(s), error="cost_not_finite"),
                pa.Check(lambda s: ~np.isfinite(s) | (s <= limits.max_cost_usd), error="cost_implausible"),
                nullable=False,
            ),
            "latency_s": number_column(
                pa.Check.ge(0.0, error="negative_latency"),
                pa.Check(lambda s: np.isfinite(s) & (s <= limits.max_latency_s), error="latency_implausible"),
                nullable=True,
            ),
            "input_tokens": number_column(pa.Check.ge(0.0, error="negative_tokens"), *plausible_tokens, nullable=True),
            "output_tokens": number_column(pa.Check.ge(0.0, error="negative_tokens"), *plausible_tokens, nullable=True),
            "feedback": text_column(pa.Check.isin(list(FEEDBACK_KINDS), error="unknown_feedback_kind"), nullable=True),
        },
        strict=False,
    )


def _row_hash(frame: pd.DataFrame) -> pd.Series:
    """A content hash per row over every value column, to tell a repeat from a conflict."""
    values = frame.reindex(columns=list(_VALUE_COLUMNS)).astype(object).where(lambda f: f.notna(), None)
    hashes = [
        hashlib.blake2b(json.dumps(row, default=str).encode("utf-8", "surrogateescape"), digest_size=12).hexdigest()
        for row in values.itertuples(index=False, name=None)
    ]
    return pd.Series(hashes, index=frame.index, dtype=object)


@dataclass
class ValidationResult:
    accepted: pd.DataFrame
    quarantined: pd.DataFrame  # the offending rows with `reasons` (;-joined codes) and `detail`

    def reason_counts(self) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for reasons in self.quarantined.get("reasons", pd.Series(dtype=object)):
            counts.update(str(reasons).split(";"))
        return dict(sorted(counts.items()))


def validate_interactions(
    frame: pd.DataFrame,
    known_llms: Collection[str] | None = None,
    max_query_chars: int = 100_000,
    limits: PlausibilityConfig | None = None,
) -> ValidationResult:
    """Check every row; return accepted rows (typed) and quarantined rows with all their reasons.

    Reasons: missing_value, bad_type, non_utf8_text, empty_query(_id), query_too_long, empty_llm,
    unknown_llm, quality_out_of_range, binary_quality_not_0_or_1, negative_cost, cost_not_finite,
    cost_implausible, negative_latency, latency_implausible, negative_tokens, tokens_implausible
    (the implausible ones: past `limits`, data.limits), unknown_feedback_kind, bad_timestamp,
    duplicate_row, conflicting_duplicate.
    """
    if ORIGIN not in frame.columns:
        frame = frame.copy()
        frame[ORIGIN] = [f"row:{i + 1}" for i in range(len(frame))]
    original = frame.copy()
    frame, _ = normalise_columns(frame.reset_index(drop=True))
    original = original.reset_index(drop=True)
    reasons: dict[int, list[str]] = {}
    details: dict[int, list[str]] = {}

    def flag(mask: pd.Series | np.ndarray, reason: str, describe: Any) -> None:
        for index in np.flatnonzero(np.asarray(mask, dtype=bool)):
            reasons.setdefault(int(index), [])
            if reason not in reasons[int(index)]:
                reasons[int(index)].append(reason)
                details.setdefault(int(index), []).append(describe(int(index)))

    # Text columns: to str, flag structured values and bytes that were not UTF-8.
    for column in TEXT_COLUMNS:
        # Plain lists, not Series.map: pandas would infer Arrow strings, which refuse surrogates.
        values = [_as_text(v) for v in frame[column]]
        structured = np.array([isinstance(v, (list, dict, tuple, set)) for v in values], dtype=bool)
        flag(structured, "bad_type", lambda i, c=column, v=values: f"{c} must be text, got {type(v[i]).__name__}")
        values = [None if bad else v for v, bad in zip(values, structured)]
        not_utf8 = [isinstance(v, str) and bool(_SURROGATE.search(v)) for v in values]
        flag(not_utf8, "non_utf8_text", lambda i, c=column: f"{c} holds bytes that are not UTF-8")
        frame[column] = pd.Series(values, index=frame.index, dtype=object)
    # Numbers: missing vs not-a-number are different mistakes.
    for column in NUMERIC_COLUMNS:
        raw = frame[column]
        numbers = pd.to_numeric(raw, errors="coerce").astype(float)
        looks_missing = raw.map(_looks_missing).astype(bool)
        bad = numbers.isna() & ~looks_missing
        flag(bad, "bad_type", lambda i, c=column: f"{c}={raw[i]!r} is not a number")
        frame[column] = numbers
    for column in REQUIRED_COLUMNS:
        missing = frame[column].isna() & ~pd.Series([("bad_type" in reasons.get(i, [])) for i in range(len(frame))])
        flag(missing, "missing_value", lambda i, c=column: f"{c} is missing (empty or NaN)")
    # The schema: each failing check names its reason via `error`.
    schema = _interaction_schema(known_llms, max_query_chars, limits or PlausibilityConfig())
    try:
        schema.validate(frame, lazy=True)
    except pa.errors.SchemaErrors as errors:
        cases = errors.failure_cases
        for case in cases.itertuples(index=False):
            if case.index is None or pd.isna(case.index):
                continue
            check = str(case.check)
            if check in ("not_nullable",) or check.startswith("dtype(") or check.startswith("coerce_dtype("):
                continue  # already reported as missing_value / bad_type above
            index = int(case.index)
            column = str(case.column)
            flag(
                np.arange(len(frame)) == index,
                check,
                lambda i, c=column, v=case.failure_case: f"{check}: {c}={v!r}",
            )
    # Binary feedback is a thumbs up or down.
    binary = (frame["feedback"] == "binary") & frame["quality"].notna() & ~frame["quality"].isin([0.0, 1.0])
    flag(binary, "binary_quality_not_0_or_1", lambda i: f"feedback=binary needs quality 0 or 1, got {frame['quality'][i]}")
    # Timestamps, when given, must parse.
    stamps = pd.to_datetime(frame["timestamp"].astype(object), errors="coerce", utc=True, format="mixed")
    bad_stamp = stamps.isna() & frame["timestamp"].notna()
    flag(bad_stamp, "bad_timestamp", lambda i: f"timestamp={frame['timestamp'][i]!r} is not a date-time")
    frame["timestamp"] = stamps
    frame["split"] = frame["split"].map(_normalise_split)
    frame["feedback"] = frame["feedback"].where(frame["feedback"].notna(), "refined")

    # Duplicate keys among otherwise good rows: an exact repeat keeps its first copy; rows that
    # disagree cannot both be true, so all of them wait in quarantine for a person.
    good = np.array([i not in reasons for i in range(len(frame))], dtype=bool)
    frame["row_hash"] = _row_hash(frame)
    candidates = frame.loc[good]
    # Only keys that repeat are grouped: iterating over every row's group took 1.5 s of a 35k-row ingest.
    candidates = candidates.loc[candidates.duplicated(list(KEY_COLUMNS), keep=False)]
    keyed = candidates.groupby(list(KEY_COLUMNS), sort=False, dropna=False)
    for _, group in keyed:
        if len(group) < 2:
            continue
        first_origin = frame.loc[group.index[0], ORIGIN]
        if group["row_hash"].nunique() == 1:
            flag(frame.index.isin(group.index[1:]), "duplicate_row", lambda i: f"repeats {first_origin}")
        else:
            origins = ", ".join(frame.loc[group.index, ORIGIN].astype(str))
            flag(frame.index.isin(group.index), "conflicting_duplicate",
                 lambda i: f"same query_id and llm with different values in {origins}")

    bad_index = sorted(reasons)
    accepted = frame.drop(index=bad_index).reset_index(drop=True)
    accepted["query_id"] = accepted["query_id"].astype(str)
    quarantined = original.iloc[bad_index].copy()
    quarantined["reasons"] = [";".join(reasons[i]) for i in bad_index]
    quarantined["detail"] = ["; ".join(details[i]) for i in bad_index]
    return ValidationResult(accepted=accepted, quarantined=quarantined.reset_index(drop=True))

"""Interaction logs in, validated, quarantined, stored; and the split by query.

Every row read ends up in exactly one place: accepted into the store, recognised as already
stored, or quarantined with its reasons. Nothing is dropped silently.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pandera.pandas as pa

from mixllm.config import ROUTERBENCH_ENV, MixLLMConfig, PlausibilityConfig, SplitConfig
from mixllm.errors import DataError, DataUnavailableError, MixLLMError
from mixllm.schemas import (
    COLUMN_ALIASES,
    FEEDBACK_KINDS,
    INTERACTION_COLUMNS,
    KEY_COLUMNS,
    NUMERIC_COLUMNS,
    REQUIRED_COLUMNS,
    TEXT_COLUMNS,
    IngestReport,
    is_blank,
)

logger = logging.getLogger(__name__)

ORIGIN = "_origin"  # "file:row" of each raw row, so a quarantined row can be found in its source
SUPPORTED_SUFFIXES = (".csv", ".csv.gz", ".jsonl", ".jsonl.gz", ".ndjson", ".parquet", ".pkl", ".pkl.gz")
_MISSING_TEXT = {"", "nan", "NaN", "NAN", "NA", "N/A", "null", "NULL", "None", "none"}
_SURROGATE = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8, kept by surrogateescape
_VALUE_COLUMNS = tuple(c for c in INTERACTION_COLUMNS if c not in KEY_COLUMNS)


# --------------------------------------------------------------------------------------------
# Reading


@dataclass
class RawLog:
    """Rows as read from one file or folder, before validation, plus what the reader rejected."""

    frame: pd.DataFrame
    format: str
    rejected: list[dict[str, Any]] = field(default_factory=list)
    missing_cells: int = 0
    merged_prompt_ids: list[str] = field(default_factory=list)
    ignored_columns: list[str] = field(default_factory=list)


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return None


def _read_csv(path: Path) -> pd.DataFrame:
    # Everything as text first (types are checked per row later); only empty cells are missing,
    # so a query that reads "NA" stays a query. surrogateescape keeps undecodable bytes visible.
    # dtype=object, not str: pandas' Arrow strings refuse the surrogates that mark non-UTF-8 bytes.
    return pd.read_csv(
        path,
        dtype=object,
        keep_default_na=False,
        na_values=[""],
        encoding="utf-8",
        encoding_errors="surrogateescape",
    )


def _read_jsonl(path: Path) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    import gzip

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    records: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    with opener(path, "rb") as handle:
        for line_number, raw_line in enumerate(handle, start=1):
            if not raw_line.strip():
                continue
            origin = f"{path.name}:{line_number}"
            try:
                text = raw_line.decode("utf-8")
            except UnicodeDecodeError as error:
                rejected.append(
                    {ORIGIN: origin, "reasons": "non_utf8_text", "detail": f"line is not UTF-8 ({error.reason})",
                     "raw": raw_line.decode("utf-8", errors="backslashreplace").rstrip("\n")}
                )
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                rejected.append(
                    {ORIGIN: origin, "reasons": "malformed_record", "detail": f"not JSON: {error.msg}",
                     "raw": text.rstrip("\n")}
                )
                continue
            if not isinstance(record, dict):
                rejected.append(
                    {ORIGIN: origin, "reasons": "malformed_record",
                     "detail": f"a line must hold a JSON object, got {type(record).__name__}", "raw": text.rstrip("\n")}
                )
                continue
            record[ORIGIN] = origin
            records.append(record)
    frame = pd.DataFrame.from_records(records) if records else pd.DataFrame(columns=[ORIGIN])
    return frame, rejected


def _parse_list_repr(value: Any) -> Any:
    """RouterBench stores prompts and responses as the repr of a list of strings; join the parts."""
    if not isinstance(value, str) or not value.startswith("["):
        return value
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return value
    if isinstance(parsed, list) and all(isinstance(part, str) for part in parsed):
        return "\n".join(parsed)
    return value


def is_routerbench_wide(frame: pd.DataFrame) -> bool:
    columns = set(frame.columns)
    return "prompt" in columns and "sample_id" in columns and any(c.endswith("|total_cost") for c in columns)


def routerbench_models(frame: pd.DataFrame) -> list[str]:
    """Models of a wide RouterBench frame: those with both a quality and a total_cost column."""
    return [c[: -len("|total_cost")] for c in frame.columns if c.endswith("|total_cost") and c[: -len("|total_cost")] in frame.columns]


def routerbench_wide_to_long(frame: pd.DataFrame) -> RawLog:
    """One row per (prompt, model) from RouterBench's one-row-per-prompt layout.

    Rule for a `sample_id` spread over several rows (RouterBench 0-shot has 14 such ARC prompts:
    one row holds only gpt-3.5-turbo-1106's result, for a prompt with the question doubled, the
    other row the remaining models): when the rows' models do not overlap they are merged into one
    query whose text is that of the row carrying the most models, each model keeping its own
    result; the merged ids are reported. A merged prompt with a row in a test file is held out. A
    model present in two rows is a conflict: both cells are quarantined. An empty model cell means
    the model was not run: no interaction, counted as a missing cell, not an error.
    """
    models = routerbench_models(frame)
    if not models:
        raise DataError("RouterBench wide data needs '<model>' and '<model>|total_cost' columns; found none")
    records = frame.astype(object).where(frame.notna(), None).to_dict(orient="records")
    groups: dict[Any, list[int]] = {}
    for position, record in enumerate(records):
        groups.setdefault(record["sample_id"], []).append(position)
    rows: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    merged_ids: list[str] = []
    missing_cells = 0
    for sample_id, positions in groups.items():
        carriers = {p: [m for m in models if records[p].get(m) is not None] for p in positions}
        main = records[max(positions, key=lambda p: (len(carriers[p]), -p))]
        splits = {str(records[p]["split"]) for p in positions if records[p].get("split") is not None}
        split = "test" if any("test" in s for s in splits) else next(iter(sorted(splits)), None)
        if len(positions) > 1:
            merged_ids.append(str(sample_id))
        for model in models:
            holders = [p for p in positions if model in carriers[p]]
            missing_cells += len(positions) - len(holders)
            for p in holders:
                source_row = records[p]
                record = {
                    ORIGIN: f"{source_row[ORIGIN]}:{model}",
                    "query_id": sample_id,
                    "query": _parse_list_repr(main["prompt"]),
                    "llm": model,
                    "quality": source_row[model],
                    "cost_usd": source_row.get(f"{model}|total_cost"),
                    "response": _parse_list_repr(source_row.get(f"{model}|model_response")),
                    "source": source_row.get("eval_name"),
                    "split": split,
                }
                if len(holders) > 1:
                    rejected.append(
                        {**record, "reasons": "conflicting_duplicate",
                         "detail": f"{model} has results in {len(holders)} rows of sample_id {sample_id}"}
                    )
                else:
                    rows.append(record)
    if merged_ids:
        logger.info("merged %d RouterBench prompts spread over two rows: %s", len(merged_ids), merged_ids)
    long = pd.DataFrame.from_records(rows) if rows else pd.DataFrame(columns=[ORIGIN, *REQUIRED_COLUMNS])
    return RawLog(long, "routerbench-wide", rejected, missing_cells, merged_ids)


def _split_hint_from_filename(path: Path) -> str | None:
    stem = path.name.lower()
    for part in ("train", "test", "validation"):
        if re.search(rf"(^|[_.-]){part}([_.-]|$)", stem):
            return part
    return None


def _read_table(path: Path) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """The raw table of one file, every row tagged with its origin, plus rows unreadable as records.
    A file that cannot be read as a table at all (empty, truncated, not the format its name says)
    is refused whole with one line saying what is wrong: nothing of it is stored."""
    import zlib

    try:
        return _read_table_unchecked(path)
    except MixLLMError:
        raise  # already says what is wrong
    except pd.errors.EmptyDataError:
        raise DataError(f"{path} is empty: no header row and no interactions; nothing was imported") from None
    except (EOFError, OSError, zlib.error) as error:
        raise DataError(f"cannot read {path}: the file is truncated or not what its name says ({error}); "
                        "nothing was imported") from None
    except ValueError as error:  # pandas' ParserError, UnicodeDecodeError, a bad Parquet file
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"cannot read {path} as a {_suffix(path)} log: {first_line}; nothing was imported") from None


def _read_table_unchecked(path: Path) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    suffix = _suffix(path)
    rejected: list[dict[str, Any]] = []
    if suffix in (".csv", ".csv.gz"):
        frame = _read_csv(path)
    elif suffix in (".jsonl", ".jsonl.gz", ".ndjson"):
        frame, rejected = _read_jsonl(path)
    elif suffix == ".parquet":
        frame = pd.read_parquet(path)
    elif suffix in (".pkl", ".pkl.gz"):
        # Pickle runs code when loaded: only open RouterBench copies you trust.
        frame = pd.read_pickle(path)
        if not isinstance(frame, pd.DataFrame):
            raise DataError(f"{path} holds a {type(frame).__name__}, expected a pandas DataFrame (RouterBench .pkl)")
    else:
        raise DataError(f"cannot read {path}: unsupported file type; use one of {', '.join(SUPPORTED_SUFFIXES)}")
    if ORIGIN not in frame.columns:
        frame = frame.reset_index(drop=True)
        frame[ORIGIN] = [f"{path.name}:{i + 1}" for i in range(len(frame))]
    if is_routerbench_wide(frame) and "split" not in frame.columns:
        frame["split"] = _split_hint_from_filename(path)
    return frame, rejected


def read_log(path: Path | str) -> RawLog:
    """Read a long interaction log or RouterBench wide data (.csv/.csv.gz/.jsonl/.parquet/.pkl, or a folder).

    A folder's files are read together, so RouterBench prompts split over a train and a test file
    are merged like those split within one file.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataUnavailableError(f"{path} does not exist; pass an interaction log file or a folder of them")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and _suffix(p))
        if not files:
            raise DataError(f"folder {path} holds no readable logs ({', '.join(SUPPORTED_SUFFIXES)})")
    else:
        files = [path]
    tables = [_read_table(p) for p in files]
    wide = [is_routerbench_wide(frame) for frame, _ in tables]
    rejected = [r for _, rows in tables for r in rows]
    frames = [frame for frame, _ in tables]
    if any(wide) and not all(wide):
        raise DataError(f"{path} mixes RouterBench wide files with long logs; import them separately")
    if all(wide):
        raw = routerbench_wide_to_long(pd.concat(frames, ignore_index=True))
        raw.rejected = rejected + raw.rejected
        return raw
    format_name = "folder" if path.is_dir() else (_suffix(path) or "").lstrip(".").replace(".gz", "")
    return RawLog(pd.concat(frames, ignore_index=True), format_name, rejected)


# --------------------------------------------------------------------------------------------
# Validation


def _normalise_columns(frame: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
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
    frame, _ = _normalise_columns(frame.reset_index(drop=True))
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


# --------------------------------------------------------------------------------------------
# The store


class InteractionStore:
    """Accepted interactions as a Parquet dataset: one immutable part file per ingest batch.

    Keyed by (query_id, llm). A row already stored with the same content is recognised and not
    written again, which makes re-ingesting a file a no-op; a row whose key is stored with
    different content is a conflict and is quarantined, never overwritten.
    """

    def __init__(self, root: Path | str):
        self.root = Path(root)

    def parts(self) -> list[Path]:
        return sorted(self.root.glob("part-*.parquet")) if self.root.is_dir() else []

    def read(self) -> pd.DataFrame:
        parts = self.parts()
        if not parts:
            return pd.DataFrame(columns=[*INTERACTION_COLUMNS, "row_hash"])
        return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)

    def stored_hashes(self) -> pd.DataFrame:
        parts = self.parts()
        if not parts:
            return pd.DataFrame(columns=[*KEY_COLUMNS, "row_hash"])
        return pd.concat(
            [pd.read_parquet(p, columns=[*KEY_COLUMNS, "row_hash"]) for p in parts], ignore_index=True
        )

    def append(self, frame: pd.DataFrame) -> Path | None:
        """Write `frame` as a new part; the name is its content hash, so a retry rewrites the same file."""
        if frame.empty:
            return None
        self.root.mkdir(parents=True, exist_ok=True)
        digest = hashlib.blake2b("".join(frame["row_hash"]).encode(), digest_size=10).hexdigest()
        path = self.root / f"part-{digest}.parquet"
        tmp = path.with_suffix(".parquet.tmp")
        frame.reindex(columns=[*INTERACTION_COLUMNS, "row_hash"]).to_parquet(tmp, index=False)
        os.replace(tmp, path)
        return path


def _write_quarantine(rows: pd.DataFrame, folder: Path, stem: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        for record in rows.astype(object).where(rows.notna(), None).to_dict(orient="records"):
            # ensure_ascii keeps undecodable bytes (surrogates) writable and visible as \udcXX.
            handle.write(json.dumps(record, default=str, ensure_ascii=True) + "\n")
    return path


def ingest(path: Path | str, config: MixLLMConfig) -> IngestReport:
    """Read a log, validate every row, store the good ones, quarantine the rest, report the counts."""
    path = Path(path).expanduser()
    raw = read_log(path)
    if raw.frame.empty and len(raw.frame.columns) <= 1:
        raw.frame = pd.DataFrame(columns=[ORIGIN, *REQUIRED_COLUMNS])
    frame, ignored = _normalise_columns(raw.frame)
    if ignored:
        logger.info("ignoring columns that are not part of an interaction: %s", ", ".join(ignored))
    known = config.llm_names or None
    result = validate_interactions(frame, known, config.data.max_query_chars, config.data.limits)
    store = InteractionStore(config.path(config.data.store_dir))
    stored = store.stored_hashes()
    accepted = result.accepted
    quarantined = [result.quarantined]
    already = 0
    if not stored.empty and not accepted.empty:
        merged = accepted.merge(stored, on=list(KEY_COLUMNS), how="left", suffixes=("", "_stored"))
        same = (merged["row_hash_stored"] == merged["row_hash"]).to_numpy()
        conflict = (merged["row_hash_stored"].notna() & (merged["row_hash_stored"] != merged["row_hash"])).to_numpy()
        already = int(same.sum())
        if conflict.any():
            clash = accepted[conflict].copy()
            clash["reasons"] = "conflicts_with_store"
            clash["detail"] = "the store already holds this query_id and llm with different values"
            quarantined.append(clash)
        accepted = accepted[~same & ~conflict].reset_index(drop=True)
    if raw.rejected:
        quarantined.insert(0, pd.DataFrame.from_records(raw.rejected))
    quarantined_rows = pd.concat([q for q in quarantined if not q.empty], ignore_index=True) if any(
        not q.empty for q in quarantined
    ) else pd.DataFrame(columns=["reasons"])
    written = store.append(accepted)
    report = IngestReport(
        source=str(path),
        format=raw.format,
        rows_read=len(frame) + len(raw.rejected),
        accepted=len(accepted),
        already_stored=already,
        quarantined=len(quarantined_rows),
        reasons=ValidationResult(accepted, quarantined_rows).reason_counts(),
        queries=int(accepted["query_id"].nunique()) if len(accepted) else 0,
        llms=int(accepted["llm"].nunique()) if len(accepted) else 0,
        missing_cells=raw.missing_cells,
        merged_prompts=len(raw.merged_prompt_ids),
        merged_prompt_ids=list(raw.merged_prompt_ids),
        store_path=str(written) if written else None,
    )
    if len(quarantined_rows):
        stem = f"{path.name}-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}"
        report.quarantine_path = str(_write_quarantine(quarantined_rows, config.path(config.data.quarantine_dir), stem))
    if not report.accounted:
        raise DataError(f"ingest lost track of rows: {report.to_dict()}")  # a bug, never expected
    logger.info(
        "ingested %s: %d read, %d accepted, %d already stored, %d quarantined %s",
        path, report.rows_read, report.accepted, report.already_stored, report.quarantined, report.reasons,
    )
    return report


def pending_sources(config: MixLLMConfig) -> list[Path]:
    """Logs waiting to be ingested: the RouterBench copy (if configured) and every file in the inbox.

    Re-ingesting a file changes nothing, so the training flow can offer them all on every run.
    """
    sources = []
    routerbench = config.routerbench_path()
    if routerbench is not None and routerbench.exists():
        sources.append(routerbench)
    inbox = config.path(config.data.inbox_dir)
    if inbox.is_dir():
        sources.extend(sorted(p for p in inbox.iterdir() if p.is_file() and _suffix(p)))
    return sources


def ingest_pending(config: MixLLMConfig) -> list[IngestReport]:
    """Ingest every pending source; with none and an empty store, say how to supply data."""
    sources = pending_sources(config)
    if not sources and not InteractionStore(config.path(config.data.store_dir)).parts():
        raise DataUnavailableError(
            f"no interaction data: set {ROUTERBENCH_ENV} to a RouterBench copy, put logs in "
            f"{config.path(config.data.inbox_dir)}, or run `mixllm data import PATH`"
        )
    return [ingest(source, config) for source in sources]


def load_interactions(config: MixLLMConfig) -> pd.DataFrame:
    """Every stored interaction; an empty store is an error that says how to fill it."""
    frame = InteractionStore(config.path(config.data.store_dir)).read()
    if frame.empty:
        raise DataUnavailableError(
            f"no interactions in {config.path(config.data.store_dir)}; run `mixllm data import PATH` "
            f"or `mixllm data fetch routerbench` (with {ROUTERBENCH_ENV} set to a local copy) first"
        )
    return frame


# --------------------------------------------------------------------------------------------
# RouterBench


def fetch_routerbench(config: MixLLMConfig, *, timeout_s: float = 60.0) -> Path:
    """The RouterBench file to import: a local copy if one is configured, else a download.

    $MIXLLM_ROUTERBENCH (or data.routerbench_path) may name a .pkl, a wide or long .csv, or a folder
    of RouterBench CSVs; it is used as is and the network is never touched. Otherwise the 0-shot
    pickle is downloaded from the dataset hub into data/raw/.
    """
    local = config.routerbench_path()
    if local is not None:
        if not local.exists():
            raise DataUnavailableError(
                f"{ROUTERBENCH_ENV} / data.routerbench_path points to {local}, which does not exist; "
                "point it at a RouterBench .pkl, .csv or folder of CSVs"
            )
        return local
    import httpx

    target = config.path("data/raw/routerbench_0shot.pkl")
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    url = config.data.routerbench_url
    logger.info("downloading RouterBench from %s", url)
    tmp = target.with_suffix(".part")
    try:
        with httpx.stream("GET", url, follow_redirects=True, timeout=timeout_s) as response:
            response.raise_for_status()
            with tmp.open("wb") as handle:
                for chunk in response.iter_bytes():
                    handle.write(chunk)
    except (httpx.HTTPError, OSError) as error:
        tmp.unlink(missing_ok=True)
        raise DataUnavailableError(
            f"could not download RouterBench from {url} ({error.__class__.__name__}: {error}). "
            f"Offline? Set {ROUTERBENCH_ENV} to a local copy, e.g. "
            f"export {ROUTERBENCH_ENV}=../shared/data/routerbench_subset/routerbench_subset_long.csv.gz, "
            "or download routerbench_0shot.pkl from huggingface.co/datasets/withmartian/routerbench "
            "and point the variable at it"
        ) from None
    os.replace(tmp, target)
    return target


# --------------------------------------------------------------------------------------------
# Split


def stable_unit(seed: int, key: str) -> float:
    digest = hashlib.blake2b(f"{seed}:{key}".encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def normalised_text(text: Any) -> str:
    """The key under which two queries count as the same question: case and spacing ignored."""
    return " ".join(str(text).lower().split())


def _carve(ids: pd.Series, strata: pd.Series, fraction: float, seed: int, groups: pd.Series | None = None) -> set[str]:
    """Take `fraction` of the ids from every stratum, by a seeded hash rank (exact per stratum).

    With `groups`, whole groups are taken (ranked by the group key), so queries sharing a group
    never land on both sides."""
    chosen: set[str] = set()
    if fraction <= 0:
        return chosen
    keys = ids if groups is None else groups
    for _, members in ids.groupby(strata.to_numpy(), sort=True):
        member_keys = keys.loc[members.index]
        ranked = sorted(set(member_keys), key=lambda k: (stable_unit(seed, k), k))
        sizes = member_keys.value_counts()
        target = int(round(fraction * len(members)))
        taken: set[str] = set()
        count = 0
        for key in ranked:
            if count >= target:
                break
            taken.add(key)
            count += int(sizes[key])
        chosen.update(members[member_keys.isin(taken)].tolist())
    return chosen


def split_queries(frame: pd.DataFrame, config: SplitConfig) -> pd.Series:
    """Assign every query_id to train, validation or holdout; all rows of a query share one part.

    Queries with the same normalised text (case and spacing ignored) are one group and share a
    part: a question asked twice must not sit in training and in the holdout (the holdout would
    measure memory). With a split column in the data (config.column) its holdout/test queries
    are the holdout, except those whose text the given train part also holds (moved to train and
    counted in the log), and validation is carved from the rest; otherwise the holdout is carved
    first. Carving is stratified by `config.stratify_by` and seeded, so the same data and seed give
    the same split.
    """
    if frame.empty:
        return pd.Series(dtype=object, name="part")
    per_query = frame.groupby("query_id", sort=True).agg(
        stratum=(config.stratify_by, "first") if config.stratify_by and config.stratify_by in frame else ("query_id", lambda s: "all"),
        given=(config.column, lambda s: _most_held_out(s)) if config.column and config.column in frame else ("query_id", lambda s: None),
        text=("query", "first"),
    )
    ids = pd.Series(per_query.index.astype(str), index=per_query.index)
    strata = per_query["stratum"].fillna("unknown").astype(str)
    groups = per_query["text"].map(normalised_text)
    given = per_query["given"]
    part = pd.Series("train", index=per_query.index, dtype=object, name="part")
    if given.notna().any():
        part[given == "holdout"] = "holdout"
        part[given == "validation"] = "validation"
        seen_outside = set(groups[part != "holdout"])
        leaking = (part == "holdout") & groups.isin(seen_outside)
        if leaking.any():
            logger.warning("%d held-out queries repeat the text of a training query; they join the training part "
                           "so the holdout measures unseen questions", int(leaking.sum()))
            part[leaking] = "train"
        pool = part == "train"
        validation = _carve(ids[pool], strata[pool], config.validation_fraction, config.seed, groups[pool])
    else:
        holdout = _carve(ids, strata, config.holdout_fraction, config.seed, groups)
        part[ids.isin(holdout)] = "holdout"
        pool = part == "train"
        share = config.validation_fraction
        validation = _carve(ids[pool], strata[pool], share, config.seed + 1, groups[pool])
    part[ids.isin(validation) & (part == "train")] = "validation"
    # A text filed under two strata could still straddle parts: its copies follow the one most held out.
    rank = {"train": 0, "validation": 1, "holdout": 2}
    strictest = part.map(rank).groupby(groups.to_numpy()).transform("max")
    return strictest.map({v: k for k, v in rank.items()}).rename("part")


def _most_held_out(values: pd.Series) -> str | None:
    present = set(values.dropna())
    for part in ("holdout", "validation", "train"):
        if part in present:
            return part
    return None


def with_split(frame: pd.DataFrame, config: SplitConfig) -> pd.DataFrame:
    """`frame` with a `part` column (train / validation / holdout) from `split_queries`."""
    parts = split_queries(frame, config)
    return frame.assign(part=frame["query_id"].astype(str).map(parts))


def describe_split(frame: pd.DataFrame) -> pd.DataFrame:
    """Queries per part and stratum, for a person checking the split."""
    queries = frame.drop_duplicates("query_id")
    return queries.groupby(["part", "source"], dropna=False).size().unstack(fill_value=0)


def iter_supported(paths: Iterable[Path]) -> list[Path]:
    return [p for p in paths if _suffix(p)]

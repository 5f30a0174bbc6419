"""Interaction logs from files: CSV, JSON lines, Parquet and RouterBench's wide tables (CSV or pickle),
read into one long frame (one row per query and LLM) with each row's origin, before any checking."""

from __future__ import annotations

import ast
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from mixllm.core.errors import DataError, DataUnavailableError, MixLLMError
from mixllm.core.schemas import REQUIRED_COLUMNS

logger = logging.getLogger(__name__)

ORIGIN = "_origin"  # "file:row" of each raw row, so a quarantined row can be found in its source
SUPPORTED_SUFFIXES = (".csv", ".csv.gz", ".jsonl", ".jsonl.gz", ".ndjson", ".parquet", ".pkl", ".pkl.gz")

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


def file_suffix(path: Path) -> str | None:
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
    if rejected and not records:  # not one record: not a JSON-lines file (binary, or another format)
        raise DataError(f"no line of {path} is a JSON record (line {rejected[0][ORIGIN].rsplit(':', 1)[1]}: "
                        f"{rejected[0]['detail']}): is it a JSON-lines log, one object per line? nothing was imported")
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
    except PermissionError:
        raise DataError(f"cannot read {path}: permission denied; nothing was imported") from None
    except (EOFError, OSError, zlib.error) as error:
        raise DataError(f"cannot read {path}: the file is truncated or not what its name says ({error}); "
                        "nothing was imported") from None
    except ValueError as error:  # pandas' ParserError, UnicodeDecodeError, a bad Parquet file
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"cannot read {path} as a {file_suffix(path)} log: {first_line}; nothing was imported") from None


def _read_table_unchecked(path: Path) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    suffix = file_suffix(path)
    rejected: list[dict[str, Any]] = []
    if suffix in (".csv", ".csv.gz"):
        frame = _read_csv(path)
    elif suffix in (".jsonl", ".jsonl.gz", ".ndjson"):
        frame, rejected = _read_jsonl(path)
    elif suffix == ".parquet":
        frame = pd.read_parquet(path)
    elif suffix in (".pkl", ".pkl.gz"):
        # Pickle runs code when loaded: only open RouterBench copies you trust.
        try:
            frame = pd.read_pickle(path)
        except (OSError, EOFError, MixLLMError):
            raise  # said by _read_table
        except Exception as error:  # noqa: BLE001 - a broken pickle fails in many ways (UnpicklingError, ...)
            raise DataError(f"cannot read {path} as a pickled DataFrame ({type(error).__name__}: "
                            f"{str(error).splitlines()[0] if str(error).strip() else 'no detail'}); "
                            "nothing was imported") from None
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
        files = sorted(p for p in path.iterdir() if p.is_file() and file_suffix(p))
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
    format_name = "folder" if path.is_dir() else (file_suffix(path) or "").lstrip(".").replace(".gz", "")
    return RawLog(pd.concat(frames, ignore_index=True), format_name, rejected)

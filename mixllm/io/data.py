"""Interaction logs in: read (readers.py), validated and quarantined (validation.py), stored as
Parquet parts; fetching RouterBench. Every row read ends up in exactly one place: accepted into the
store, recognised as already stored, or quarantined with its reasons. Nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from mixllm.config import ROUTERBENCH_ENV, MixLLMConfig
from mixllm.core.errors import DataError, DataUnavailableError
from mixllm.core.schemas import INTERACTION_COLUMNS, KEY_COLUMNS, REQUIRED_COLUMNS, IngestReport
from mixllm.io.readers import ORIGIN, file_suffix, read_log
from mixllm.io.scratch_folders import left_by_stopped_process, owned_prefix

from mixllm.io.validation import ValidationResult, normalise_columns, validate_interactions

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# The store


class TrainingStore:
    """The training data: accepted interactions as a Parquet dataset, one immutable part file per
    ingest batch (the live decisions and feedback are `store.InteractionLog`).

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
        self.remove_abandoned_writes()
        # Named after this process, so that what a killed import left half-written can be told
        # from a write still under way in another process, and removed.
        tmp = self.root / f"{path.name}.{owned_prefix('')}writing.tmp"
        frame.reindex(columns=[*INTERACTION_COLUMNS, "row_hash"]).to_parquet(tmp, index=False)
        os.replace(tmp, path)
        return path

    def remove_abandoned_writes(self) -> list[Path]:
        """Remove the half-written parts of imports that were stopped (kill -9, a crash) mid-write.
        Never read (they are not `part-*.parquet`), but each holds a whole batch's size on disk.
        Runs before each write. Parts named `part-*.parquet.tmp` (before the writer's name was in
        them) are left alone: whose they are cannot be told; delete them when no import runs."""
        removed = [tmp for tmp in self.root.glob("part-*.parquet.*.tmp")
                   if left_by_stopped_process(tmp.name.split(".parquet.", 1)[1])]
        for tmp in removed:
            tmp.unlink(missing_ok=True)
        if removed:
            logger.info("removed %d half-written part(s) left by stopped imports in %s", len(removed), self.root)
        return removed


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
    frame, ignored = normalise_columns(raw.frame)
    if ignored:
        logger.info("ignoring columns that are not part of an interaction: %s", ", ".join(ignored))
    known = config.llm_names or None
    result = validate_interactions(frame, known, config.data.max_query_chars, config.data.limits)
    store = TrainingStore(config.path(config.data.store_dir))
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
        sources.extend(sorted(p for p in inbox.iterdir() if p.is_file() and file_suffix(p)))
    return sources


def ingest_pending(config: MixLLMConfig) -> list[IngestReport]:
    """Ingest every pending source; with none and an empty store, say how to supply data."""
    sources = pending_sources(config)
    if not sources and not TrainingStore(config.path(config.data.store_dir)).parts():
        raise DataUnavailableError(
            f"no interaction data: set {ROUTERBENCH_ENV} to a RouterBench copy, put logs in "
            f"{config.path(config.data.inbox_dir)}, or run `mixllm data import PATH`"
        )
    return [ingest(source, config) for source in sources]


def load_interactions(config: MixLLMConfig) -> pd.DataFrame:
    """Every stored interaction; an empty store is an error that says how to fill it."""
    frame = TrainingStore(config.path(config.data.store_dir)).read()
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

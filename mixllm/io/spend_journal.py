"""Answered calls whose spend record the decision log did not take, kept on local disk until it
does: a restart while the database is down loses none of them (memory alone would).

JSON lines, appended and fsynced under an exclusive lock (replicas may share the folder). Each
record carries a record_id: a record written to the database and then found in the journal again
(a crash between the commit and the journal's rewrite, or a replica that replayed another's) is
stored once (calls.record_id is unique; TenantLedger.record_call answers False for a repeat).

Still lost: a record whose process dies after the call was answered and before the first write
attempt failed (the record is journaled only once the database has refused it)."""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# A call record's keys (TenantLedger.record_call's arguments): a line with others, or without the
# required ones, is not replayed (it is kept in the journal and logged).
RECORD_KEYS = frozenset({"tenant", "llm", "cost_usd", "estimated", "decision_id", "model_version",
                         "reference_cost_usd", "router_ms", "attempts", "at", "record_id"})
REQUIRED_KEYS = frozenset({"llm", "cost_usd", "estimated", "at", "record_id"})


class SpendJournal:
    def __init__(self, path: Path):
        self.path = Path(path)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def append(self, record: dict[str, Any]) -> None:
        """Add one record (it must have a record_id); on disk when this returns."""
        line = _line(record) + "\n"
        with self._locked(), open(self.path, "a+", encoding="utf-8") as journal:
            if journal.tell() > 0:  # a crash may have left half a line: never glue a record onto it
                journal.seek(journal.tell() - 1)
                if journal.read(1) != "\n":
                    line = "\n" + line
            journal.write(line)
            journal.flush()
            os.fsync(journal.fileno())

    def reject(self, record: dict[str, Any], reason: str) -> None:
        """Set aside a record the database refused for good (not for being busy), in <journal>.rejected."""
        rejected = self.path.with_name(self.path.name + ".rejected")
        with self._locked(), open(rejected, "a", encoding="utf-8") as out:
            out.write(_line({**record, "rejected_because": reason}) + "\n")
            out.flush()
            os.fsync(out.fileno())

    def pending(self) -> list[dict[str, Any]]:
        """Every record in the journal, oldest first (a line that does not parse is logged and kept)."""
        with self._locked():
            return self._read()[0]

    def remove(self, record_ids: set[str]) -> None:
        """Drop the records now in the database; the others stay (another replica's, say)."""
        if not record_ids:
            return
        with self._locked():
            records, unreadable = self._read()
            kept = [_line(r) for r in records if r["record_id"] not in record_ids]
            kept += unreadable
            if not kept:
                self.path.unlink(missing_ok=True)
                return
            fresh = self.path.with_name(self.path.name + ".tmp")
            with open(fresh, "w", encoding="utf-8") as journal:
                journal.write("\n".join(kept) + "\n")
                journal.flush()
                os.fsync(journal.fileno())
            os.replace(fresh, self.path)

    def _read(self) -> tuple[list[dict[str, Any]], list[str]]:
        if not self.path.is_file():
            return [], []
        records, unreadable = [], []
        for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or set(record) - RECORD_KEYS or REQUIRED_KEYS - set(record):
                    raise ValueError(f"keys must be among {sorted(RECORD_KEYS)}, with {sorted(REQUIRED_KEYS)}")
                record["at"] = datetime.fromisoformat(record["at"])
                if not isinstance(record["record_id"], str):
                    raise ValueError("record_id is not a string")
                records.append(record)
            except (ValueError, KeyError, TypeError) as exc:
                logger.error("%s line %d is not a call record (%s); it is kept there, not written", self.path,
                             number, exc)
                unreadable.append(line)
        return records, unreadable


def _line(record: dict[str, Any]) -> str:
    return json.dumps({**record, "at": record["at"].isoformat()})

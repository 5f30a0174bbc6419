"""Every upstream call the proxy made, answered or not, beside its decision: which LLM, what came
back, how long it took. A failover's story (which LLM failed how before which one answered) is a
query on the decision log, not a search through service logs."""

from __future__ import annotations

import logging
import queue
import threading
import time
from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from mixllm.io.store import InteractionLog, utcnow
from mixllm.io.store_schema import decisions, metadata

logger = logging.getLogger(__name__)

# What an attempt came to: the proxy's outcomes (mixllm_proxy_calls_total's status label).
# refused_request: the upstream refused the request itself (a 400, 413 or 422); cancelled: the call
# was cut off by the server's request timeout or by the caller leaving.
OUTCOMES = ("ok", "upstream_error", "unreachable", "dropped", "refused_request", "cancelled")

attempts = sa.Table(
    "attempts",
    metadata,
    sa.Column("attempt_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("decision_id", sa.String(64), nullable=True, index=True),  # None: a chat that named its LLM
    sa.Column("attempt", sa.Integer, nullable=False),  # 1 for the first call of a request
    sa.Column("llm", sa.String(256), nullable=False),
    sa.Column("outcome", sa.String(32), nullable=False),
    sa.Column("status_code", sa.Integer, nullable=True),  # the upstream's HTTP status, when it answered one
    sa.Column("latency_s", sa.Float, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)


class AttemptLog:
    """`record` writes a row now; `submit` hands it to a background writer (with `background=True`),
    so a request's event loop never waits on the database, least of all during the outages that
    cause failovers. The writer keeps the rows' order; rows still queued when the process dies are
    lost (they describe calls, they are not calls: the decision and the spend are written apart)."""

    def __init__(self, store: InteractionLog, background: bool = False, queue_size: int = 10_000):
        self.store = store
        self.dropped = 0  # rows not queued because the writer was that far behind
        store.create_schema([attempts])
        self._queue: queue.Queue | None = None
        if background:
            self._queue = queue.Queue(maxsize=queue_size)
            threading.Thread(target=self._write_queued, daemon=True, name="mixllm-attempts").start()

    def submit(self, **attempt: Any) -> None:
        if self._queue is None:
            return self.record(**attempt)
        try:
            self._queue.put_nowait(attempt)
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                logger.warning("%d upstream attempts not recorded: the writer is %d rows behind (the decision log "
                               "is slow or down)", self.dropped, self._queue.qsize())

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait up to `timeout_s` until every submitted row is written (or failed and logged);
        True if none is left."""
        deadline = time.monotonic() + timeout_s
        while self._queue is not None and self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return self._queue is None or not self._queue.unfinished_tasks

    def _write_queued(self) -> None:
        assert self._queue is not None
        while True:
            attempt = self._queue.get()
            try:
                self.record(**attempt)
            except Exception as exc:  # noqa: BLE001 - a lost diagnostic row must not stop the writer
                logger.warning("attempt %s of decision %s (%s, %s) not recorded: %s", attempt.get("attempt"),
                               attempt.get("decision_id"), attempt.get("llm"), attempt.get("outcome"), exc)
            finally:
                self._queue.task_done()

    def record(self, *, decision_id: str | None, attempt: int, llm: str, outcome: str, latency_s: float,
               status_code: int | None = None) -> None:
        if outcome not in OUTCOMES:
            raise ValueError(f"an attempt's outcome is one of {', '.join(OUTCOMES)}, not {outcome!r}")
        with self.store.writing() as connection:
            connection.execute(attempts.insert().values(
                decision_id=decision_id, attempt=attempt, llm=llm, outcome=outcome, status_code=status_code,
                latency_s=float(latency_s), created_at=utcnow()))

    def of_decision(self, decision_id: str) -> list[dict[str, Any]]:
        """The decision's upstream calls, first to last."""
        query = (sa.select(attempts).where(attempts.c.decision_id == decision_id)
                 .order_by(attempts.c.attempt, attempts.c.attempt_id))
        with self.store.reading() as connection:
            return [dict(row) for row in connection.execute(query).mappings()]

    def forget_older(self, days: float) -> int:
        """Delete the attempts older than `days` (the decision log's retention) whose decision is
        gone: a decision kept for its feedback keeps the story of its calls."""
        cutoff = utcnow() - timedelta(days=days)
        kept = sa.select(decisions.c.decision_id)
        gone = sa.or_(attempts.c.decision_id.is_(None), attempts.c.decision_id.not_in(kept))
        with self.store.writing() as connection:
            return int(connection.execute(attempts.delete().where(attempts.c.created_at < cutoff, gone)).rowcount)

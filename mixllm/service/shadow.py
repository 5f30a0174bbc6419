"""Shadow routing: a second registered version (the `challenger` alias by default) scores a share
of live traffic beside the champion; its choices are logged, never served. The scoring runs in a
thread of its own after the champion has answered, so it adds nothing to a request's latency;
when it falls behind, queries are dropped from its queue (and counted), never the requests.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from mixllm.io.store import InteractionLog, utcnow
from mixllm.io.store_schema import metadata

if TYPE_CHECKING:  # pandas is imported where a frame is made: a service start (logs, router, a route) never needs it
    import pandas as pd

logger = logging.getLogger("bentoml.mixllm")

shadow_decisions = sa.Table(
    "shadow_decisions",
    metadata,
    sa.Column("shadow_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("decision_id", sa.String(64), nullable=False, index=True),
    sa.Column("model_version", sa.Integer, nullable=False),  # the shadow's version
    sa.Column("llm", sa.String(256), nullable=False),  # what it would have chosen
    sa.Column("served_llm", sa.String(256), nullable=False),  # what the champion chose
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)


class ShadowLog:
    def __init__(self, store: InteractionLog):
        self.store = store
        store.create_schema([shadow_decisions])

    def record(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            with self.store.writing() as connection:
                connection.execute(shadow_decisions.insert(), [{**row, "created_at": utcnow()} for row in rows])

    def agreement(self) -> pd.DataFrame:
        """Per shadow version: decisions scored and the share where it chose what was served."""
        agree = sa.func.sum(sa.case((shadow_decisions.c.llm == shadow_decisions.c.served_llm, 1), else_=0))
        query = (sa.select(shadow_decisions.c.model_version, sa.func.count().label("decisions"), agree.label("agreed"))
                 .group_by(shadow_decisions.c.model_version))
        with self.store.reading() as connection:
            rows = connection.execute(query).mappings().all()
        import pandas as pd

        return pd.DataFrame(rows, columns=["model_version", "decisions", "agreed"])


class ShadowScorer:
    """The shadow version and its worker: `offer` (from the request path) samples a share of the
    champion's decisions onto a bounded queue; the worker routes them with the shadow and logs."""

    def __init__(self, log: ShadowLog, share: float, queue_size: int = 10_000, seed: int | None = None):
        self.log, self.share = log, share
        self.router: Any = None
        self.version: int | None = None
        self.dropped = 0  # sampled, but the queue was full
        self.before_loaded = 0  # decisions made while no shadow version was loaded yet (not scored)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._random = random.Random(seed)
        threading.Thread(target=self._work, daemon=True, name="mixllm-shadow").start()

    def use(self, router: Any, version: int | None) -> None:
        self.router, self.version = router, version

    def offer(self, decision_id: str, query: str, served_llm: str) -> None:
        if self.router is None:
            self.before_loaded += 1
            return
        if self._random.random() >= self.share:
            return
        try:
            self._queue.put_nowait((decision_id, query, served_llm))
        except queue.Full:
            self.dropped += 1

    def _work(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < 64:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            router, version = self.router, self.version
            if router is None:
                continue
            try:
                decisions = router.route([query for _, query, _ in batch])
                self.log.record([{"decision_id": d_id, "model_version": version, "llm": decision.llm, "served_llm": served}
                                 for (d_id, _, served), decision in zip(batch, decisions)])
            except Exception as exc:  # noqa: BLE001 - the shadow must never disturb serving
                logger.warning("shadow scoring of %d decisions failed (%s: %s)", len(batch), type(exc).__name__, exc)

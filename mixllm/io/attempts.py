"""Every upstream call the proxy made, answered or not, beside its decision: which LLM, what came
back, how long it took. A failover's story (which LLM failed how before which one answered) is a
query on the decision log, not a search through service logs."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from mixllm.io.store import InteractionLog, utcnow
from mixllm.io.store_schema import metadata

# What an attempt came to: the proxy's outcomes (mixllm_proxy_calls_total's status label).
OUTCOMES = ("ok", "upstream_error", "unreachable", "dropped")

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
    def __init__(self, store: InteractionLog):
        self.store = store
        store.create_schema([attempts])

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
        query = sa.select(attempts).where(attempts.c.decision_id == decision_id).order_by(attempts.c.attempt_id)
        with self.store.reading() as connection:
            return [dict(row) for row in connection.execute(query).mappings()]

    def forget_older(self, days: float) -> int:
        """Delete the attempts older than `days` (the decision log's retention)."""
        cutoff = utcnow() - timedelta(days=days)
        with self.store.writing() as connection:
            return int(connection.execute(attempts.delete().where(attempts.c.created_at < cutoff)).rowcount)

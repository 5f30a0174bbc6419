"""Which LLM each conversation is on, in the decision log's database (so every replica of the
service keeps a conversation on the same LLM). A session is keyed by its tenant and the caller's
session id, so two tenants cannot steer each other's conversations."""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from mixllm.io.store import InteractionLog, utcnow
from mixllm.io.store_schema import metadata

sessions = sa.Table(
    "sessions",
    metadata,
    sa.Column("session_key", sa.String(400), primary_key=True),
    sa.Column("llm", sa.String(256), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)


def session_key(tenant: str | None, session_id: str) -> str:
    return f"{tenant or '-'}/{session_id}"[:400]


class SessionLog:
    def __init__(self, store: InteractionLog, ttl_s: float):
        self.store, self.ttl_s = store, ttl_s
        store.create_schema([sessions])

    def llm_of(self, key: str) -> str | None:
        """The LLM this session was last answered by, unless it has been idle longer than ttl_s."""
        with self.store.reading() as connection:
            row = connection.execute(sa.select(sessions.c.llm, sessions.c.updated_at)
                                     .where(sessions.c.session_key == key)).first()
        if row is None:
            return None
        updated = row.updated_at if row.updated_at.tzinfo else row.updated_at.replace(tzinfo=utcnow().tzinfo)
        return None if utcnow() - updated > timedelta(seconds=self.ttl_s) else str(row.llm)

    def remember(self, key: str, llm: str) -> None:
        values = {"llm": llm, "updated_at": utcnow()}
        with self.store.writing() as connection:
            if connection.execute(sessions.update().where(sessions.c.session_key == key).values(**values)).rowcount:
                return
            try:
                with connection.begin_nested():
                    connection.execute(sessions.insert().values(session_key=key, **values))
            except IntegrityError:  # another replica created it a moment ago
                connection.execute(sessions.update().where(sessions.c.session_key == key).values(**values))

    def forget_idle(self) -> int:
        with self.store.writing() as connection:
            cutoff = utcnow() - timedelta(seconds=self.ttl_s)
            return connection.execute(sessions.delete().where(sessions.c.updated_at < cutoff)).rowcount

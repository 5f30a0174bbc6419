"""Tenants' API keys and the proxy's answered calls (their spend), in the decision log's database
(SQLite or PostgreSQL), so every replica of the service and the `mixllm keys` / `mixllm budgets` commands see the same records.

Keys are stored as SHA-256 hashes: the plaintext is shown once, when the key is created, and a
database dump does not hand anyone a working key. A key is revoked, never deleted, so its spend
keeps its tenant.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
import time
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from mixllm.config import TenantConfig
from mixllm.config.operations import BudgetsConfig
from mixllm.core.budgets import BudgetStanding, period_bounds, standings
from mixllm.core.errors import MixLLMError
from mixllm.io.store import InteractionLog, answered_by, utcnow
from mixllm.io.store_schema import decisions, feedback, metadata

if TYPE_CHECKING:  # pandas is imported where a frame is made: a service start (logs, router, a route) never needs it
    import pandas as pd

logger = logging.getLogger(__name__)

KEY_PREFIX = "mxk_"

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("key_hash", sa.String(64), primary_key=True),
    sa.Column("key_id", sa.String(16), unique=True, nullable=False),  # shown in listings, not a secret
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
)

calls = sa.Table(
    "calls",
    metadata,
    # One row per chat the proxy got an answer for (what budgets, /stats and `mixllm report` read).
    sa.Column("call_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("tenant", sa.String(64), nullable=True, index=True),  # None: the admin token or no key
    sa.Column("llm", sa.String(256), nullable=False),
    sa.Column("cost_usd", sa.Float, nullable=False),
    # False: the upstream's usage priced by the catalogue; True: the router's predicted cost (no usage).
    sa.Column("estimated", sa.Boolean, nullable=False),
    sa.Column("decision_id", sa.String(64), nullable=True),  # None: the caller named the LLM
    sa.Column("model_version", sa.Integer, nullable=True),
    sa.Column("reference_cost_usd", sa.Float, nullable=True),  # the same call on the reference LLM
    sa.Column("router_ms", sa.Float, nullable=True),  # the routing decision's wall time
    sa.Column("attempts", sa.Integer, nullable=False),  # > 1: the proxy failed over
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
    # The service's id for the record, so one replayed from the spend journal is stored once.
    sa.Column("record_id", sa.String(32), nullable=True),
)
RECORD_ID_INDEX = sa.Index("ix_calls_record_id", calls.c.record_id, unique=True)


class UnknownKeyError(MixLLMError, LookupError):
    """No key (or no active key) matches."""


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "replace")).hexdigest()


class TenantLedger:
    """API keys and spend records on an InteractionLog's database."""

    def __init__(self, store: InteractionLog, key_cache_s: float = BudgetsConfig.default_for("key_cache_s")):
        self.store = store
        self.key_cache_s = key_cache_s
        store.create_schema([api_keys, calls])
        try:  # a ledger made before record_id had no index on it
            with store.writing() as connection:
                RECORD_ID_INDEX.create(connection, checkfirst=True)
        except sa.exc.DBAPIError:  # another replica created it a moment ago
            pass
        self._keys: dict[str, tuple[str | None, float]] = {}  # hash -> (tenant or None, looked up at)
        self._keys_lock = threading.Lock()

    # ------------------------------------------------------------------------------------ keys

    def create_key(self, tenant: str) -> tuple[str, str]:
        """A new key for `tenant`: (key_id, the key). The key is not stored; only its hash is."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        key_id = secrets.token_hex(4)
        with self.store.writing() as connection:
            connection.execute(api_keys.insert().values(key_hash=key_hash(key), key_id=key_id, tenant=tenant,
                                                        created_at=utcnow(), revoked_at=None))
        return key_id, key

    def revoke(self, key_id: str) -> str:
        """Revoke a key by its id (from `keys()`); returns its tenant."""
        with self.store.writing() as connection:
            row = connection.execute(sa.select(api_keys.c.tenant).where(api_keys.c.key_id == key_id,
                                                                         api_keys.c.revoked_at.is_(None))).first()
            if row is None:
                raise UnknownKeyError(f"no active key with id '{key_id}'; `mixllm keys list` shows the ids")
            connection.execute(api_keys.update().where(api_keys.c.key_id == key_id).values(revoked_at=utcnow()))
        with self._keys_lock:
            self._keys.clear()
        return str(row.tenant)

    def keys(self) -> pd.DataFrame:
        import pandas as pd

        with self.store.reading() as connection:
            rows = connection.execute(sa.select(api_keys.c.key_id, api_keys.c.tenant, api_keys.c.created_at,
                                                api_keys.c.revoked_at).order_by(api_keys.c.created_at))
            return pd.DataFrame(rows.mappings().all(), columns=["key_id", "tenant", "created_at", "revoked_at"])

    def tenant_of(self, key: str) -> str | None:
        """The tenant of an active key, or None (unknown or revoked); cached for key_cache_s."""
        digest = key_hash(key)
        now = time.monotonic()
        with self._keys_lock:
            cached = self._keys.get(digest)
        if cached is not None and now - cached[1] < self.key_cache_s:
            return cached[0]
        with self.store.reading() as connection:
            row = connection.execute(sa.select(api_keys.c.tenant).where(api_keys.c.key_hash == digest,
                                                                        api_keys.c.revoked_at.is_(None))).first()
        tenant = None if row is None else str(row.tenant)
        with self._keys_lock:
            if len(self._keys) > 10_000:  # guessed keys must not grow the cache without bound
                self._keys.clear()
            self._keys[digest] = (tenant, now)
        return tenant

    # ----------------------------------------------------------------------------------- spend

    def record_call(self, *, tenant: str | None, llm: str, cost_usd: float, estimated: bool,
                    decision_id: str | None = None, model_version: int | None = None,
                    reference_cost_usd: float | None = None, router_ms: float | None = None, attempts: int = 1,
                    at: datetime | None = None, record_id: str | None = None) -> bool:
        """Store one answered call; raises StoreBusyError when the database does not take it. A
        record_id already stored (a journal replay, a retried commit) is not stored again: False.
        The call's decision and any feedback already stored on it, in the same transaction, name the
        LLM that answered: the proxy also completes the decision, but that write is not kept when the
        database refuses it, and this record is (in the spend journal). Once the record is written,
        feedback on the decision teaches the LLM that answered (continual learning that read the
        feedback before then learned it for the policy's choice)."""
        try:
            with self.store.writing() as connection:
                connection.execute(calls.insert().values(
                    tenant=tenant, llm=llm, cost_usd=float(cost_usd), estimated=bool(estimated), decision_id=decision_id,
                    model_version=model_version, reference_cost_usd=reference_cost_usd, router_ms=router_ms,
                    attempts=int(attempts), created_at=at or utcnow(), record_id=record_id))
                if decision_id:
                    connection.execute(decisions.update().where(decisions.c.decision_id == decision_id,
                                                                decisions.c.llm != llm).values(**answered_by(llm)))
                    connection.execute(feedback.update().where(feedback.c.decision_id == decision_id,
                                                               feedback.c.llm != llm).values(llm=llm))
        except IntegrityError:
            if record_id is None or not self._stored(record_id):
                raise
            return False
        return True

    def _stored(self, record_id: str) -> bool:
        with self.store.reading() as connection:
            return connection.execute(sa.select(calls.c.call_id).where(calls.c.record_id == record_id)).first() is not None

    def spent_since(self, tenant: str, starts: Mapping[str, datetime]) -> dict[str, float]:
        """The tenant's spend since each start (period -> start): one query."""
        if not starts:
            return {}
        columns = [sa.func.coalesce(sa.func.sum(sa.case((calls.c.created_at >= start, calls.c.cost_usd), else_=0.0)),
                                    0.0).label(period) for period, start in starts.items()]
        earliest = min(starts.values())
        with self.store.reading() as connection:  # a database that refuses: StoreBusyError
            row = connection.execute(sa.select(*columns).where(calls.c.tenant == tenant,
                                                               calls.c.created_at >= earliest)).mappings().first()
        return {period: float(row[period] or 0.0) for period in starts}

    def standing(self, tenant: TenantConfig, now: datetime, warmup_share: float) -> list[BudgetStanding]:
        """Where each of the tenant's budgets stands now: its spend since each period began."""
        spent = self.spent_since(tenant.name, {period: period_bounds(period, now)[0] for period in tenant.budgets_usd})
        return standings(tenant.budgets_usd, spent, now, warmup_share)

    def calls_frame(self, since: datetime | None = None) -> pd.DataFrame:
        """Every answered call since a time (or ever), with the mean quality of its feedback (NaN
        without): what /stats and `mixllm report` summarise."""
        quality = (sa.select(feedback.c.decision_id, sa.func.avg(feedback.c.quality).label("feedback_quality"))
                   .where(feedback.c.decision_id.is_not(None)).group_by(feedback.c.decision_id).subquery())
        query = sa.select(calls, quality.c.feedback_quality).outerjoin(quality, quality.c.decision_id == calls.c.decision_id)
        if since is not None:
            query = query.where(calls.c.created_at >= since)
        with self.store.reading() as connection:
            rows = connection.execute(query.order_by(calls.c.call_id)).mappings().all()
        columns = [c.name for c in calls.columns] + ["feedback_quality"]
        import pandas as pd

        return pd.DataFrame(rows, columns=columns)


def describe_keys(frame: pd.DataFrame) -> list[dict[str, Any]]:
    import pandas as pd

    return [{"key_id": r.key_id, "tenant": r.tenant, "created_at": str(r.created_at),
             "revoked_at": None if pd.isna(r.revoked_at) else str(r.revoked_at)} for r in frame.itertuples()]

"""The decision log the service writes and the continual flow reads: routing decisions and their feedback.

(Not to be confused with `data.TrainingStore`, the Parquet training log of full interactions.)

SQLite in WAL mode by default (a file under data/), any SQLAlchemy URL (PostgreSQL) by config.
Every routing decision is logged; feedback joins its decision by `decision_id`. Writes are
idempotent: a retried decision or feedback (same decision_id / request_id) never makes a second
row, and a call returns only after its row is committed. The continual flow reads feedback past
a watermark, and advances the watermark only after it has used the rows.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from mixllm.core.errors import MixLLMError, StoreBusyError
from mixllm.io.store_schema import SCHEMA_LOCK_KEY, add_missing_columns, decisions, feedback, metadata, watermarks

if TYPE_CHECKING:  # pandas is imported where a frame is made: a service start (logs, router, a route) never needs it
    import pandas as pd

logger = logging.getLogger(__name__)

# What a database that is down, locked or out of connections raises: the driver's operational and
# interface errors, and the connection pool's timeout (every pooled connection in use).
UNAVAILABLE = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError)


@contextlib.contextmanager
def _busy_when_unavailable(open_connection: Any) -> Iterator[Any]:
    """A connection from `open_connection` (engine.connect or engine.begin); the database's
    UNAVAILABLE errors, on opening or while it is used, become StoreBusyError."""
    try:
        with open_connection() as connection:
            yield connection
    except UNAVAILABLE as problem:
        reason = str(getattr(problem, "orig", None) or problem).strip()[:80]
        raise StoreBusyError(f"the decision log is busy or unreachable ({reason}); retry shortly") from problem


class UnknownDecisionError(MixLLMError, LookupError):
    """Feedback names a decision_id the store has never seen."""


@dataclass(frozen=True)
class StoredFeedback:
    feedback_id: int
    created: bool  # False: the same feedback was already stored (an idempotent retry)
    llm: str = ""  # the LLM the feedback is about (the decision's, when given a decision_id)
    latency_measured: bool = False  # the decision's call was timed by the service itself (the proxy)


def answered_by(llm: str) -> dict[str, Any]:
    """The decision's columns when `llm` wrote the answer: llm takes it, and chosen_llm keeps the
    policy's choice the first time they differ (SET reads the row as it was)."""
    return {"chosen_llm": sa.case((sa.and_(decisions.c.chosen_llm.is_(None), decisions.c.llm != llm), decisions.c.llm),
                                  else_=decisions.c.chosen_llm),
            "llm": llm}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def existing_log(url: str) -> InteractionLog | None:
    """The decision log at `url`, or None when it is a SQLite file not created yet (a job that only
    reads must not create an empty log as a side effect)."""
    from pathlib import Path

    if url.startswith("sqlite:///") and ":memory:" not in url and not Path(url.split("///", 1)[1]).is_file():
        return None
    return InteractionLog(url)


class InteractionLog:
    """The live log: routing decisions and the feedback that joins them, in a SQL database (SQLite WAL
    by default, PostgreSQL by URL). Training data lives elsewhere (`data.TrainingStore`)."""

    def __init__(self, url: str, busy_timeout_s: float = 30.0):
        """`busy_timeout_s`: how long a write waits for a database lock held by another writer
        before it fails with StoreBusyError (the service keeps it short and answers 503)."""
        self.url = url
        self.busy_timeout_s = float(busy_timeout_s)
        connect_args: dict[str, Any] = {}
        if url.startswith("sqlite"):
            path = url.split("///", 1)[-1]
            if path and path != ":memory:":
                from pathlib import Path

                Path(path).parent.mkdir(parents=True, exist_ok=True)
            connect_args = {"timeout": self.busy_timeout_s, "check_same_thread": False}
        elif url.startswith("postgresql"):
            # connect_timeout: a server that accepts the connection and never answers (or a network
            # that drops packets) fails the connection after the busy timeout (a request's
            # StoreBusyError, a 503) instead of hanging (libpq waits forever by default; it counts
            # whole seconds, at least 2). A connect_timeout in the URL itself wins.
            connect_args = {"options": f"-c lock_timeout={int(self.busy_timeout_s * 1000)}"}
            if "connect_timeout=" not in url:
                connect_args["connect_timeout"] = max(2, math.ceil(self.busy_timeout_s))
        # Every pooled connection in use (a burst of threads): wait as long as for a lock, then StoreBusyError.
        in_memory = ":memory:" in url or url.rstrip("/") == "sqlite:"  # one connection per thread, no pool timeout
        pool = {} if in_memory else {"pool_timeout": self.busy_timeout_s}
        self.engine = sa.create_engine(url, connect_args=connect_args, pool_pre_ping=True, **pool)
        if url.startswith("sqlite"):
            @sa.event.listens_for(self.engine, "connect")
            def _sqlite_pragmas(dbapi_connection: Any, _: Any) -> None:
                cursor = dbapi_connection.cursor()
                # WAL: readers never block the writer; FULL sync: a committed row survives a crash.
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=FULL")
                cursor.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_s * 1000)}")
                cursor.close()
        self.create_schema()
        # SQLite allows one writer at a time; serialise our own writes instead of retrying on locks.
        self._write_lock = threading.Lock()

    @contextlib.contextmanager
    def writing(self) -> Iterator[Any]:
        """One write transaction, serialised with this process's other writes; a lock held elsewhere
        longer than the busy timeout is a StoreBusyError, not a hang."""
        if not self._write_lock.acquire(timeout=self.busy_timeout_s):
            raise StoreBusyError(f"the decision log is busy: no write slot within {self.busy_timeout_s:g} s; retry shortly")
        try:
            with _busy_when_unavailable(self.engine.begin) as connection:
                yield connection
        finally:
            self._write_lock.release()

    @contextlib.contextmanager
    def reading(self) -> Iterator[Any]:
        """A connection for reads; a database that is down or refuses is a StoreBusyError too, so
        every caller answers it the same way (503, retry), never a 500."""
        with _busy_when_unavailable(self.engine.connect) as connection:
            yield connection

    def create_schema(self, tables: list[sa.Table] | None = None) -> None:
        """Create the tables once, even when several replicas start together on an empty database:
        on PostgreSQL concurrent CREATE TABLEs collide (a unique violation in the catalogue), so the
        creation holds a transaction-scoped advisory lock; elsewhere a collision is retried once."""
        if self.engine.dialect.name == "postgresql":
            with self.engine.begin() as connection:
                connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
                metadata.create_all(connection, tables=tables)
                add_missing_columns(connection, tables)
            return
        try:
            metadata.create_all(self.engine, tables=tables)
        except sa.exc.DBAPIError:
            time.sleep(0.5)  # another process was creating the same tables: they exist now
            metadata.create_all(self.engine, tables=tables)
        with self.engine.begin() as connection:
            add_missing_columns(connection, tables)

    # --------------------------------------------------------------------------------- decisions

    def log_decision(self, query: str, llm: str, *, model_version: int | None, lambda_: float | None,
                     candidates: list[dict[str, Any]] | dict[str, Any] | None = None,
                     request_id: str | None = None, propensity: float | None = None) -> str:
        """Store a decision and return its id; a retried request_id returns the first decision's id.
        `candidates` (any JSON): the candidates' scores, or a dict with them and what else the
        service needs to answer a retry as the first time (relaxed constraints, notes)."""
        return self.record_decision(query, llm, model_version=model_version, lambda_=lambda_,
                                    candidates=candidates, request_id=request_id, propensity=propensity)[0]

    def record_decision(self, query: str, llm: str, *, model_version: int | None, lambda_: float | None,
                        candidates: list[dict[str, Any]] | dict[str, Any] | None = None,
                        request_id: str | None = None, propensity: float | None = None) -> tuple[str, bool]:
        """log_decision, and whether this call stored it (False: the request_id was already taken,
        perhaps by a concurrent call a moment earlier; the id is then the first decision's)."""
        if request_id:
            existing = self.decision_by_request(request_id)
            if existing is not None:
                return existing["decision_id"], False
        decision_id = uuid.uuid4().hex
        row = {"decision_id": decision_id, "request_id": request_id or None, "query": query, "llm": llm,
               "model_version": model_version, "lambda_": lambda_,
               "candidates": json.dumps(candidates) if candidates is not None else None, "propensity": propensity,
               "created_at": utcnow()}
        try:
            with self.writing() as connection:
                connection.execute(decisions.insert().values(**row))
        except IntegrityError:
            existing = self.decision_by_request(request_id) if request_id else None
            if existing is None:
                raise
            return existing["decision_id"], False
        return decision_id, True

    def log_decisions(self, rows: list[dict[str, Any]]) -> list[str]:
        """Many decisions in one transaction (the batch route)."""
        ids = []
        payload = []
        for row in rows:
            decision_id = uuid.uuid4().hex
            ids.append(decision_id)
            payload.append({"decision_id": decision_id, "request_id": None, "query": row["query"], "llm": row["llm"],
                            "model_version": row.get("model_version"), "lambda_": row.get("lambda_"),
                            "candidates": json.dumps(row.get("candidates")) if row.get("candidates") is not None else None,
                            "propensity": row.get("propensity"), "created_at": utcnow()})
        if payload:
            with self.writing() as connection:
                connection.execute(decisions.insert(), payload)
        return ids

    def complete_decision(self, decision_id: str, *, cost_usd: float | None, latency_s: float | None,
                          input_tokens: float | None = None, output_tokens: float | None = None,
                          llm: str | None = None) -> None:
        """Record the real cost and latency of a decided call (the proxy knows them), and the LLM
        that answered when it is not the one chosen (the proxy failed over, or a session stayed on
        its LLM): feedback on the decision then teaches the LLM that wrote the answer, and the
        policy's own choice moves to chosen_llm (the first time only)."""
        values: dict[str, Any] = {"cost_usd": cost_usd, "latency_s": latency_s, "input_tokens": input_tokens,
                                  "output_tokens": output_tokens, **(answered_by(llm) if llm else {})}
        with self.writing() as connection:
            connection.execute(decisions.update().where(decisions.c.decision_id == decision_id).values(**values))

    def decision_by_request(self, request_id: str) -> dict[str, Any] | None:
        with self.reading() as connection:
            row = connection.execute(sa.select(decisions).where(decisions.c.request_id == request_id)).mappings().first()
        return dict(row) if row else None

    def decision(self, decision_id: str) -> dict[str, Any] | None:
        with self.reading() as connection:
            row = connection.execute(sa.select(decisions).where(decisions.c.decision_id == decision_id)).mappings().first()
        return dict(row) if row else None

    def feedback_of(self, decision_id: str) -> list[dict[str, Any]]:
        """The feedback rows that name a decision (at most one: feedback is idempotent per decision)."""
        query = sa.select(feedback).where(feedback.c.decision_id == decision_id).order_by(feedback.c.feedback_id)
        with self.reading() as connection:
            return [dict(row) for row in connection.execute(query).mappings()]

    def compact(self, detail_days: float, retention_days: float, now: datetime | None = None) -> dict[str, int]:
        """Bound the decision log: drop the candidates' scores of decisions older than `detail_days`,
        and delete decisions older than `retention_days` that no feedback names. Returns the counts."""
        now = now or utcnow()
        detail_cutoff = now - timedelta(days=detail_days)
        retention_cutoff = now - timedelta(days=retention_days)
        named = sa.select(feedback.c.decision_id).where(feedback.c.decision_id.is_not(None))
        with self.writing() as connection:
            stripped = connection.execute(
                decisions.update()
                .where(decisions.c.created_at < detail_cutoff, decisions.c.candidates.is_not(None))
                .values(candidates=None)
            ).rowcount
            deleted = connection.execute(
                decisions.delete().where(decisions.c.created_at < retention_cutoff, decisions.c.decision_id.not_in(named))
            ).rowcount
        if self.engine.dialect.name == "sqlite" and (stripped or deleted):
            with self.reading() as connection:  # give the freed pages back to the file system
                connection.execution_options(isolation_level="AUTOCOMMIT").execute(sa.text("VACUUM"))
        logger.info("decision log compacted: %d decisions' scores dropped (older than %g days), %d decisions deleted "
                    "(older than %g days, no feedback)", stripped, detail_days, deleted, retention_days)
        return {"scores_dropped": int(stripped), "deleted": int(deleted)}

    # ---------------------------------------------------------------------------------- feedback

    def add_feedback(self, *, quality: float, kind: str = "refined", decision_id: str | None = None,
                     request_id: str | None = None, query: str | None = None, llm: str | None = None,
                     cost_usd: float | None = None, latency_s: float | None = None,
                     input_tokens: float | None = None, output_tokens: float | None = None) -> StoredFeedback:
        """Store one feedback row, committed before returning. With a decision_id, query and llm
        come from the decision; a second call for the same decision_id (or request_id) is a no-op."""
        if decision_id:
            decision = self.decision(decision_id)
            if decision is None:
                raise UnknownDecisionError(f"unknown decision_id '{decision_id}': use the id /route returned (decisions "
                                           "without feedback are kept service.decision_retention_days)")
            if llm is not None and llm != decision["llm"]:
                raise MixLLMError(f"decision {decision_id} chose '{decision['llm']}', not '{llm}'", field="llm")
            query, llm = decision["query"], decision["llm"]
            measured = decision.get("latency_s") is not None
            # What the proxy measured fills what the feedback leaves out.
            cost_usd = cost_usd if cost_usd is not None else decision.get("cost_usd")
            latency_s = latency_s if latency_s is not None else decision.get("latency_s")
            input_tokens = input_tokens if input_tokens is not None else decision.get("input_tokens")
            output_tokens = output_tokens if output_tokens is not None else decision.get("output_tokens")
        else:
            measured = False
        if not query or not llm:
            raise MixLLMError("feedback needs a decision_id, or a query and the llm that answered it")
        existing = self._existing_feedback(decision_id, request_id)
        if existing is not None:
            return StoredFeedback(existing, False, llm, measured)
        row = {"decision_id": decision_id, "request_id": request_id or None, "query": query, "llm": llm,
               "quality": float(quality), "cost_usd": float(cost_usd) if cost_usd is not None else None, "latency_s": latency_s,
               "input_tokens": input_tokens, "output_tokens": output_tokens, "kind": kind, "created_at": utcnow()}
        try:
            with self.writing() as connection:
                result = connection.execute(feedback.insert().values(**row))
                return StoredFeedback(int(result.inserted_primary_key[0]), True, llm, measured)
        except IntegrityError:
            existing = self._existing_feedback(decision_id, request_id)
            if existing is None:
                raise
            return StoredFeedback(existing, False, llm, measured)

    def _existing_feedback(self, decision_id: str | None, request_id: str | None) -> int | None:
        conditions = []
        if decision_id:
            conditions.append(feedback.c.decision_id == decision_id)
        if request_id:
            conditions.append(feedback.c.request_id == request_id)
        if not conditions:
            return None
        with self.reading() as connection:
            return connection.execute(sa.select(feedback.c.feedback_id).where(sa.or_(*conditions))).scalars().first()

    def feedback_since(self, after_id: int) -> pd.DataFrame:
        """Feedback rows with id > after_id, joined to their decisions (model version, lambda)."""
        query = (
            sa.select(feedback, decisions.c.model_version, decisions.c.lambda_,
                      decisions.c.created_at.label("decided_at"))
            .select_from(feedback.outerjoin(decisions, feedback.c.decision_id == decisions.c.decision_id))
            .where(feedback.c.feedback_id > after_id)
            .order_by(feedback.c.feedback_id)
        )
        import pandas as pd

        with self.reading() as connection:
            return pd.DataFrame(connection.execute(query).mappings().all())

    def recent_queries(self, limit: int) -> list[str]:
        """The queries of the last `limit` decisions (what the drift monitor reads)."""
        query = sa.select(decisions.c.query).order_by(decisions.c.created_at.desc()).limit(limit)
        with self.reading() as connection:
            return [row[0] for row in connection.execute(query)]

    def decisions_with_feedback(self, since: datetime | None = None, limit: int | None = None) -> pd.DataFrame:
        """Logged decisions that got feedback, one row each (the feedback's quality, its cost or the
        call's), with the probability the policy gave its choice and that choice when another LLM
        answered (chosen_llm): what off-policy evaluation reads."""
        query = (
            sa.select(decisions.c.decision_id, decisions.c.query, decisions.c.llm, decisions.c.chosen_llm,
                      decisions.c.propensity, decisions.c.lambda_, decisions.c.model_version, decisions.c.created_at, feedback.c.quality,
                      sa.func.coalesce(feedback.c.cost_usd, decisions.c.cost_usd).label("cost_usd"))
            .select_from(decisions.join(feedback, feedback.c.decision_id == decisions.c.decision_id))
            .order_by(feedback.c.feedback_id.desc())
        )
        if since is not None:
            query = query.where(decisions.c.created_at >= since)
        if limit is not None:  # the most recent ones
            query = query.limit(limit)
        with self.reading() as connection:
            rows = connection.execute(query).mappings().all()[::-1]  # oldest first
        import pandas as pd

        return pd.DataFrame(rows, columns=["decision_id", "query", "llm", "chosen_llm", "propensity", "lambda_",
                                           "model_version", "created_at", "quality", "cost_usd"])

    def count(self, table: str) -> int:
        target = {"decisions": decisions, "feedback": feedback}[table]
        with self.reading() as connection:
            return int(connection.execute(sa.select(sa.func.count()).select_from(target)).scalar_one())

    # -------------------------------------------------------------------------------- watermarks

    def watermark(self, name: str = "continual") -> int:
        with self.reading() as connection:
            value = connection.execute(sa.select(watermarks.c.value).where(watermarks.c.name == name)).scalar_one_or_none()
        return int(value or 0)

    def set_watermark(self, value: int, name: str = "continual") -> None:
        with self.writing() as connection:
            updated = connection.execute(
                watermarks.update().where(watermarks.c.name == name).values(value=value, updated_at=utcnow())
            )
            if updated.rowcount == 0:
                connection.execute(watermarks.insert().values(name=name, value=value, updated_at=utcnow()))

    def dispose(self) -> None:
        self.engine.dispose()

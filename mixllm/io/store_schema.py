"""The decision log's tables (decisions, feedback, watermarks) on the metadata every table of that
database shares (the ledger's, the sessions', the attempts' and the shadow's join it), and the one
migration there has been so far: adding the nullable columns an older log lacks."""

from __future__ import annotations

import json
import logging
from typing import Any

import sqlalchemy as sa

logger = logging.getLogger("mixllm.io.store")

# Any fixed 64-bit number: the advisory lock that serialises schema creation on PostgreSQL.
SCHEMA_LOCK_KEY = 0x6D69786C6C6D  # "mixllm"

metadata = sa.MetaData()

decisions = sa.Table(
    "decisions",
    metadata,
    sa.Column("decision_id", sa.String(64), primary_key=True),
    sa.Column("request_id", sa.String(128), unique=True, nullable=True),
    sa.Column("query", sa.Text, nullable=False),
    sa.Column("llm", sa.String(256), nullable=False),
    sa.Column("model_version", sa.Integer, nullable=True),
    sa.Column("lambda_", sa.Float, nullable=True),
    sa.Column("candidates", sa.Text, nullable=True),
    # The probability the decision policy gave the LLM it chose (1 for the argmax policy); kept when
    # compaction drops the candidates' scores, for off-policy evaluation.
    sa.Column("propensity", sa.Float, nullable=True),
    # The LLM the policy chose, kept when another one answered (the proxy failed over, or a session
    # stayed on its LLM): `llm` then names the one that answered, which feedback teaches, and the
    # propensity belongs to this one, so off-policy evaluation leaves the decision out.
    sa.Column("chosen_llm", sa.String(256), nullable=True),
    # What the call really cost and took, when the service saw it happen (the OpenAI proxy).
    sa.Column("cost_usd", sa.Float, nullable=True),
    sa.Column("latency_s", sa.Float, nullable=True),
    sa.Column("input_tokens", sa.Float, nullable=True),
    sa.Column("output_tokens", sa.Float, nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

feedback = sa.Table(
    "feedback",
    metadata,
    sa.Column("feedback_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("decision_id", sa.String(64), unique=True, nullable=True),
    sa.Column("request_id", sa.String(128), unique=True, nullable=True),
    sa.Column("query", sa.Text, nullable=False),
    sa.Column("llm", sa.String(256), nullable=False),
    sa.Column("quality", sa.Float, nullable=False),
    sa.Column("cost_usd", sa.Float, nullable=True),  # unknown unless sent or measured by the proxy
    sa.Column("latency_s", sa.Float, nullable=True),
    sa.Column("input_tokens", sa.Float, nullable=True),
    sa.Column("output_tokens", sa.Float, nullable=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

watermarks = sa.Table(
    "watermarks",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.Integer, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)


def logged_decision_details(candidates_column: str | None) -> dict[str, Any]:
    """A logged decision's `candidates` column read back: {"candidates": [...], "relaxed": [...],
    "notes": [...]}; empty when compaction dropped it. Decisions logged before relaxed and notes were
    kept hold a bare list of candidates."""
    details = json.loads(candidates_column) if candidates_column else {}
    if isinstance(details, list):
        details = {"candidates": details}
    return {"candidates": list(details.get("candidates", [])), "relaxed": list(details.get("relaxed", [])),
            "notes": list(details.get("notes", []))}


def add_missing_columns(connection: Any, tables: list[sa.Table] | None) -> None:
    """A log written by an older version lacks the nullable columns added since: add them (the only
    schema change so far is additive, so this is the whole migration)."""
    inspector = sa.inspect(connection)
    for table in tables or list(metadata.tables.values()):
        if not inspector.has_table(table.name):
            continue
        present = {column["name"] for column in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name not in present and column.nullable:
                kind = column.type.compile(dialect=connection.dialect)
                connection.execute(sa.text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))
                logger.info("decision log: added column %s.%s", table.name, column.name)

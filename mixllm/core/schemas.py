"""Records that cross module boundaries: interactions, ingest reports, routing decisions."""

from __future__ import annotations

import json
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# One logged interaction: a query sent to one LLM and what came back.
KEY_COLUMNS = ("query_id", "llm")
REQUIRED_COLUMNS = ("query_id", "query", "llm", "quality", "cost_usd")
OPTIONAL_COLUMNS = (
    "latency_s",
    "input_tokens",
    "output_tokens",
    "source",
    "timestamp",
    "feedback",
    "response",
    "split",
)
INTERACTION_COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
NUMERIC_COLUMNS = ("quality", "cost_usd", "latency_s", "input_tokens", "output_tokens")
TEXT_COLUMNS = ("query_id", "query", "llm", "source", "feedback", "response", "split")

FEEDBACK_KINDS = ("refined", "binary")
SPLIT_PARTS = ("train", "validation", "holdout")

# Spellings other tools use for our columns (RouterBench/RouterDC long files, OpenAI-style logs).
COLUMN_ALIASES = {
    "sample_id": "query_id",
    "prompt": "query",
    "model": "llm",
    "model_name": "llm",
    "eval_name": "source",
    "performance": "quality",
    "total_cost": "cost_usd",
    "cost": "cost_usd",
    "split_routerdc": "split",
    "model_response": "response",
}


@dataclass
class IngestReport:
    """What one ingest did: every row read is accounted for as accepted, already stored or quarantined."""

    source: str
    format: str
    rows_read: int = 0
    accepted: int = 0
    already_stored: int = 0
    quarantined: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    queries: int = 0
    llms: int = 0
    # RouterBench wide files only: model cells left empty (the model was not run on that prompt),
    # and prompts whose results were split over two source rows and merged (see data.py).
    missing_cells: int = 0
    merged_prompts: int = 0
    merged_prompt_ids: list[str] = field(default_factory=list)
    quarantine_path: str | None = None
    store_path: str | None = None

    @property
    def accounted(self) -> bool:
        return self.rows_read == self.accepted + self.already_stored + self.quarantined

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")

    def summary(self) -> str:
        lines = [
            f"{self.source} ({self.format}): {self.rows_read} rows read",
            f"  accepted {self.accepted} new rows ({self.queries} queries, {self.llms} LLMs)",
            f"  already stored {self.already_stored}",
            f"  quarantined {self.quarantined}",
        ]
        for reason, count in sorted(self.reasons.items()):
            lines.append(f"    {reason}: {count}")
        if self.missing_cells:
            lines.append(f"  model cells not run (no interaction): {self.missing_cells}")
        if self.merged_prompts:
            lines.append(
                f"  prompts merged from two source rows: {self.merged_prompts} "
                f"({', '.join(self.merged_prompt_ids[:5])}{', ...' if self.merged_prompts > 5 else ''})"
            )
        if self.quarantine_path:
            lines.append(f"  quarantine: {self.quarantine_path}")
        return "\n".join(lines)


def is_blank(text: str) -> bool:
    """No visible text: whitespace and invisible format characters only (zero-width spaces, joiners,
    BOMs: Unicode category Cf). Such a query says nothing to route on or learn from."""
    return all(ch.isspace() or unicodedata.category(ch) == "Cf" for ch in text)

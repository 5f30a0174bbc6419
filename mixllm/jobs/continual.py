"""Continual learning from production feedback: read feedback past the watermark, update the
champion with bandit updates (and the catalogue's pool changes), register it through the gate,
advance the watermark, then check the traffic for drift (and retrain on it). The steps are wired
once, in run_continual. A retrain replays the feedback already learned."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mixllm.config import MixLLMConfig, PlausibilityConfig
from mixllm.core.router import MixLLMRouter
from mixllm.core.schemas import is_blank
from mixllm.io.workspace import Workspace, load_split, replace_dir
from mixllm.jobs.gate import Registration, register_candidate
from mixllm.jobs.report import evaluate_router

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ continual


@dataclass
class ContinualOutcome:
    feedback_rows: int
    watermark_before: int
    watermark_after: int
    pool_changes: list[str]
    registration: Registration | None
    drift: dict[str, Any] | None = None  # mixllm.jobs.monitoring.watch_drift's answer, when drift was watched

    def summary(self) -> str:
        if self.registration is None:
            return f"no new feedback past watermark {self.watermark_before}: nothing registered"
        return (f"{self.feedback_rows} feedback rows ({self.watermark_before} -> {self.watermark_after}); "
                f"pool changes: {', '.join(self.pool_changes) or 'none'}; version {self.registration.version}: "
                f"{self.registration.verdict.summary()}")

    def to_dict(self) -> dict[str, Any]:
        return {"feedback_rows": self.feedback_rows, "watermark": self.watermark_after,
                "pool_changes": self.pool_changes,
                "registration": self.registration.to_dict() if self.registration else None, "drift": self.drift}


def screen_feedback(rows: pd.DataFrame, pool: Sequence[str],
                    limits: PlausibilityConfig | None = None) -> tuple[pd.DataFrame, dict[str, int]]:
    """The feedback rows a router can learn from, and how many were set aside per reason.

    The service validates what it stores, but the store is also written by other clients (and
    older versions); one bad row must not fail every continual run from now on. Set-aside rows
    stay in the store, counted in the log."""
    limits = limits or PlausibilityConfig()
    quality = pd.to_numeric(rows["quality"], errors="coerce")
    cost = pd.to_numeric(rows["cost_usd"], errors="coerce")
    checks = {
        "LLM no longer in the pool": ~rows["llm"].isin(list(pool)),
        "blank query": ~rows["query"].map(lambda q: isinstance(q, str) and not is_blank(q)),  # as the service's check
        "quality not a number in 0..1": ~quality.between(0.0, 1.0),
        "cost negative or infinite": rows["cost_usd"].notna() & ~(cost.between(0.0, np.inf, inclusive="left")),
        "cost past data.limits.max_cost_usd": cost > limits.max_cost_usd,
    }
    bad = pd.Series(False, index=rows.index)
    skipped = {}
    for reason, failing in checks.items():
        failing = failing & ~bad  # each row counted once, under its first reason
        if failing.any():
            skipped[reason] = int(failing.sum())
        bad |= failing
    usable = rows[~bad].assign(quality=quality[~bad], cost_usd=cost[~bad])  # unknown cost: NaN, not None
    return usable, skipped


@dataclass
class Replay:
    """What a retrain re-learned from the feedback store."""

    rows: int = 0
    last_feedback_id: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def tags(self) -> dict[str, str]:
        if not self.rows:
            return {}
        return {"mixllm.replayed_feedback": f"{self.rows} rows (ids up to {self.last_feedback_id})"}


def consumed_feedback(config: MixLLMConfig) -> pd.DataFrame:
    """Feedback the continual flow has learned from (ids up to its watermark): what a retrain replays.
    Rows past the watermark are left to the next continual run, so no row is learned twice."""
    from mixllm.io.store import InteractionLog

    url = config.sqlalchemy_url(config.service.feedback_store_url)
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).exists():
        return pd.DataFrame()  # no service has run here: nothing to replay (and no file to create)
    store = InteractionLog(url)
    try:
        watermark = store.watermark()
        rows = store.feedback_since(0) if watermark else pd.DataFrame()
    finally:
        store.dispose()
    return rows[rows["feedback_id"] <= watermark] if len(rows) else rows


def stage_replay(config: MixLLMConfig, progress: bool | None = None) -> tuple[Path, Replay]:
    """router/ plus the consumed feedback, learned again with partial_fit (bandit updates of the
    chosen LLMs only), saved to replayed/router; router/ itself when there is nothing to replay.

    router/ stays the pure offline fit, so its stage cache never holds feedback (a second retrain
    would otherwise learn the same rows twice)."""
    workspace = Workspace.of(config)
    if not config.pipeline.replay_feedback:
        return workspace.router, Replay()
    rows = consumed_feedback(config)
    if rows.empty:
        return workspace.router, Replay()
    router = MixLLMRouter.load(workspace.router, progress=progress)
    router.cache_dir = workspace.cache
    learned, skipped = learn_from_feedback(router, rows, config.data.limits)
    replay = Replay(learned, int(rows["feedback_id"].max()), skipped)
    if not replay.rows:
        return workspace.router, replay
    logger.info("replayed %d feedback rows (ids up to %d) onto the retrained router", replay.rows,
                replay.last_feedback_id)
    workspace.replayed.parent.mkdir(parents=True, exist_ok=True)
    return replace_dir(workspace.replayed, router.save), replay


def learn_from_feedback(router: MixLLMRouter, feedback_rows: pd.DataFrame,
                        limits: PlausibilityConfig) -> tuple[int, dict[str, int]]:
    """partial_fit the screened rows (each updates only its own LLM); rows learned, and set aside per reason."""
    usable, skipped = screen_feedback(feedback_rows, router.llms_, limits)
    for reason, count in skipped.items():
        logger.warning("%d feedback rows set aside (%s); they stay in the store and are not learned from",
                       count, reason)
    if len(usable):
        router.partial_fit(usable[["query", "llm", "quality", "cost_usd"]
                                  + [c for c in ("input_tokens", "output_tokens") if c in usable]])
    return len(usable), skipped


def continual_update(config: MixLLMConfig, router: MixLLMRouter, feedback_rows: pd.DataFrame) -> list[str]:
    """Apply the catalogue's pool changes, then the bandit feedback (each row updates only its LLM)."""
    changes = router.apply_catalogue(config.llms)
    learn_from_feedback(router, feedback_rows, config.data.limits)
    return changes


def read_new_feedback(config: MixLLMConfig) -> tuple[pd.DataFrame, int]:
    """Feedback rows past the watermark (joined to their decisions), and the watermark itself."""
    from mixllm.io.store import InteractionLog

    url = config.sqlalchemy_url(config.service.feedback_store_url)
    store = InteractionLog(url)
    try:
        before = store.watermark()
        rows = store.feedback_since(before)
    finally:
        store.dispose()
    settle_s = config.pipeline.feedback_settle_s
    if settle_s is None:
        settle_s = 0.0 if url.startswith("sqlite") else 30.0
    return settled_prefix(rows, settle_s), before


def settled_prefix(rows: pd.DataFrame, settle_s: float, now: Any = None) -> pd.DataFrame:
    """The rows (in id order) up to the first one younger than `settle_s`: the watermark then never
    passes an id whose row may still be committing."""
    if rows.empty or settle_s <= 0:
        return rows
    created = pd.to_datetime(rows["created_at"], utc=True)  # SQLite gives naive UTC; PostgreSQL aware
    cutoff = pd.Timestamp.now(tz="UTC") if now is None else pd.Timestamp(now)
    young = (created > cutoff - pd.Timedelta(seconds=settle_s)).to_numpy()
    return rows.iloc[: int(np.argmax(young)) if young.any() else len(rows)]


def update_champion(config: MixLLMConfig, rows: pd.DataFrame) -> tuple[Path, int, list[str]]:
    """Load the champion, apply pool changes and the feedback, save it to the work folder."""
    from mixllm.io.registry import Registry

    router, champion_version = Registry(config).load_router("champion")
    changes = continual_update(config, router, rows)
    target = Workspace.of(config).root / "continual" / "router"
    replace_dir(target, router.save)
    logger.info("champion v%d updated with %d feedback rows; pool changes: %s", champion_version, len(rows),
                ", ".join(changes) or "none")
    return target, champion_version, changes


def register_update(config: MixLLMConfig, router_dir: Path, champion_version: int, rows: pd.DataFrame,
                    watermark_before: int) -> Registration:
    """Evaluate the updated router on the holdout and register it through the gate."""
    split = load_split(config)
    router = MixLLMRouter.load(router_dir, progress=False)
    router.cache_dir = Workspace.of(config).cache  # same encoder as the champion: embeddings are reused
    report = evaluate_router(config, router, split, baselines=[])
    return register_candidate(
        config, router_dir, report, split, run_name="continual",
        extra_tags={"mixllm.parent_version": str(champion_version), "mixllm.feedback_rows": str(len(rows)),
                    "mixllm.feedback_ids": f"{watermark_before + 1}-{int(rows['feedback_id'].max())}"},
    )


def advance_watermark(config: MixLLMConfig, value: int) -> None:
    from mixllm.io.store import InteractionLog

    store = InteractionLog(config.sqlalchemy_url(config.service.feedback_store_url))
    try:
        store.set_watermark(value)
    finally:
        store.dispose()


def recover_watermark(config: MixLLMConfig) -> int:
    """The watermark, first moved up to the feedback a registered version already learned.

    A run killed after registering its version but before advancing the watermark would otherwise
    have the next run learn the same rows a second time. Returns the watermark."""
    from mixllm.io.registry import Registry
    from mixllm.io.store import InteractionLog

    learned = 0
    for version in Registry(config).versions():
        span = version.tags.get("mixllm.feedback_ids", "")
        if "-" in span and span.rsplit("-", 1)[1].isdigit():
            learned = max(learned, int(span.rsplit("-", 1)[1]))
    store = InteractionLog(config.sqlalchemy_url(config.service.feedback_store_url))
    try:
        watermark = store.watermark()
        if learned > watermark:
            logger.warning("a continual run registered feedback up to id %d but stopped before moving the watermark "
                           "(%d); moving it now, so those rows are not learned twice", learned, watermark)
            store.set_watermark(learned)
            watermark = learned
    finally:
        store.dispose()
    return watermark


def compact_decisions(config: MixLLMConfig) -> dict[str, int]:
    """Keep the decision log bounded (service.decision_detail_days, service.decision_retention_days):
    old decisions' scores and old decisions without feedback, and upstream calls past retention."""
    from mixllm.io.attempts import AttemptLog
    from mixllm.io.store import InteractionLog

    store = InteractionLog(config.sqlalchemy_url(config.service.feedback_store_url))
    try:
        counts = store.compact(config.service.decision_detail_days, config.service.decision_retention_days)
        return {**counts, "attempts_deleted": AttemptLog(store).forget_older(config.service.decision_retention_days)}
    finally:
        store.dispose()


def _read_feedback(config: MixLLMConfig) -> tuple[pd.DataFrame, int]:
    recover_watermark(config)
    return read_new_feedback(config)


def _watch_drift(config: MixLLMConfig) -> dict[str, Any]:
    from mixllm.jobs.monitoring import watch_drift

    return watch_drift(config)


@dataclass(frozen=True)
class ContinualStep:
    """One step of a continual run. run_continual is the only wiring of the steps; the Prefect flow
    runs each step as a task of the same name (1:1) by handing run_continual its step runner."""

    name: str
    description: str
    run: Callable[..., Any]  # run(config, *earlier results)
    retries: int = 0


CONTINUAL_STEPS: tuple[ContinualStep, ...] = (
    ContinualStep("read", "read feedback past the watermark", _read_feedback, retries=2),
    ContinualStep("update", "update the champion (pool changes + partial_fit)", update_champion),
    # No retries: a retry after the version was created would register it twice. A failed
    # registration changes neither the champion nor the watermark; the next run repeats it.
    ContinualStep("register", "validate and register through the gate", register_update),
    ContinualStep("advance", "advance the watermark", advance_watermark),
    ContinualStep("compact", "compact the decision log", compact_decisions),
    ContinualStep("drift", "check drift and retrain on it", _watch_drift),
)
CONTINUAL_STEP = {step.name: step for step in CONTINUAL_STEPS}
StepRunner = Callable[..., Any]  # run_step(step, config, *args) -> the step's result


def run_step_here(step: ContinualStep, config: MixLLMConfig, *args: Any) -> Any:
    return step.run(config, *args)


def run_continual(config: MixLLMConfig, *, run_step: StepRunner = run_step_here,
                  watch_drift: bool = True) -> ContinualOutcome:
    """Read feedback past the watermark, partial_fit the champion, validate, register, gate; advance
    the watermark only after all of that succeeded (a failed run re-reads the same rows next time,
    and a run that died between registering and advancing is completed by the next one); then
    check the traffic for drift and retrain on it (watch_drift)."""

    def step(name: str, *args: Any) -> Any:
        return run_step(CONTINUAL_STEP[name], config, *args)

    rows, before = step("read")
    if len(rows) < config.pipeline.min_feedback_rows:
        logger.info("continual: %d new feedback rows (< %d): nothing to learn, nothing registered", len(rows),
                    config.pipeline.min_feedback_rows)
        step("compact")
        outcome = ContinualOutcome(len(rows), before, before, [], None)
    else:
        router_dir, champion_version, changes = step("update", rows)
        registration = step("register", router_dir, champion_version, rows, before)
        after = int(rows["feedback_id"].max())
        step("advance", after)
        step("compact")
        outcome = ContinualOutcome(len(rows), before, after, changes, registration)
        logger.info("continual: %s", outcome.summary())
    if watch_drift:
        outcome.drift = step("drift")
    return outcome

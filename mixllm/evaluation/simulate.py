"""Replays of a full-information log as a live stream: bandit feedback, pool changes, and load.

Online (the paper's continual-learning experiment): queries arrive one at a time in a fixed
order; the router picks one LLM, is shown only that LLM's logged outcome (its quality, or a
thumbs up/down for binary feedback, and its cost) and updates with `partial_fit`. LLMs can be
removed from the pool or added (with a prior only) at given steps.

Latency: RouterBench has no latencies, so every LLM serves calls with the service time of its
configured profile (per call + per output token, the tokens estimated from the logged response)
on `concurrency` parallel slots, first come first served. Queries arrive as a Poisson stream at a
given rate; the router sees the in-flight calls per LLM. The same stream is replayed with the
latency penalty on and off.
"""

from __future__ import annotations

import copy
import heapq
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from mixllm.config import LatencyProfile
from mixllm.core.decision import LoadSnapshot, decide, service_time_s
from mixllm.core.errors import MixLLMError
from mixllm.core.router import MixLLMRouter
from mixllm.evaluation.evaluate import Outcomes

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolEvent:
    """At `step`, `action` ("add" or "remove") the LLM `llm` (adds use `prices` in USD per 1k)."""

    step: int
    action: str
    llm: str
    prices: tuple[float, float] = (0.0, 0.0)


@dataclass
class OnlineResult:
    name: str
    choices: list[str]
    quality: np.ndarray  # realised quality per step
    cost_usd: np.ndarray
    window: int
    events: list[PoolEvent] = field(default_factory=list)

    @property
    def mean_quality(self) -> float:
        return float(self.quality.mean())

    @property
    def mean_cost_usd(self) -> float:
        return float(self.cost_usd.mean())

    def windows(self) -> pd.DataFrame:
        """Mean quality, mean cost and traffic share per LLM in consecutive windows of the stream."""
        rows = []
        for start in range(0, len(self.choices), self.window):
            stop = min(start + self.window, len(self.choices))
            picks = pd.Series(self.choices[start:stop]).value_counts(normalize=True)
            rows.append({"start": start, "stop": stop, "mean_quality": float(self.quality[start:stop].mean()),
                         "mean_cost_usd": float(self.cost_usd[start:stop].mean()),
                         **{f"share:{llm}": float(share) for llm, share in picks.items()}})
        return pd.DataFrame(rows).fillna(0.0)


def simulate_online(
    router: MixLLMRouter,
    queries: pd.DataFrame,
    outcomes: Outcomes,
    *,
    lambda_: float,
    exploration: float = 0.0,
    feedback: str = "refined",
    update: bool = True,
    features: np.ndarray | None = None,
    events: Sequence[PoolEvent] = (),
    window: int = 100,
    name: str | None = None,
) -> OnlineResult:
    """Stream `queries` (in the given order) through a copy of `router`, one bandit update per query.

    The router never sees an outcome other than that of the LLM it chose. `features` (one row
    per query, from `router.features`) skips re-encoding; they do not change with partial_fit,
    which updates predictors only.
    """
    if feedback not in ("refined", "binary"):
        raise MixLLMError(f"feedback must be refined or binary, got {feedback!r}")
    router = copy.deepcopy(router)
    texts = queries["query"].tolist()
    X = router.features(texts) if features is None else np.asarray(features)
    chars = np.array([len(q) for q in texts])
    by_step: dict[int, list[PoolEvent]] = {}
    for event in events:
        by_step.setdefault(event.step, []).append(event)
    choices: list[str] = []
    quality = np.zeros(len(texts))
    cost = np.zeros(len(texts))
    for i in range(len(texts)):
        for event in by_step.get(i, []):
            if event.action == "remove":
                router.remove_llm(event.llm)
            elif event.action == "add":
                router.add_llm(event.llm, *event.prices, lambda_=lambda_)
            else:
                raise MixLLMError(f"unknown pool event {event.action!r}; use add or remove")
        llms = router.enabled_llms_
        predictions = router.predict_from_features(X[i:i + 1], chars[i:i + 1], llms)
        column, _ = decide(predictions.quality, predictions.cost_usd, predictions.uncertainty,
                           np.zeros_like(predictions.quality), lambda_=lambda_, exploration=exploration,
                           cost_scale_usd=router.cost_scale_usd_)
        chosen = llms[int(column[0])]
        j = outcomes.llms.index(chosen)
        observed = float(outcomes.quality[i, j])
        quality[i], cost[i] = observed, float(outcomes.cost_usd[i, j])
        choices.append(chosen)
        if update:
            shown = float(observed >= 0.5) if feedback == "binary" else observed
            # Only the chosen LLM's outcome is revealed: one row, for that LLM alone.
            router.partial_fit(
                pd.DataFrame({"query": [texts[i]], "llm": [chosen], "quality": [shown], "cost_usd": [cost[i]]}),
                features=X[i:i + 1],
            )
    label = name or f"{'online' if update else 'offline'} ({feedback})"
    return OnlineResult(label, choices, quality, cost, window, list(events))


def oracle_stream(outcomes: Outcomes) -> OnlineResult:
    """Per query the cheapest LLM with the best logged quality: the upper bound of any stream."""
    best = outcomes.quality.max(axis=1, keepdims=True)
    cost = np.where(np.isclose(outcomes.quality, best), outcomes.cost_usd, np.inf)
    picks = cost.argmin(axis=1)
    rows = np.arange(len(picks))
    return OnlineResult("oracle", [outcomes.llms[j] for j in picks], outcomes.quality[rows, picks],
                        outcomes.cost_usd[rows, picks], 100)


# ----------------------------------------------------------------------------- adaptation


@dataclass(frozen=True)
class Adaptation:
    """How an online router treated an LLM that joined mid-stream, against a router that had it all along.

    Over the `window` queries after the join: the newcomer's traffic share under both, their mean
    quality and cost (as shares of the reference), the queries until the newcomer's share stays
    within `tolerance` of the full-pool router's (rolling windows of `rolling` queries; None when
    it never does inside the window), and the regret: the full-pool router's summed score
    (quality - lambda * cost / scale) minus the online router's, per query.
    """

    llm: str
    join_at: int
    window: int
    share_online: float
    share_full_pool: float
    quality_online_pct: float
    quality_full_pool_pct: float
    cost_online_pct: float
    cost_full_pool_pct: float
    queries_to_converge: int | None
    regret_per_query: float


def adaptation(online: OnlineResult, full_pool: OnlineResult, llm: str, join_at: int, window: int, *,
               lambda_: float, cost_scale_usd: float, reference_quality: float, reference_cost_usd: float,
               tolerance: float = 0.05, rolling: int = 100) -> Adaptation:
    """Compare `online` (the newcomer joined at `join_at`) with `full_pool` on the same stream."""
    stop = min(join_at + window, len(online.choices))
    if stop <= join_at:
        raise MixLLMError(f"the stream has {len(online.choices)} queries: nothing after join_at={join_at}")
    mine = np.array([c == llm for c in online.choices[join_at:stop]], dtype=float)
    theirs = np.array([c == llm for c in full_pool.choices[join_at:stop]], dtype=float)
    span = min(rolling, len(mine))
    kernel = np.ones(span) / span
    gap = np.abs(np.convolve(mine, kernel, mode="valid") - np.convolve(theirs, kernel, mode="valid"))
    outside = np.flatnonzero(gap > tolerance)
    if len(outside) == 0:
        converge: int | None = span
    elif outside[-1] + 1 < len(gap):
        converge = int(outside[-1] + 1 + span)
    else:
        converge = None
    score = lambda r: r.quality[join_at:stop] - lambda_ * r.cost_usd[join_at:stop] / cost_scale_usd  # noqa: E731
    return Adaptation(
        llm=llm, join_at=join_at, window=stop - join_at, share_online=float(mine.mean()),
        share_full_pool=float(theirs.mean()),
        quality_online_pct=100 * float(online.quality[join_at:stop].mean()) / reference_quality,
        quality_full_pool_pct=100 * float(full_pool.quality[join_at:stop].mean()) / reference_quality,
        cost_online_pct=100 * float(online.cost_usd[join_at:stop].mean()) / reference_cost_usd,
        cost_full_pool_pct=100 * float(full_pool.cost_usd[join_at:stop].mean()) / reference_cost_usd,
        queries_to_converge=converge,
        regret_per_query=float(np.mean(score(full_pool) - score(online))),
    )


def shifted_order(sources: Sequence[Any], seed: int = 0) -> tuple[np.ndarray, int]:
    """A stream order whose task mix changes about halfway, and the position where it changes:
    first the tasks that come first in a seeded shuffle, until at least half the queries are
    placed; then the other tasks (at least the last one, so the second part is never empty).
    Each part is shuffled."""
    sources = np.asarray([str(s) for s in sources])
    rng = np.random.default_rng(seed)
    tasks = list(np.unique(sources))
    rng.shuffle(tasks)
    first: list[int] = []
    for task in tasks[:-1]:
        if len(first) >= len(sources) / 2:
            break
        first.extend(np.flatnonzero(sources == task).tolist())
    second = sorted(set(range(len(sources))) - set(first))
    order = np.concatenate([rng.permutation(first), rng.permutation(second)]).astype(int)
    return order, len(first)


# ---------------------------------------------------------------------------------- latency


@dataclass
class LatencyResult:
    name: str
    mean_quality: float
    mean_cost_usd: float
    waits_s: dict[str, np.ndarray]  # queueing delay per call, per LLM
    traffic: dict[str, float]

    def table(self) -> pd.DataFrame:
        rows = []
        for llm, waits in sorted(self.waits_s.items()):
            rows.append({"llm": llm, "calls": len(waits),
                         "p50_wait_s": float(np.percentile(waits, 50)) if len(waits) else 0.0,
                         "p95_wait_s": float(np.percentile(waits, 95)) if len(waits) else 0.0})
        return pd.DataFrame(rows)

    def p95(self, llm: str) -> float:
        waits = self.waits_s.get(llm, np.zeros(0))
        return float(np.percentile(waits, 95)) if len(waits) else 0.0


def service_times(catalogue: Mapping[str, Mapping[str, Any]], llms: Sequence[str],
                  output_tokens: np.ndarray) -> np.ndarray:
    """Seconds each LLM needs per query: per-call time + per-token time x the query's output tokens."""
    times = np.zeros_like(output_tokens, dtype=float)
    for j, llm in enumerate(llms):
        times[:, j] = service_time_s(LatencyProfile(**catalogue[llm].get("latency", {})), output_tokens[:, j])
    return times


def simulate_latency(
    router: MixLLMRouter,
    queries: pd.DataFrame,
    outcomes: Outcomes,
    output_tokens: np.ndarray,
    *,
    arrival_rate_per_s: float,
    lambda_: float,
    penalty: bool,
    features: np.ndarray | None = None,
    seed: int = 0,
    name: str | None = None,
) -> LatencyResult:
    """Replay `queries` as Poisson arrivals against per-LLM queues; route with or without the penalty."""
    if arrival_rate_per_s <= 0:
        raise MixLLMError(f"arrival_rate_per_s must be > 0, got {arrival_rate_per_s}")
    llms = router.enabled_llms_
    texts = queries["query"].tolist()
    X = router.features(texts) if features is None else np.asarray(features)
    predictions = router.predict_from_features(X, np.array([len(q) for q in texts]), llms)
    column_of = [outcomes.llms.index(m) for m in llms]
    service = service_times(router.catalogue_, llms, output_tokens[:, column_of])
    concurrency = [LatencyProfile(**router.catalogue_[m].get("latency", {})).concurrency for m in llms]
    arrivals = np.cumsum(np.random.default_rng(seed).exponential(1.0 / arrival_rate_per_s, size=len(texts)))
    free_at = [[0.0] * c for c in concurrency]  # min-heaps of slot free times
    finishing: list[list[float]] = [[] for _ in llms]  # min-heaps of finish times, for in-flight counts
    tolerance = router._config.decision.latency_tolerance_s
    waits: dict[str, list[float]] = {m: [] for m in llms}
    quality = np.zeros(len(texts))
    cost = np.zeros(len(texts))
    for i, t in enumerate(arrivals):
        for heap in finishing:
            while heap and heap[0] <= t:
                heapq.heappop(heap)
        row = predictions.subset(slice(i, i + 1))
        if penalty:
            load = LoadSnapshot(in_flight={m: len(finishing[j]) for j, m in enumerate(llms)})
            p = router.latency_penalties(row, load, tolerance)
        else:
            p = np.zeros_like(row.quality)
        column, _ = decide(row.quality, row.cost_usd, row.uncertainty, p, lambda_=lambda_, exploration=0.0,
                           cost_scale_usd=router.cost_scale_usd_)
        j = int(column[0])
        slot_free = heapq.heappop(free_at[j])
        start = max(t, slot_free)
        finish = start + service[i, j]
        heapq.heappush(free_at[j], finish)
        heapq.heappush(finishing[j], finish)
        waits[llms[j]].append(start - t)
        quality[i] = outcomes.quality[i, column_of[j]]
        cost[i] = outcomes.cost_usd[i, column_of[j]]
    traffic = {m: len(w) / len(texts) for m, w in waits.items() if w}
    return LatencyResult(name or ("penalty on" if penalty else "penalty off"), float(quality.mean()),
                         float(cost.mean()), {m: np.array(w) for m, w in waits.items()}, traffic)

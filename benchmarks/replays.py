"""A log's holdout replayed as a live stream, for benchmarks/quality.py: online learning against the
static router, latency-aware routing, a task-mix shift halfway, and a pool change (newcomers joining
with a prior only, against the router that had them all along; the exploration weight chosen on the
validation part)."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pandas as pd

from mixllm.config import MixLLMConfig
from mixllm.core.router import MixLLMRouter
from mixllm.core.units import output_tokens_table
from mixllm.evaluation.baselines import query_frame
from mixllm.evaluation.evaluate import Outcomes
from mixllm.evaluation.simulate import PoolEvent, adaptation, shifted_order, simulate_latency, simulate_online
from mixllm.io.benchmark_config import DatasetConfig
from mixllm.io.workspace import SplitData
from mixllm.jobs.report import holdout_context, reference_on

EXPLORATION_GRID = (0.0, 0.1, 0.25, 0.5, 1.0)
ARRIVAL_RATE = 12.0  # queries/s in the latency replay: enough to queue the dearest LLM's four slots


def stream_of(frame: pd.DataFrame, outcomes: Outcomes, order: np.ndarray) -> tuple[pd.DataFrame, Outcomes]:
    stream = frame.iloc[order].reset_index(drop=True)
    return stream, Outcomes([outcomes.query_ids[i] for i in order], outcomes.llms, outcomes.quality[order],
                            outcomes.cost_usd[order])


def pool_change(router: MixLLMRouter, stream: pd.DataFrame, outcomes: Outcomes, lambda_: float, exploration: float,
                plan: Any, prices: dict[str, tuple[float, float]], features: np.ndarray,
                reference: Any) -> dict[str, Any]:
    """Newcomers join at plan.join_at with a prior only; others leave at plan.leave_at; compared with
    the router that had the full pool all along, both learning online with the same settings."""
    starting = copy.deepcopy(router)
    for llm in plan.join:
        starting.remove_llm(llm)
    events = ([PoolEvent(plan.join_at, "add", llm, prices[llm]) for llm in plan.join]
              + [PoolEvent(plan.leave_at, "remove", llm) for llm in plan.leave])
    online = simulate_online(starting, stream, outcomes, lambda_=lambda_, exploration=exploration, events=events,
                             features=features, name="pool change")
    # The full pool loses the leavers at the same step, so the only difference is the newcomers' start.
    full = simulate_online(router, stream, outcomes, lambda_=lambda_, exploration=exploration,
                           events=[PoolEvent(plan.leave_at, "remove", llm) for llm in plan.leave],
                           features=features, name="full pool")
    per_llm = {llm: adaptation(online, full, llm, plan.join_at, plan.window, lambda_=lambda_,
                               cost_scale_usd=router.cost_scale_usd_, reference_quality=reference.mean_quality,
                               reference_cost_usd=reference.mean_cost_usd) for llm in plan.join}
    return {"exploration": exploration, "per_llm": per_llm,
            "regret_per_query": float(np.mean([a.regret_per_query for a in per_llm.values()]))}


def simulate(config: MixLLMConfig, entry: DatasetConfig, router: MixLLMRouter, split: SplitData,
             lambda_: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    holdout_queries, outcomes, reference = holdout_context(config, split, router.enabled_llms_)
    order = np.random.default_rng(0).permutation(len(holdout_queries))
    stream, stream_outcomes = stream_of(holdout_queries, outcomes, order)
    features = router.features(stream["query"].tolist())
    share = lambda result: {"quality_pct": 100 * result.mean_quality / reference.mean_quality,  # noqa: E731
                            "cost_pct": 100 * result.mean_cost_usd / reference.mean_cost_usd}
    offline = simulate_online(router, stream, stream_outcomes, lambda_=lambda_, update=False, features=features)
    online = simulate_online(router, stream, stream_outcomes, lambda_=lambda_, features=features)
    binary = simulate_online(router, stream, stream_outcomes, lambda_=lambda_, feedback="binary", features=features)
    out["online"] = {"offline router": share(offline), "online, refined feedback": share(online),
                     "online, binary feedback": share(binary)}

    # Latency-aware routing, where the log has responses to estimate output tokens from.
    if "response" in split.holdout and split.holdout["response"].notna().any():
        tokens = output_tokens_table(split.holdout, holdout_queries["query_id"], router.enabled_llms_)
        plain_features = router.features(holdout_queries["query"].tolist())
        runs = {penalty: simulate_latency(router, holdout_queries, outcomes, tokens, arrival_rate_per_s=ARRIVAL_RATE,
                                          lambda_=lambda_, penalty=penalty, features=plain_features, seed=0)
                for penalty in (False, True)}
        overloaded = runs[False].table().set_index("llm")["p95_wait_s"].idxmax()
        out["latency"] = {"arrival_rate_per_s": ARRIVAL_RATE, "overloaded_llm": overloaded, "runs": {
            ("on" if penalty else "off"): {**share(result), "overloaded_share": result.traffic.get(overloaded, 0.0),
                                           "overloaded_p50_wait_s": float(np.percentile(result.waits_s.get(overloaded, [0]), 50)),
                                           "overloaded_p95_wait_s": result.p95(overloaded),
                                           "max_p95_wait_s": float(result.table()["p95_wait_s"].max())}
            for penalty, result in runs.items()}}

    # Task mix shifting halfway through the stream: learning online against the static router.
    if "source" in holdout_queries and holdout_queries["source"].nunique() > 1:
        shift_order, half = shifted_order(holdout_queries["source"].tolist(), seed=0)
        shift_stream, shift_outcomes = stream_of(holdout_queries, outcomes, shift_order)
        shift_features = router.features(shift_stream["query"].tolist())
        static = simulate_online(router, shift_stream, shift_outcomes, lambda_=lambda_, update=False,
                                 features=shift_features)
        learning = simulate_online(router, shift_stream, shift_outcomes, lambda_=lambda_, features=shift_features)
        first_tasks = sorted(set(shift_stream["source"].iloc[:half]))
        score = lambda r, part: float(np.mean((r.quality - lambda_ * r.cost_usd / router.cost_scale_usd_)[part]))  # noqa: E731
        out["mix_shift"] = {
            "first_half_tasks": first_tasks, "second_half_tasks": sorted(set(shift_stream["source"].iloc[half:])),
            "static": {"first": share_of(static, slice(0, half), reference), "second": share_of(static, slice(half, None), reference)},
            "online": {"first": share_of(learning, slice(0, half), reference), "second": share_of(learning, slice(half, None), reference)},
            "online_minus_static_score_second_half": score(learning, slice(half, None)) - score(static, slice(half, None)),
        }

    plan = entry.pool_change
    if plan is not None and plan.join and all(llm in router.llms_ for llm in plan.join + plan.leave):
        prices = {llm.name: (llm.input_usd_per_1k, llm.output_usd_per_1k) for llm in config.llms}
        # The exploration weight is chosen on the validation part, then measured on the holdout.
        validation_queries = query_frame(split.validation)
        validation_outcomes = Outcomes.from_log(split.validation, validation_queries["query_id"], router.enabled_llms_)
        v_order = np.random.default_rng(1).permutation(len(validation_queries))
        v_stream, v_outcomes = stream_of(validation_queries, validation_outcomes, v_order)
        v_features = router.features(v_stream["query"].tolist())
        v_reference = reference_on_validation(split, validation_queries, validation_outcomes, reference.llm)
        v_plan = plan.model_copy(update={"join_at": min(plan.join_at, len(v_stream) // 4),
                                         "leave_at": min(plan.leave_at, len(v_stream) // 2)})
        tuning = {alpha: pool_change(router, v_stream, v_outcomes, lambda_, alpha, v_plan, prices, v_features,
                                     v_reference)["regret_per_query"] for alpha in EXPLORATION_GRID}
        chosen = min(tuning, key=lambda a: (tuning[a], a))
        out["pool_change"] = {
            "plan": plan.model_dump(), "validation_regret_by_exploration": tuning, "chosen_exploration": chosen,
            "holdout": pool_change(router, stream, stream_outcomes, lambda_, chosen, plan, prices, features, reference),
            "holdout_without_exploration": pool_change(router, stream, stream_outcomes, lambda_, 0.0, plan, prices,
                                                       features, reference),
        }
    return out


def share_of(result: Any, part: slice, reference: Any) -> dict[str, float]:
    return {"quality_pct": 100 * float(result.quality[part].mean()) / reference.mean_quality,
            "cost_pct": 100 * float(result.cost_usd[part].mean()) / reference.mean_cost_usd}


def reference_on_validation(split: SplitData, queries: pd.DataFrame, outcomes: Outcomes, llm: str) -> Any:
    return reference_on(split.validation, queries["query_id"], outcomes, llm)

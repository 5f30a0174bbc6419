"""How a fitted MixLLMRouter chooses: per-request constraints (candidates, maximum predicted cost,
minimum predicted quality, relaxed when nothing is left), the meta decision and the decision policy
(decision.py), and the latency penalty from the live load. A mixin of MixLLMRouter: it reads the
fitted state the router's `fit` or `load` made."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from mixllm.config import LatencyProfile
from mixllm.core.decision import (
    CandidateScore,
    Decision,
    LoadSnapshot,
    Predictions,
    action_probabilities,
    decide,
    expected_latency_s,
    latency_penalty,
)
from mixllm.core.errors import RoutingError
from mixllm.core.router_inputs import check_number, check_tasks

_DRAW_LOCK = threading.Lock()


class RoutingMixin:
    """`route` and what it needs; MixLLMRouter provides the predictions and the fitted state."""

    def route(
        self,
        queries: Sequence[str],
        *,
        lambda_: float | None = None,
        exploration: float | None = None,
        latency_tolerance_s: float | None = None,
        candidates: Sequence[str] | None = None,
        max_cost_usd: float | None = None,
        min_quality: float | None = None,
        load: LoadSnapshot | None = None,
        predictions: Predictions | None = None,
        tasks: Sequence[str | None] | None = None,
    ) -> list[Decision]:
        """Choose an LLM for each query; overrides apply to this call only. `tasks` (one label or
        None per query) places a query in a known domain instead of predicting it from the text;
        an unknown label is ignored, and the decision's notes say so."""
        self._check_fitted()
        decision_config = self._config.decision
        lambda_ = check_number("lambda", self.default_lambda if lambda_ is None else lambda_)
        exploration = check_number("exploration", decision_config.exploration if exploration is None else exploration)
        tolerance = check_number(
            "latency_tolerance_s", decision_config.latency_tolerance_s if latency_tolerance_s is None else latency_tolerance_s
        )
        if max_cost_usd is not None:
            max_cost_usd = check_number("max_cost", max_cost_usd)
        if min_quality is not None:
            min_quality = check_number("min_quality", min_quality)
        llms = self._candidates(candidates)
        tasks = check_tasks(tasks, len(queries) if predictions is None else len(predictions.quality))
        if predictions is None:
            predictions = self.predict(queries, tasks)
        predictions = _select(predictions, llms)
        notes = [self._task_note(None if tasks is None else tasks[row]) for row in range(len(predictions.quality))]
        penalty = self.latency_penalties(predictions, load, tolerance)
        eligible = np.ones_like(predictions.quality, dtype=bool)
        relaxed: list[list[str]] = [[] for _ in range(len(predictions.quality))]
        for name, mask in (
            ("max_cost", predictions.cost_usd <= max_cost_usd if max_cost_usd is not None else None),
            ("min_quality", predictions.quality >= min_quality if min_quality is not None else None),
        ):
            if mask is None:
                continue
            combined = eligible & mask
            empty = ~combined.any(axis=1)
            for row in np.flatnonzero(empty):
                relaxed[row].append(name)
            eligible = np.where(empty[:, None], eligible, combined)
        best, scores = decide(
            predictions.quality, predictions.cost_usd, predictions.uncertainty, penalty,
            lambda_=lambda_, exploration=exploration, cost_scale_usd=self.cost_scale_usd_, eligible=eligible,
        )
        budget = decision_config.exploration_budget
        probabilities = action_probabilities(
            scores, predictions.cost_usd, best, policy=decision_config.policy, temperature=decision_config.temperature,
            epsilon=decision_config.epsilon, top_k=decision_config.top_k, max_leave_share=budget.share,
            max_cost_ratio=budget.max_cost_ratio)
        chosen = self._draw(probabilities, best)
        decisions = []
        for row, column in enumerate(chosen):
            if column != best[row]:
                notes[row] = "; ".join(n for n in (notes[row], f"explored: {llms[column]} (probability "
                                                   f"{probabilities[row, column]:.3f}) instead of {llms[best[row]]}") if n)
            decisions.append(
                Decision(
                    llm=llms[column],
                    candidates=tuple(
                        CandidateScore(
                            llm=llm, quality=float(predictions.quality[row, j]), cost_usd=float(predictions.cost_usd[row, j]),
                            uncertainty=float(predictions.uncertainty[row, j]), penalty=float(penalty[row, j]),
                            score=float(scores[row, j]) if np.isfinite(scores[row, j]) else float("-inf"),
                            eligible=bool(eligible[row, j]), probability=float(probabilities[row, j]),
                        )
                        for j, llm in enumerate(llms)
                    ),
                    lambda_=lambda_, exploration=exploration, relaxed=tuple(relaxed[row]),
                    notes=tuple(n for n in [notes[row]] if n),
                )
            )
        return decisions

    def _draw(self, probabilities: np.ndarray, best: np.ndarray) -> np.ndarray:
        """The LLM each row takes: the argmax, or a draw from a stochastic policy's probabilities."""
        if self._config.decision.policy == "argmax":
            return best
        with _DRAW_LOCK:  # a numpy Generator is not safe to share between threads unguarded
            if getattr(self, "_policy_rng", None) is None:
                self._policy_rng = np.random.default_rng(self._config.decision.seed)
            uniform = self._policy_rng.random(len(probabilities))
        cumulative = np.cumsum(probabilities, axis=1)
        return np.minimum((cumulative < uniform[:, None] * cumulative[:, -1:]).sum(axis=1), probabilities.shape[1] - 1)

    def _task_note(self, task: str | None) -> str | None:
        if task is None or self.domain_model_.task_index(task) is not None:
            return None
        known = self.tasks_
        return (f"task {task!r} is not one this router was trained on ({', '.join(known)}); routed by the text"
                if known else f"task {task!r} ignored: this router's domains are tag clusters; routed by the text")

    @property
    def known_lambda(self) -> float | None:
        """decision.lambda if set, else the one calibrated to the cost budget when the model was
        registered, else None (nothing says what lambda it routes at)."""
        configured = self._config.decision.lambda_
        if configured is not None:
            return float(configured)
        calibrated = getattr(self, "calibrated_lambda_", None)
        return None if calibrated is None else float(calibrated)  # a calibrated 0 is a real answer

    @property
    def default_lambda(self) -> float:
        """lambda when a request gives none: `known_lambda`, else 1."""
        known = self.known_lambda
        return 1.0 if known is None else known

    def _candidates(self, candidates: Sequence[str] | None) -> list[str]:
        enabled = self.enabled_llms_
        if not enabled:
            raise RoutingError("no enabled LLM to route to; enable one in params.yaml llms or add_llm")
        if candidates is None:
            return enabled
        if isinstance(candidates, str) or not isinstance(candidates, Sequence):
            raise RoutingError("candidates must be a list of LLM names", field="candidates")
        unknown = [c for c in candidates if c not in enabled]
        if unknown:
            raise RoutingError(
                f"unknown or disabled LLM(s) in candidates: {', '.join(map(str, unknown))}; choose from {', '.join(enabled)}",
                field="candidates",
            )
        if not candidates:
            raise RoutingError(f"candidates is empty; leave it out or choose from {', '.join(enabled)}", field="candidates")
        return [llm for llm in enabled if llm in set(candidates)]

    def latency_penalties(self, predictions: Predictions, load: LoadSnapshot | None, tolerance_s: float) -> np.ndarray:
        """P_m per query and LLM from the live load (no load: nothing in flight, profile latencies)."""
        decision_config = self._config.decision
        penalty = np.zeros_like(predictions.quality)
        if decision_config.latency_weight == 0:
            return penalty
        load = load or LoadSnapshot()
        for j, llm in enumerate(predictions.llms):
            profile = LatencyProfile(**self.catalogue_[llm].get("latency", {}))
            latency = expected_latency_s(profile, predictions.output_tokens[:, j], load.in_flight.get(llm, 0),
                                         load.observed_latency_s.get(llm))
            penalty[:, j] = latency_penalty(latency, tolerance_s, decision_config.latency_weight,
                                            decision_config.latency_scale_s)
        return penalty


def _select(predictions: Predictions, llms: list[str]) -> Predictions:
    if predictions.llms == llms:
        return predictions
    index = [predictions.llms.index(llm) for llm in llms]
    return Predictions(llms, predictions.quality[:, index], predictions.uncertainty[:, index],
                       predictions.cost_usd[:, index], predictions.output_tokens[:, index])

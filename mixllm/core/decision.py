"""The meta decision maker (pure maths, no state): each candidate's score and the choice.

    score_m = q_m - lambda * c_m / cost_scale + alpha * sigma_m - P_m

q_m and c_m are the predicted quality and dollars, cost_scale a dollar amount fixed at fit time
(the mean cost per query of the dearest LLM in the training log, unless set in the config) so
lambda is unit-free, sigma_m the quality predictor's posterior standard deviation (LinUCB-style
exploration), and P_m the latency penalty: zero while m's expected latency W_m is within the
tolerance tau, then latency_weight * (exp((W_m - tau) / latency_scale_s) - 1). W_m is the queueing
wait behind m's in-flight requests (beyond its concurrency, each costs one service time divided
by the concurrency) plus one service time (per-call time + per-output-token time x expected output
tokens; an observed latency replaces the profile when the caller has one).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from mixllm.config import LatencyProfile


@dataclass(frozen=True)
class CandidateScore:
    """Why an LLM was or was not chosen: its predictions and the parts of its score."""

    llm: str
    quality: float
    cost_usd: float
    uncertainty: float
    penalty: float
    score: float
    eligible: bool
    probability: float = 0.0  # under the decision policy (argmax: 1 for the choice, 0 for the rest)


@dataclass(frozen=True)
class Decision:
    """The routing decision for one query."""

    llm: str
    candidates: tuple[CandidateScore, ...]
    lambda_: float
    exploration: float
    relaxed: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def propensity(self) -> float:
        """The probability the decision policy gave the LLM chosen."""
        return next((c.probability for c in self.candidates if c.llm == self.llm), 1.0)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["lambda"] = out.pop("lambda_")
        out["candidates"] = [asdict(c) for c in self.candidates]
        return out


@dataclass
class LoadSnapshot:
    """The live load the latency penalty looks at: in-flight calls and observed latency per LLM."""

    in_flight: dict[str, int] = field(default_factory=dict)
    observed_latency_s: dict[str, float] = field(default_factory=dict)


@dataclass
class Predictions:
    """Per-query, per-LLM predictions: the input of the decision rule (reused across lambdas)."""

    llms: list[str]
    quality: np.ndarray  # (n_queries, n_llms)
    uncertainty: np.ndarray
    cost_usd: np.ndarray
    output_tokens: np.ndarray  # expected output tokens, for the latency model

    def subset(self, rows: np.ndarray | slice) -> Predictions:
        return Predictions(self.llms, self.quality[rows], self.uncertainty[rows], self.cost_usd[rows],
                           self.output_tokens[rows])


def latency_penalty(expected_latency_s: np.ndarray, tolerance_s: float, weight: float, scale_s: float) -> np.ndarray:
    """Zero up to the tolerance, then exponential in the excess (capped to stay finite)."""
    excess = np.maximum(np.asarray(expected_latency_s, dtype=np.float64) - tolerance_s, 0.0)
    return weight * np.expm1(np.minimum(excess / scale_s, 50.0))


def service_time_s(profile: LatencyProfile, output_tokens: np.ndarray) -> np.ndarray:
    """One call's expected service time: per call plus per expected output token."""
    return profile.per_call_s + profile.per_output_token_s * np.asarray(output_tokens, dtype=np.float64)


def expected_latency_s(profile: LatencyProfile, output_tokens: np.ndarray, in_flight: int,
                       observed_latency_s: float | None = None) -> np.ndarray:
    """Queue wait behind `in_flight` calls plus one service time (see the module docstring)."""
    service = service_time_s(profile, output_tokens)
    if observed_latency_s is not None and observed_latency_s > 0:
        service = np.full_like(service, observed_latency_s)
    queued = max(0, in_flight + 1 - profile.concurrency)
    return service + queued * service / profile.concurrency


def decide(
    quality: np.ndarray,
    cost_usd: np.ndarray,
    uncertainty: np.ndarray,
    penalty: np.ndarray,
    *,
    lambda_: float,
    exploration: float,
    cost_scale_usd: float,
    eligible: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Index of the best LLM per row and every score; ineligible LLMs score -inf.

    Ties go to the lower predicted cost, then to the lower column index, so decisions are repeatable.
    """
    score = quality - lambda_ * cost_usd / cost_scale_usd + exploration * uncertainty - penalty
    if eligible is not None:
        score = np.where(eligible, score, -np.inf)
    best = score.max(axis=1, keepdims=True)
    tied = np.isclose(score, best, rtol=0.0, atol=1e-12) & np.isfinite(score)
    cost_key = np.where(tied, cost_usd, np.inf)
    return cost_key.argmin(axis=1), score


def action_probabilities(score: np.ndarray, cost_usd: np.ndarray, best: np.ndarray, *, policy: str,
                         temperature: float, epsilon: float, top_k: int, max_leave_share: float,
                         max_cost_ratio: float) -> np.ndarray:
    """Each LLM's probability of being taken, per row, under the decision policy.

    `best` is decide's argmax per row. argmax: all of it on `best`. softmax: proportional to
    exp(score / temperature); epsilon_greedy: epsilon spread evenly over the next top_k - 1 scores.
    Either way only eligible LLMs (finite score) whose predicted cost is at most max_cost_ratio x the
    argmax's may be explored, and at most max_leave_share of the probability leaves the argmax.
    """
    n, m = score.shape
    rows = np.arange(n)
    probabilities = np.zeros((n, m))
    probabilities[rows, best] = 1.0
    if policy == "argmax" or max_leave_share <= 0 or m < 2:
        return probabilities
    explorable = np.isfinite(score) & (cost_usd <= max_cost_ratio * cost_usd[rows, best][:, None])
    explorable[rows, best] = False
    if policy == "softmax":
        top = score[rows, best][:, None]
        weights = np.where(explorable, np.exp(np.minimum((np.where(explorable, score, top) - top) / temperature, 0.0)),
                           0.0)
        others = weights / (1.0 + weights.sum(axis=1, keepdims=True))  # the argmax's own weight is exp(0) = 1
    elif policy == "epsilon_greedy":
        ranked = np.argsort(-np.where(explorable, score, -np.inf), axis=1)[:, : top_k - 1]
        chosen = np.zeros((n, m), dtype=bool)
        np.put_along_axis(chosen, ranked, True, axis=1)
        chosen &= explorable
        count = chosen.sum(axis=1, keepdims=True)
        others = np.where(chosen, epsilon / np.maximum(count, 1), 0.0)
    else:
        raise ValueError(f"unknown decision policy '{policy}'; use argmax, softmax or epsilon_greedy")
    leave = others.sum(axis=1, keepdims=True)
    others = np.where(leave > max_leave_share, others * (max_leave_share / np.maximum(leave, 1e-300)), others)
    probabilities = others
    probabilities[rows, best] = 1.0 - others.sum(axis=1)
    return probabilities


def fallback_ranking(chosen: str, candidates: Sequence[Any], allowed: Collection[str]) -> list[str]:
    """The LLMs to try for a decision, in order: the chosen one, then the other eligible candidates
    in `allowed` by descending score (each candidate has llm, score and eligible, as CandidateScore)."""
    others = sorted((c for c in candidates if c.eligible and c.llm != chosen and c.llm in allowed
                     and c.score is not None and np.isfinite(c.score)), key=lambda c: -c.score)
    return [chosen, *(c.llm for c in others)]

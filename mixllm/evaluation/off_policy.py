"""Off-policy evaluation (pure maths, no I/O): what another policy would have scored on traffic a
logging policy routed, from the logged probabilities.

For logged decisions i with action a_i taken with probability p_i by the logging policy, outcome
y_i (quality, or cost), a target policy's probabilities pi(a | x_i), and a model's predictions
yhat(x_i, a) for every action:

    IPS   = mean(w_i y_i),                      w_i = pi(a_i | x_i) / p_i
    SNIPS = sum(w_i y_i) / sum(w_i)
    DR    = mean(sum_a pi(a | x_i) yhat(x_i, a) + w_i (y_i - yhat(x_i, a_i)))

IPS is unbiased when every action the target takes has a positive logged probability; SNIPS trades
a little bias for less variance; DR is unbiased when either the probabilities or the model are
right. Intervals are percentile bootstraps over logged decisions. With a deterministic logging
policy (probability 1 on its argmax) only the decisions where both policies agree carry weight:
`support` says how many that is, and the estimates are then only as good as the model (DR).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mixllm.evaluation.bootstrap import Interval, bootstrap_weights

ESTIMATORS = ("ips", "snips", "dr")


@dataclass
class LoggedBandit:
    """Logged decisions and what a target policy would have done on them."""

    actions: np.ndarray  # (n,) index of the action taken
    logging_probability: np.ndarray  # (n,) its probability under the logging policy
    outcomes: np.ndarray  # (n,) observed outcome (quality or cost) of the action taken
    target_probabilities: np.ndarray  # (n, m) the target policy's probability of each action
    predicted: np.ndarray  # (n, m) a model's outcome for each action (for DR)

    def __post_init__(self) -> None:
        n = len(self.actions)
        if not (len(self.logging_probability) == len(self.outcomes) == len(self.target_probabilities)
                == len(self.predicted) == n):
            raise ValueError("every array of LoggedBandit needs one row per logged decision")
        if n and (np.any(self.logging_probability <= 0) or np.any(self.logging_probability > 1)):
            raise ValueError("logged probabilities must be in (0, 1]: a logged action had a probability")


def _estimates(data: LoggedBandit, counts: np.ndarray) -> dict[str, np.ndarray]:
    """Each estimator on each resample: `counts` (resamples x n) weights every logged decision."""
    rows = np.arange(len(data.actions))
    weight = data.target_probabilities[rows, data.actions] / data.logging_probability
    direct = (data.target_probabilities * data.predicted).sum(axis=1)
    residual = data.outcomes - data.predicted[rows, data.actions]
    total = counts.sum(axis=1)
    weighted = counts @ (weight * data.outcomes)
    normaliser = counts @ weight
    return {"ips": weighted / total,
            "snips": np.where(normaliser > 0, weighted / np.where(normaliser > 0, normaliser, 1.0), np.nan),
            "dr": counts @ (direct + weight * residual) / total}


def off_policy_estimates(data: LoggedBandit, *, resamples: int = 1000, confidence: float = 0.95,
                         seed: int = 0) -> dict[str, Any]:
    """IPS, SNIPS and DR with percentile bootstrap intervals, and the logged data's support."""
    n = len(data.actions)
    if n == 0:
        return {"n": 0, **{name: None for name in ESTIMATORS}, "support": 0, "effective_sample_size": 0.0}
    point = _estimates(data, np.ones((1, n)))
    replicates = _estimates(data, bootstrap_weights(n, resamples, seed))
    rows = np.arange(n)
    weight = data.target_probabilities[rows, data.actions] / data.logging_probability
    return {"n": n,
            **{name: Interval.of(float(point[name][0]), replicates[name], confidence) for name in ESTIMATORS},
            "support": int((weight > 0).sum()),
            # Kish's effective sample size of the importance weights: how many logged decisions the
            # estimate is really worth.
            "effective_sample_size": float(weight.sum() ** 2 / max((weight ** 2).sum(), 1e-300))}


def paired_difference(first: LoggedBandit, second: LoggedBandit, *, resamples: int = 1000,
                      confidence: float = 0.95, seed: int = 0) -> dict[str, Interval]:
    """Each estimator of `first`'s value minus `second`'s, on the same logged decisions (the same
    actions, probabilities and outcomes; two target policies), with a percentile interval from the
    same bootstrap resamples for both: the noise the two share cancels out of the difference."""
    n = len(first.actions)
    if n != len(second.actions) or not np.array_equal(first.actions, second.actions):
        raise ValueError("a paired difference needs both policies judged on the same logged decisions")
    if n == 0:
        return {name: Interval.of(None, np.array([]), confidence) for name in ESTIMATORS}
    point_a, point_b = _estimates(first, np.ones((1, n))), _estimates(second, np.ones((1, n)))
    counts = bootstrap_weights(n, resamples, seed)
    replicates_a, replicates_b = _estimates(first, counts), _estimates(second, counts)
    return {name: Interval.of(float(point_a[name][0] - point_b[name][0]), replicates_a[name] - replicates_b[name],
                              confidence) for name in ESTIMATORS}

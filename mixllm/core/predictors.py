"""Per-LLM quality and cost predictors.

Each LLM has its own pair, fitted only on its own interactions, so adding an LLM trains only its
pair and feedback on one LLM never moves another's predictions. The quality model learns what the
LLM's domain prior (domains.py) leaves over; by default it is a
Bayesian linear model (bayesian_linear.py): its posterior gives a mean (the predicted quality), an
uncertainty for LinUCB-style exploration, and exact incremental updates (`partial_fit`).
Other scikit-learn regressors can be chosen for the offline path; they have no uncertainty and
`partial_fit` refits them on all data seen.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np

from mixllm.core.bayesian_linear import BayesianLinearRegressor, VarianceMemo
from mixllm.core.errors import ConfigError, NotFittedError
from mixllm.core.estimator_base import BaseEstimator
from mixllm.core.units import call_cost_usd

logger = logging.getLogger(__name__)


def pool_mean(residual: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per query (row): the mean residual of the LLMs that answered it (NaN: did not), and how many did."""
    residual = np.asarray(residual, dtype=np.float64)
    answered = np.isfinite(residual).sum(axis=1)
    return np.nansum(residual, axis=1) / np.maximum(answered, 1), answered


def departures(residual: np.ndarray) -> np.ndarray:
    """Each LLM's residual minus the mean residual of the LLMs that answered the same query: the
    part that ranks LLMs (a shift shared by every LLM never changes the argmax). Queries fewer
    than two LLMs answered show no departure (NaN)."""
    mean, answered = pool_mean(residual)
    result = np.asarray(residual, dtype=np.float64) - mean[:, None]
    result[answered < 2] = np.nan
    return result


SKLEARN_QUALITY_MODELS = ("random_forest", "knn", "mlp", "gradient_boosting")


def make_sklearn_regressor(kind: str, random_state: int) -> Any:
    from sklearn.ensemble import HistGradientBoostingRegressor, RandomForestRegressor
    from sklearn.neighbors import KNeighborsRegressor
    from sklearn.neural_network import MLPRegressor

    if kind == "random_forest":
        return RandomForestRegressor(n_estimators=200, min_samples_leaf=5, n_jobs=1, random_state=random_state)
    if kind == "knn":
        return KNeighborsRegressor(n_neighbors=25, weights="distance")
    if kind == "mlp":
        return MLPRegressor(hidden_layer_sizes=(128,), alpha=1e-2, early_stopping=True, max_iter=300,
                            random_state=random_state)
    if kind == "gradient_boosting":
        return HistGradientBoostingRegressor(max_iter=200, learning_rate=0.05, random_state=random_state)
    raise ConfigError(
        f"unknown quality predictor '{kind}'; choose bayesian_linear, {', '.join(SKLEARN_QUALITY_MODELS)} "
        "(params.yaml: predictors.quality.kind)"
    )


class QualityPredictor(BaseEstimator):
    """Expected quality (0..1) of one LLM for a query representation, with an uncertainty.

    It models what a prior leaves over: fit, partial_fit and predict take `prior` (one value per
    row, e.g. the LLM's mean quality in the query's domain) and the model learns quality - prior,
    starting from "the prior is right" (`prior_mean` is the residual's prior mean, 0 by default).
    Without a prior it models quality itself. `kind="bayesian_linear"` (default) is
    exact-incremental and gives sigma; the scikit-learn kinds keep their training data so
    `partial_fit` can refit, and report sigma = 0.
    """

    def __init__(self, kind: str = "bayesian_linear", ridge: float = 1.0, noise_scale: float = 0.5,
                 prior_mean: float = 0.0, random_state: int = 0):
        self.kind = kind
        self.ridge = ridge
        self.noise_scale = noise_scale
        self.prior_mean = prior_mean
        self.random_state = random_state

    def _linear(self) -> BayesianLinearRegressor:
        return BayesianLinearRegressor(ridge=self.ridge, prior_mean=self.prior_mean, noise_scale=self.noise_scale)

    @staticmethod
    def _offset(prior: np.ndarray | None, n: int) -> np.ndarray:
        return np.zeros(n) if prior is None else np.asarray(prior, dtype=np.float64).reshape(n)

    def fit(self, X: np.ndarray, y: np.ndarray, prior: np.ndarray | None = None) -> QualityPredictor:
        X = np.asarray(X, dtype=np.float64)
        residual = np.asarray(y, dtype=np.float64) - self._offset(prior, len(X))
        if self.kind == "bayesian_linear":
            self.model_ = self._linear().fit(X, residual)
        else:
            self.model_ = make_sklearn_regressor(self.kind, self.random_state).fit(X, residual)
            self.X_seen_, self.y_seen_ = X, residual
        self.n_features_in_ = X.shape[1]
        return self

    def start_empty(self, n_features: int, precision: np.ndarray | None = None) -> QualityPredictor:
        """A model that has seen nothing yet: the prior, with the prior's (large) uncertainty. For add_llm.
        `precision`: one prior precision per coefficient (the bias last) instead of `ridge` for all."""
        if self.kind != "bayesian_linear":
            raise ConfigError("only the bayesian_linear quality predictor can start without data (add_llm)")
        self.model_ = self._linear()
        self.model_._init_stats(n_features, precision)
        self.n_features_in_ = n_features
        return self

    def partial_fit(self, X: np.ndarray, y: np.ndarray, prior: np.ndarray | None = None) -> QualityPredictor:
        if not hasattr(self, "model_"):
            return self.fit(X, y, prior)
        X = np.asarray(X, dtype=np.float64)
        residual = np.asarray(y, dtype=np.float64) - self._offset(prior, len(X))
        if self.kind == "bayesian_linear":
            self.model_.partial_fit(X, residual)
        else:
            self.X_seen_ = np.vstack([self.X_seen_, X])
            self.y_seen_ = np.concatenate([self.y_seen_, residual])
            self.model_ = make_sklearn_regressor(self.kind, self.random_state).fit(self.X_seen_, self.y_seen_)
        return self

    def predict(self, X: np.ndarray, prior: np.ndarray | None = None, return_std: bool = False,
                memo: VarianceMemo | None = None) -> Any:
        """`memo`: see BayesianLinearRegressor.predict."""
        if not hasattr(self, "model_"):
            raise NotFittedError("QualityPredictor is not fitted")
        X = np.asarray(X, dtype=np.float64)
        offset = self._offset(prior, len(X))
        if self.kind == "bayesian_linear":
            residual, std = self.model_.predict(X, return_std=True, memo=memo)
        else:
            residual = self.model_.predict(X)
            std = np.zeros(len(X))
        mean = np.clip(offset + residual, 0.0, 1.0)
        return (mean, std) if return_std else mean

    @property
    def n_samples_seen_(self) -> int:
        if self.kind == "bayesian_linear":
            return int(self.model_.n_samples_seen_)
        return int(len(self.y_seen_))


def share_posteriors(heads: Iterable[QualityPredictor]) -> None:
    """Let Bayesian heads whose posteriors have the same precision matrix hold one copy of it (A and
    A^-1). Every head trained on the same queries with the same ridge has it (all the LLMs of a
    full-information log), so routing then computes a query's uncertainty once for all of them
    (VarianceMemo), and memory holds one copy instead of one per LLM. The shared arrays are made
    read-only: an update replaces them rather than writing into them, so an LLM's feedback gives it
    its own again."""
    kept: list[BayesianLinearRegressor] = []
    for head in heads:
        model = getattr(head, "model_", None)
        if not isinstance(model, BayesianLinearRegressor) or not hasattr(model, "A_inv_"):
            continue
        twin = next((k for k in kept if k.A_.shape == model.A_.shape and np.array_equal(k.A_, model.A_)
                     and np.array_equal(k.A_inv_, model.A_inv_)), None)
        if twin is None:
            model.A_.setflags(write=False)
            model.A_inv_.setflags(write=False)
            kept.append(model)
        else:
            model.A_, model.A_inv_ = twin.A_, twin.A_inv_


class CostPredictor(BaseEstimator):
    """Expected dollars of one LLM for a query.

    With token counts in the log, it predicts output tokens (linear on the representation) and
    input tokens (linear on the query's length) and prices them from the catalogue, so a price
    change takes effect at once. Without them it regresses the logged cost on a log scale (in
    units of `cost_scale_usd`): costs are positive, skewed, and grow multiplicatively with length
    and task, which a linear model in dollars fits badly (on the RouterBench subset the log model
    cut the mean relative error from 17% to 5%). The mean is recovered with Duan's smearing factor.
    """

    def __init__(self, ridge: float = 1.0, input_usd_per_1k: float = 0.0, output_usd_per_1k: float = 0.0,
                 cost_scale_usd: float = 1.0, prior_cost_usd: float = 0.0):
        self.ridge = ridge
        self.input_usd_per_1k = input_usd_per_1k
        self.output_usd_per_1k = output_usd_per_1k
        self.cost_scale_usd = cost_scale_usd
        self.prior_cost_usd = prior_cost_usd

    def fit(self, X: np.ndarray, cost_usd: np.ndarray, query_chars: np.ndarray,
            input_tokens: np.ndarray | None = None, output_tokens: np.ndarray | None = None) -> CostPredictor:
        cost = np.asarray(cost_usd, dtype=np.float64)
        priced = np.isfinite(cost)
        # Without a stated prior cost, the data's mean sets the prior and the log floor.
        typical = self.prior_cost_usd if self.prior_cost_usd > 0 or not priced.any() else float(cost[priced].mean())
        self._start(np.asarray(X).shape[1], typical)
        self.partial_fit(X, cost_usd, query_chars, input_tokens, output_tokens)
        if priced.sum() >= 2:
            residual = self._log_cost(cost[priced]) - self.cost_model_.predict(np.asarray(X, dtype=np.float64)[priced])
            self.smearing_ = float(np.clip(np.mean(np.exp(residual)), 0.5, 5.0))
        return self

    def _log_cost(self, cost_usd: np.ndarray) -> np.ndarray:
        return np.log(np.maximum(cost_usd, 0.0) / self.cost_scale_usd + self.floor_)

    def _start(self, n_features: int, typical_cost_usd: float | None = None) -> None:
        # Costs of zero (a free model) have a log too: a floor of 1% of the LLM's typical cost.
        typical_cost_usd = self.prior_cost_usd if typical_cost_usd is None else typical_cost_usd
        typical = max(typical_cost_usd, 0.0) / self.cost_scale_usd
        self.floor_ = max(0.01 * typical, 1e-9)
        self.smearing_ = 1.0
        self.cost_model_ = BayesianLinearRegressor(ridge=self.ridge, prior_mean=float(np.log(typical + self.floor_)))
        self.cost_model_._init_stats(n_features)
        # Token models start at "about 4 characters per token" and "no output" until data says otherwise.
        self.input_tokens_model_ = BayesianLinearRegressor(ridge=self.ridge, prior_mean=0.0, clip_low=0.0)
        self.input_tokens_model_._init_stats(1)
        self.input_tokens_model_.b_[0] = self.ridge * 250.0  # prior: 250 tokens per 1k characters
        self.input_tokens_model_.coef_ = self.input_tokens_model_.A_inv_ @ self.input_tokens_model_.b_
        self.output_tokens_model_ = BayesianLinearRegressor(ridge=self.ridge, prior_mean=0.0, clip_low=0.0)
        self.output_tokens_model_._init_stats(n_features)
        self.uses_tokens_ = False
        self.n_features_in_ = n_features

    def start_empty(self, n_features: int) -> CostPredictor:
        self._start(n_features)
        return self

    def partial_fit(self, X: np.ndarray, cost_usd: np.ndarray, query_chars: np.ndarray,
                    input_tokens: np.ndarray | None = None, output_tokens: np.ndarray | None = None) -> CostPredictor:
        if not hasattr(self, "cost_model_"):
            self._start(np.asarray(X).shape[1])
        X = np.asarray(X, dtype=np.float64)
        cost = np.asarray(cost_usd, dtype=np.float64)
        priced = np.isfinite(cost)  # an unknown cost (NaN) must not be learned as $0
        if priced.any():
            self.cost_model_.partial_fit(X[priced], self._log_cost(cost[priced]))
        if input_tokens is not None and output_tokens is not None:
            tokens_in = np.asarray(input_tokens, dtype=np.float64)
            tokens_out = np.asarray(output_tokens, dtype=np.float64)
            known = np.isfinite(tokens_in) & np.isfinite(tokens_out)
            if known.any():
                chars = np.asarray(query_chars, dtype=np.float64)[known, None] / 1000.0
                self.input_tokens_model_.partial_fit(chars, tokens_in[known])
                self.output_tokens_model_.partial_fit(X[known], tokens_out[known])
                self.uses_tokens_ = True
        return self

    def predict(self, X: np.ndarray, query_chars: np.ndarray) -> np.ndarray:
        if not hasattr(self, "cost_model_"):
            raise NotFittedError("CostPredictor is not fitted")
        if self.uses_tokens_:
            tokens_in = self.input_tokens_model_.predict(np.asarray(query_chars, dtype=np.float64)[:, None] / 1000.0)
            tokens_out = self.output_tokens_model_.predict(X)
            return call_cost_usd(tokens_in, tokens_out, self.input_usd_per_1k, self.output_usd_per_1k)
        log_cost = np.minimum(self.cost_model_.predict(X), 50.0)  # exp stays finite on any input
        return np.maximum(np.exp(log_cost) * self.smearing_ - self.floor_, 0.0) * self.cost_scale_usd

    def predict_output_tokens(self, X: np.ndarray) -> np.ndarray | None:
        return self.output_tokens_model_.predict(X) if getattr(self, "uses_tokens_", False) else None

    def state(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {"uses_tokens": np.array(self.uses_tokens_), "floor": np.array(self.floor_),
                                      "smearing": np.array(self.smearing_)}
        for name in ("cost_model_", "input_tokens_model_", "output_tokens_model_"):
            for key, value in getattr(self, name).state().items():
                out[f"{name.rstrip('_')}.{key}"] = value
        return out

    @classmethod
    def from_state(cls, params: dict[str, Any], state: dict[str, np.ndarray]) -> CostPredictor:
        model = cls(**params)
        for name in ("cost_model_", "input_tokens_model_", "output_tokens_model_"):
            prefix = f"{name.rstrip('_')}."
            sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            clip = {} if name == "cost_model_" else {"clip_low": 0.0}
            setattr(model, name, BayesianLinearRegressor.from_state({"ridge": params["ridge"], **clip}, sub))
        model.uses_tokens_ = bool(state["uses_tokens"])
        model.floor_ = float(state["floor"])
        model.smearing_ = float(state["smearing"])
        model.n_features_in_ = model.cost_model_.n_features_in_
        return model

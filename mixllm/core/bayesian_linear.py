"""The Bayesian linear model every quality head and the shared difficulty head use, and the ridge
they are fitted with.

The model is kept as sufficient statistics (A = rho*I + sum x x^T, b = rho*theta0 + sum r x): its
posterior gives a mean, an uncertainty sigma = s*sqrt(x^T A^-1 x) for LinUCB-style exploration, and
exact incremental updates (`partial_fit`) in microseconds per row. The ridge (rho) is chosen by
generalised cross-validation (`gcv_ridge`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mixllm.core.errors import ConfigError, NotFittedError
from mixllm.core.estimator_base import BaseEstimator


class VarianceMemo:
    """x^T A^-1 x per row of X, computed once per (posterior, input) for as long as the memo lives
    (one batch of predictions). Every head of a freshly trained router shares one posterior
    (share_posteriors), and these d x d products were most of a single query's prediction time:
    11 heads read 11 copies of a 1.2 MB matrix. The memo holds what it has seen, so no id it keys
    on can be reused by another array while it lives."""

    def __init__(self) -> None:
        self._seen: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def variance(self, A_inv: np.ndarray, X: np.ndarray, Xb: np.ndarray) -> np.ndarray:
        key = (id(A_inv), id(X))
        hit = self._seen.get(key)
        if hit is None:
            # One BLAS product: unoptimised einsum took half of routing's time.
            hit = self._seen[key] = (A_inv, X, np.sum((Xb @ A_inv) * Xb, axis=1))
        return hit[2]


class BayesianLinearRegressor(BaseEstimator):
    """Linear regression with a Gaussian prior, as sufficient statistics (LinUCB's A and b).

    A bias column is appended to every x. The prior mean predicts `prior_mean` everywhere
    (theta0 = [0, ..., 0, prior_mean]); `ridge` is its precision. Targets outside
    [clip_low, clip_high] are clipped on the way out, not in the statistics.
    """

    def __init__(self, ridge: float = 1.0, prior_mean: float = 0.0, noise_scale: float = 1.0,
                 clip_low: float | None = None, clip_high: float | None = None):
        self.ridge = ridge
        self.prior_mean = prior_mean
        self.noise_scale = noise_scale
        self.clip_low = clip_low
        self.clip_high = clip_high

    @staticmethod
    def _with_bias(X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        return np.hstack([X, np.ones((X.shape[0], 1))])

    def _init_stats(self, n_features: int, precision: np.ndarray | None = None) -> None:
        """The prior as statistics: precision `ridge` on every coefficient, or one per coefficient
        (`precision`, the bias last), e.g. a looser one where the prior is known to be rough."""
        d = n_features + 1
        diagonal = np.full(d, float(self.ridge)) if precision is None else np.asarray(precision, dtype=np.float64)
        if diagonal.shape != (d,) or not np.all(diagonal > 0):
            raise ValueError(f"precision needs {d} positive values (the bias last), got {diagonal.shape}")
        self.A_ = np.diag(diagonal)
        theta0 = np.zeros(d)
        theta0[-1] = self.prior_mean
        self.b_ = diagonal * theta0
        self.n_features_in_ = n_features
        self.n_samples_seen_ = 0
        # The prior's posterior is known in closed form: no factorisation needed.
        self.A_inv_ = np.diag(1.0 / diagonal)
        self.coef_ = theta0

    def _solve(self) -> None:
        from threadpoolctl import threadpool_limits

        # One BLAS thread: these matrices are small, and threads fighting torch's for two cores
        # made a 400x400 factorisation 10x slower.
        with threadpool_limits(limits=1, user_api="blas"):
            # Cholesky: A is symmetric positive definite by construction (ridge > 0).
            chol = np.linalg.cholesky(self.A_)
            chol_inv = np.linalg.solve(chol, np.eye(self.A_.shape[0]))
            self.A_inv_ = chol_inv.T @ chol_inv
            self.coef_ = self.A_inv_ @ self.b_

    def fit(self, X: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None) -> BayesianLinearRegressor:
        X = np.asarray(X, dtype=np.float64)
        self._init_stats(X.shape[1])
        return self._update(X, y, sample_weight)

    def partial_fit(self, X: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None) -> BayesianLinearRegressor:
        X = np.asarray(X, dtype=np.float64)
        if not hasattr(self, "A_"):
            self._init_stats(X.shape[1])
        elif X.shape[1] != self.n_features_in_:
            raise ValueError(f"expected {self.n_features_in_} features, got {X.shape[1]}")
        return self._update(X, y, sample_weight)

    def _update(self, X: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None) -> BayesianLinearRegressor:
        y = np.asarray(y, dtype=np.float64).ravel()
        if not len(y):
            return self
        Xb = self._with_bias(X)
        w = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        self.A_ = self.A_ + (Xb * w[:, None]).T @ Xb
        self.b_ = self.b_ + Xb.T @ (w * y)
        self.n_samples_seen_ += len(y)
        if hasattr(self, "A_inv_") and len(y) <= self.sherman_morrison_max_rows:
            # A few rows (bandit feedback): rank-one Sherman-Morrison updates of A^-1 cost O(d^2)
            # each instead of O(d^3) for a fresh factorisation.
            A_inv = self.A_inv_
            for row, weight in zip(Xb, w):
                Av = A_inv @ row
                A_inv = A_inv - np.outer(Av, Av) * (weight / (1.0 + weight * row @ Av))
            self.A_inv_ = A_inv
            self.coef_ = self.A_inv_ @ self.b_
        else:
            self._solve()
        return self

    sherman_morrison_max_rows = 16

    def _check(self) -> None:
        if not hasattr(self, "coef_"):
            raise NotFittedError("BayesianLinearRegressor is not fitted; call fit or partial_fit first")

    def predict(self, X: np.ndarray, return_std: bool = False, memo: VarianceMemo | None = None) -> Any:
        """`memo` (one per batch of inputs) lets models that share their posterior (share_posteriors)
        compute the uncertainty of the same inputs once."""
        self._check()
        X = np.asarray(X, dtype=np.float64)
        Xb = self._with_bias(X)
        mean = Xb @ self.coef_
        if self.clip_low is not None or self.clip_high is not None:
            mean = np.clip(mean, self.clip_low, self.clip_high)
        if not return_std:
            return mean
        variance = (memo or VarianceMemo()).variance(self.A_inv_, X, Xb)
        return mean, self.noise_scale * np.sqrt(np.maximum(variance, 0.0))

    def state(self) -> dict[str, np.ndarray]:
        """Arrays that fully describe the fitted model (for a plain .npz file)."""
        self._check()
        # A^-1 and the coefficients are saved too: after incremental updates they are not bit-for-bit
        # what a fresh factorisation of A gives, and a loaded model must predict exactly as saved.
        return {"A": self.A_, "b": self.b_, "A_inv": self.A_inv_, "coef": self.coef_,
                "n_samples_seen": np.array(self.n_samples_seen_)}

    @classmethod
    def from_state(cls, params: dict[str, Any], state: dict[str, np.ndarray]) -> BayesianLinearRegressor:
        model = cls(**params)
        model.A_ = np.asarray(state["A"], dtype=np.float64)
        model.b_ = np.asarray(state["b"], dtype=np.float64)
        model.n_features_in_ = model.A_.shape[0] - 1
        model.n_samples_seen_ = int(state["n_samples_seen"])
        if "A_inv" in state and "coef" in state:
            model.A_inv_ = np.asarray(state["A_inv"], dtype=np.float64)
            model.coef_ = np.asarray(state["coef"], dtype=np.float64)
        else:
            model._solve()
        return model


def gcv_ridge(X: np.ndarray, Y: np.ndarray, grid: tuple[float, ...] | list[float]) -> tuple[float, dict[float, float]]:
    """The ridge in `grid` with the least generalised cross-validation error, summed over the
    columns of Y, for the model BayesianLinearRegressor fits (a penalised bias column appended).

    GCV is leave-one-out's rotation-invariant cousin: one SVD gives every ridge's error at once.
    NaN targets (an LLM that did not answer a query) are skipped: columns are scored on their own rows.
    """
    if not len(grid):
        raise ConfigError("predictors.quality.ridge_grid is empty; list ridges to choose from, or set ridge")
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64).reshape(len(X), -1)
    scores = {float(a): 0.0 for a in grid}
    masks: dict[bytes, list[int]] = {}
    for j in range(Y.shape[1]):
        masks.setdefault(np.isfinite(Y[:, j]).tobytes(), []).append(j)
    for key, columns in masks.items():
        rows = np.frombuffer(key, dtype=bool)
        if rows.sum() < 3:
            continue
        Xb = np.hstack([X[rows], np.ones((int(rows.sum()), 1))])
        U, singular, _ = np.linalg.svd(Xb, full_matrices=False)
        targets = Y[rows][:, columns]
        projected = U.T @ targets
        n = len(targets)
        for alpha in scores:
            shrink = singular**2 / (singular**2 + alpha)
            fitted = U @ (shrink[:, None] * projected)
            dof = shrink.sum()
            scores[alpha] += float(((targets - fitted) ** 2).mean(axis=0).sum() / max(1.0 - dof / n, 1e-6) ** 2)
    best = min(scores, key=lambda a: (scores[a], -a))  # ties: the stronger prior
    return best, scores

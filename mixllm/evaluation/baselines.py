"""Baseline routers, all behind one interface so the harness treats them like MixLLM.

Every router turns a frame of queries (query_id, query, source) into `Predictions` — expected
quality, uncertainty and cost per LLM — and the shared decision rule (`router.decide`) turns
predictions and lambda into choices. Learned baselines (kNN, MLP, TF-IDF logistic, per-source)
therefore trace a quality-cost curve over lambda just as MixLLM does; fixed ones (random,
cheapest, a single LLM) give one point. The oracle gets the holdout's own labels: an upper bound.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from mixllm.core.decision import Predictions
from mixllm.core.errors import ConfigError, NotFittedError
from mixllm.core.estimator_base import BaseEstimator
from mixllm.core.router import MixLLMRouter
from mixllm.core.units import outcome_tables

logger = logging.getLogger(__name__)


def query_frame(log: pd.DataFrame) -> pd.DataFrame:
    """One row per query (query_id, query, source), in first-seen order."""
    columns = [c for c in ("query_id", "query", "source") if c in log.columns]
    return log.drop_duplicates("query_id")[columns].reset_index(drop=True)


class LengthCostModel(BaseEstimator):
    """Per-LLM cost as a line in the query's length: the cost model every learned baseline shares."""

    def fit(self, log: pd.DataFrame) -> LengthCostModel:
        self.coef_: dict[str, tuple[float, float]] = {}
        for llm, rows in log.groupby("llm"):
            chars = rows["query"].str.len().to_numpy(dtype=float)
            cost = rows["cost_usd"].to_numpy(dtype=float)
            design = np.column_stack([chars, np.ones_like(chars)])
            slope, intercept = np.linalg.lstsq(design, cost, rcond=None)[0]
            self.coef_[llm] = (float(slope), float(intercept))
        return self

    def predict(self, queries: Sequence[str], llms: Sequence[str]) -> np.ndarray:
        chars = np.array([len(q) for q in queries], dtype=float)
        return np.column_stack([np.maximum(self.coef_[m][0] * chars + self.coef_[m][1], 0.0) for m in llms])


class BaselineRouter(BaseEstimator):
    """Common parts: the LLM list, the cost model, and `predict` -> Predictions."""

    sweeps_lambda = True  # False: one point, whatever lambda
    uses_task_label = False  # True: reads each query's true task (source), which a caller may not send
    uses_outcomes = False  # True: reads the evaluation queries' own outcomes (an upper bound, not a router)

    def _fit_common(self, log: pd.DataFrame) -> None:
        self.llms_ = sorted(log["llm"].unique())
        self.cost_model_ = LengthCostModel().fit(log)
        self.cost_scale_usd_ = float(log.groupby("llm")["cost_usd"].mean().max())

    def _quality(self, queries: pd.DataFrame) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def predict(self, queries: pd.DataFrame) -> Predictions:
        if not hasattr(self, "llms_"):
            raise NotFittedError(f"{type(self).__name__} is not fitted")
        quality = np.asarray(self._quality(queries), dtype=float)
        cost = self._cost(queries)
        zeros = np.zeros_like(quality)
        return Predictions(list(self.llms_), quality, zeros, cost, zeros)

    def _cost(self, queries: pd.DataFrame) -> np.ndarray:
        return self.cost_model_.predict(queries["query"].tolist(), self.llms_)


class RandomRouter(BaselineRouter):
    """A uniformly random LLM per query (seeded)."""

    sweeps_lambda = False

    def __init__(self, random_state: int = 0):
        self.random_state = random_state

    def fit(self, log: pd.DataFrame) -> RandomRouter:
        self._fit_common(log)
        return self

    def _quality(self, queries: pd.DataFrame) -> np.ndarray:
        rng = np.random.default_rng(self.random_state)
        picks = rng.integers(len(self.llms_), size=len(queries))
        return np.eye(len(self.llms_))[picks]

    def _cost(self, queries: pd.DataFrame) -> np.ndarray:
        return np.zeros((len(queries), len(self.llms_)))


class SingleLLMRouter(BaselineRouter):
    """Always the same LLM; `llm=None` picks the best mean quality on the training log."""

    sweeps_lambda = False

    def __init__(self, llm: str | None = None):
        self.llm = llm

    def fit(self, log: pd.DataFrame) -> SingleLLMRouter:
        self._fit_common(log)
        means = log.groupby("llm")["quality"].mean()
        self.llm_ = self.llm if self.llm is not None else str(means.idxmax())
        if self.llm_ not in self.llms_:
            raise ConfigError(f"unknown LLM '{self.llm_}'; choose from {', '.join(self.llms_)}")
        return self

    def _quality(self, queries: pd.DataFrame) -> np.ndarray:
        onehot = np.zeros((len(queries), len(self.llms_)))
        onehot[:, self.llms_.index(self.llm_)] = 1.0
        return onehot

    def _cost(self, queries: pd.DataFrame) -> np.ndarray:
        return np.zeros((len(queries), len(self.llms_)))


class CheapestRouter(SingleLLMRouter):
    """Always the LLM with the lowest mean cost on the training log."""

    def __init__(self):
        super().__init__(llm=None)

    def fit(self, log: pd.DataFrame) -> CheapestRouter:
        self._fit_common(log)
        self.llm_ = str(log.groupby("llm")["cost_usd"].mean().idxmin())
        return self


class OracleRouter(BaselineRouter):
    """Knows each holdout query's true quality and cost: at lambda 0 it picks the cheapest LLM that
    reaches the query's best quality. An upper bound, never a deployable router."""

    uses_outcomes = True

    def fit(self, log: pd.DataFrame) -> OracleRouter:
        self._fit_common(log)
        self.quality_, self.cost_ = outcome_tables(log, self.llms_)
        return self

    def _quality(self, queries: pd.DataFrame) -> np.ndarray:
        return self.quality_.reindex(queries["query_id"]).to_numpy(dtype=float)

    def _cost(self, queries: pd.DataFrame) -> np.ndarray:
        return self.cost_.reindex(queries["query_id"]).to_numpy(dtype=float)


class PerSourceRouter(BaselineRouter):
    """Mean quality and cost of each LLM within the query's source (task/benchmark) on train."""

    uses_task_label = True

    def fit(self, log: pd.DataFrame) -> PerSourceRouter:
        self._fit_common(log)
        self.table_ = log.groupby(["source", "llm"])["quality"].mean().unstack().reindex(columns=self.llms_)
        self.overall_ = log.groupby("llm")["quality"].mean().reindex(self.llms_)
        return self

    def _quality(self, queries: pd.DataFrame) -> np.ndarray:
        rows = self.table_.reindex(queries["source"]).to_numpy(dtype=float)
        return np.where(np.isnan(rows), self.overall_.to_numpy()[None, :], rows)


class EmbeddingRegressorRouter(BaselineRouter):
    """Per-LLM quality regressed on a frozen encoder's embedding (RouterBench's kNN and MLP routers)."""

    def __init__(self, kind: str = "knn", embed: Any = None, n_neighbors: int = 40, random_state: int = 0):
        self.kind = kind
        self.embed = embed  # queries -> embeddings (e.g. a frozen QueryEncoder's transform, cached)
        self.n_neighbors = n_neighbors
        self.random_state = random_state

    def _regressor(self) -> Any:
        from sklearn.neighbors import KNeighborsRegressor
        from sklearn.neural_network import MLPRegressor

        if self.kind == "knn":
            return KNeighborsRegressor(n_neighbors=self.n_neighbors, metric="cosine")
        if self.kind == "mlp":
            return MLPRegressor(hidden_layer_sizes=(128,), alpha=1e-2, early_stopping=True, max_iter=400,
                                random_state=self.random_state)
        raise ConfigError(f"unknown embedding baseline '{self.kind}'; choose knn or mlp")

    def _embed(self, queries: pd.DataFrame) -> np.ndarray:
        if self.embed is None:
            raise ConfigError(f"the {self.kind} baseline needs an embed function (queries -> vectors)")
        return np.asarray(self.embed(queries["query"].tolist()))

    def fit(self, log: pd.DataFrame) -> EmbeddingRegressorRouter:
        self._fit_common(log)
        frame = query_frame(log)
        X = self._embed(frame)
        quality, _ = outcome_tables(log, self.llms_)
        quality = quality.reindex(frame["query_id"])
        self.models_ = {}
        for j, llm in enumerate(self.llms_):
            known = quality[llm].notna().to_numpy()
            self.models_[llm] = self._regressor().fit(X[known], quality[llm].to_numpy()[known])
        return self

    def _quality(self, queries: pd.DataFrame) -> np.ndarray:
        X = self._embed(queries)
        return np.column_stack([np.clip(self.models_[m].predict(X), 0, 1) for m in self.llms_])


class TfidfLogisticRouter(BaselineRouter):
    """Per-LLM logistic regression on TF-IDF terms (binary quality) or ridge (graded quality)."""

    def __init__(self, C: float = 1.0, max_features: int = 20000):
        self.C = C
        self.max_features = max_features

    def fit(self, log: pd.DataFrame) -> TfidfLogisticRouter:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression, Ridge

        self._fit_common(log)
        frame = query_frame(log)
        self.vectorizer_ = TfidfVectorizer(ngram_range=(1, 2), min_df=2, max_features=self.max_features,
                                           sublinear_tf=True)
        X = self.vectorizer_.fit_transform(frame["query"])
        quality, _ = outcome_tables(log, self.llms_)
        quality = quality.reindex(frame["query_id"])
        self.models_ = {}
        for llm in self.llms_:
            y = quality[llm].to_numpy()
            known = ~np.isnan(y)
            binary = np.isin(y[known], (0.0, 1.0)).all() and len(np.unique(y[known])) == 2
            model = LogisticRegression(C=self.C, max_iter=2000) if binary else Ridge(alpha=1.0 / self.C)
            self.models_[llm] = model.fit(X[known], y[known] if not binary else y[known].astype(int))
        return self

    def _quality(self, queries: pd.DataFrame) -> np.ndarray:
        X = self.vectorizer_.transform(queries["query"])
        columns = []
        for llm in self.llms_:
            model = self.models_[llm]
            columns.append(model.predict_proba(X)[:, 1] if hasattr(model, "predict_proba") else np.clip(model.predict(X), 0, 1))
        return np.column_stack(columns)


class MixLLMAdapter(BaseEstimator):
    """A fitted MixLLMRouter seen through the baseline interface (queries frame -> Predictions).

    With `with_task`, each query's `source` is passed as its task (the caller knows the task)."""

    sweeps_lambda = True
    uses_outcomes = False

    def __init__(self, router: MixLLMRouter, with_task: bool = False):
        self.router = router
        self.with_task = with_task

    @property
    def uses_task_label(self) -> bool:
        return self.with_task

    def fit(self, log: pd.DataFrame) -> MixLLMAdapter:
        self.router.fit(log)
        return self

    @property
    def llms_(self) -> list[str]:
        return self.router.enabled_llms_

    @property
    def cost_scale_usd_(self) -> float:
        return self.router.cost_scale_usd_

    def predict(self, queries: pd.DataFrame) -> Predictions:
        texts = queries["query"].tolist()
        tasks = queries["source"].tolist() if self.with_task and "source" in queries else None
        return self.router.predict_from_features(self.router.features(texts, tasks),
                                                 np.array([len(q) for q in texts]), self.llms_)


def make_baseline(name: str, *, embed: Any = None, random_state: int = 0) -> BaselineRouter:
    """The ROUTERS registry: one name -> one baseline, used by the CLI, flows and benchmark."""
    factories = {
        "random": lambda: RandomRouter(random_state=random_state),
        "cheapest": CheapestRouter,
        "best_single": lambda: SingleLLMRouter(llm=None),
        "oracle": OracleRouter,
        "knn": lambda: EmbeddingRegressorRouter("knn", embed=embed, random_state=random_state),
        "mlp": lambda: EmbeddingRegressorRouter("mlp", embed=embed, random_state=random_state),
        "tfidf_logistic": TfidfLogisticRouter,
        "per_source": PerSourceRouter,
    }
    if name not in factories:
        raise ConfigError(f"unknown baseline '{name}'; choose from {', '.join(factories)} (evaluation.baselines)")
    return factories[name]()


BASELINE_NAMES = ("random", "cheapest", "best_single", "oracle", "knn", "mlp", "tfidf_logistic", "per_source")

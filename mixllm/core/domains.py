"""Domains: which kind of query this is, and how well each LLM does on that kind.

MixLLM groups queries into domains (clusters of their tags) and lets the domain shape the quality
prediction. We make that grouping the prior of every LLM's quality head:

    q_m(x) = sum_d P(d | x) * T[d, m]  +  head_m(x)

T[d, m] is LLM m's mean quality on the training queries of domain d, shrunk toward m's overall
mean by `prior_strength` pseudo-queries (small domains do not get extreme means), and head_m is
m's Bayesian linear model of the rest (router.py). On every shared routing log the per-domain
mean was most of the learnable signal, and a per-query model on its own could not find it
through the noise of 0/1 outcomes (benchmarks/RESULTS.md).

The labels are the log's task labels (`source`) when it has them, else the tag domains.
P(d | x) comes from a multinomial logistic regression on the query features, its C chosen by
cross-validated log-loss. The training queries' own probabilities are out-of-fold: in-sample
ones are overconfident, and the heads fitted on them would then trust the prior more than live
queries deserve. A caller that knows the task (the `task` of a route request) gets P(d | x) =
one-hot on that task instead.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from mixllm.core.errors import NotFittedError, RoutingError
from mixllm.core.estimator_base import BaseEstimator

logger = logging.getLogger(__name__)


def domain_labels(sources: Sequence[Any] | None, tag_domains: np.ndarray | None, mode: str,
                  min_queries: int) -> tuple[np.ndarray, str]:
    """Per training query: its domain label ("" when none) and where the labels came from.

    `mode` auto takes the task labels when at least two of them have `min_queries` queries each,
    else the tag domains (as "tags:<id>"); source / tags force one."""
    def usable(labels: np.ndarray) -> np.ndarray:
        values, counts = np.unique(labels[labels != ""], return_counts=True)
        keep = set(values[counts >= min_queries].tolist())
        return np.array([label if label in keep else "" for label in labels], dtype=object)

    from_source = None
    if sources is not None:
        from_source = usable(np.array(["" if s is None or (isinstance(s, float) and np.isnan(s)) else str(s)
                                       for s in sources], dtype=object))
    from_tags = None
    if tag_domains is not None:
        from_tags = usable(np.array([f"tags:{int(d)}" if d >= 0 else "" for d in tag_domains], dtype=object))
    if mode in ("auto", "source") and from_source is not None and len(set(from_source) - {""}) >= 2:
        return from_source, "source"
    if mode == "source":
        logger.warning("domains.labels is source but the log has fewer than two task labels with enough queries; "
                       "using the tag domains")
    if from_tags is not None and len(set(from_tags) - {""}) >= 2:
        return from_tags, "tags"
    n = len(sources) if sources is not None else (len(tag_domains) if tag_domains is not None else 0)
    return np.array([""] * n, dtype=object), "none"


class DomainModel(BaseEstimator):
    """P(domain | query features) and each LLM's shrunk mean quality per domain.

    `fit(X, labels, quality, llms)`: X the query features, labels one per query ("" for none),
    quality a (queries x LLMs) matrix with NaN where an LLM did not answer (bandit logs).
    With fewer than two domains there is one domain, and the prior is each LLM's overall mean.
    """

    def __init__(self, classifier_c: Sequence[float] = (0.003, 0.01, 0.03, 0.1), prior_strength: float = 5.0,
                 cross_fit_folds: int = 5, random_state: int = 0):
        self.classifier_c = classifier_c
        self.prior_strength = prior_strength
        self.cross_fit_folds = cross_fit_folds
        self.random_state = random_state

    # ---------------------------------------------------------------------------------------- fit

    def fit(self, X: np.ndarray, labels: Sequence[str], quality: np.ndarray, llms: Sequence[str]) -> DomainModel:
        X = np.asarray(X, dtype=np.float64)
        labels = np.asarray(["" if label is None else str(label) for label in labels], dtype=object)
        quality = np.asarray(quality, dtype=np.float64)
        if len(labels) != X.shape[0] or quality.shape[0] != X.shape[0]:
            raise ValueError(f"X has {X.shape[0]} rows, labels {len(labels)}, quality {quality.shape[0]}")
        self.llms_ = list(llms)
        # The classifier standardises its input itself, so classifier_c means the same whatever the
        # caller's scaling of the features.
        self.mean_ = X.mean(axis=0)
        scale = X.std(axis=0)
        self.scale_ = np.where(scale > 1e-12, scale, 1.0)
        X = (X - self.mean_) / self.scale_
        self.classes_ = sorted(set(labels.tolist()) - {""})
        labelled = labels != ""
        if len(self.classes_) < 2:
            self.classes_ = ["all"]
            self.coef_ = np.zeros((1, X.shape[1]))
            self.intercept_ = np.zeros(1)
            self.c_ = float("nan")
            self.cv_log_loss_ = float("nan")
            self.train_proba_ = np.ones((X.shape[0], 1))
            hard = np.ones((X.shape[0], 1))
        else:
            index = {c: i for i, c in enumerate(self.classes_)}
            y = np.array([index[label] for label in labels[labelled]])
            proba, self.c_, self.cv_log_loss_ = self._cross_fit(X[labelled], y)
            model = self._classifier(self.c_).fit(X[labelled], y)
            self.coef_ = model.coef_ if len(self.classes_) > 2 else np.vstack([-model.coef_[0], model.coef_[0]]) / 2
            self.intercept_ = (model.intercept_ if len(self.classes_) > 2
                               else np.array([-model.intercept_[0], model.intercept_[0]]) / 2)
            # Unlabelled training queries get the final model's probabilities; labelled ones their
            # out-of-fold probabilities.
            self.train_proba_ = self._proba(X, standardised=True)
            self.train_proba_[labelled] = proba
            hard = np.zeros((X.shape[0], len(self.classes_)))
            hard[np.flatnonzero(labelled), y] = 1.0
        self.table_ = self._shrunk_means(hard, quality)
        self.overall_ = np.array([np.nanmean(quality[:, j]) if np.isfinite(quality[:, j]).any() else np.nan
                                  for j in range(quality.shape[1])])
        self.counts_ = hard.sum(axis=0)
        self.n_features_in_ = X.shape[1]
        logger.info("domains: %d (%s); classifier C=%s, cross-validated log-loss %.3f", len(self.classes_),
                    ", ".join(self.classes_[:8]) + (" ..." if len(self.classes_) > 8 else ""), self.c_,
                    self.cv_log_loss_)
        return self

    def _classifier(self, c: float) -> Any:
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(C=c, max_iter=2000)

    def _cross_fit(self, X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float, float]:
        """Out-of-fold probabilities for the best C, that C, and its mean log-loss."""
        from sklearn.model_selection import StratifiedKFold

        n_classes = len(self.classes_)
        folds = min(self.cross_fit_folds, int(np.bincount(y).min()))
        if folds < 2:  # a class with one query: no honest out-of-fold estimate, in-sample it is
            c = float(max(self.classifier_c))
            model = self._classifier(c).fit(X, y)
            return model.predict_proba(X), c, float("nan")
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=self.random_state)
        splits = list(splitter.split(X, y))
        best: tuple[float, float, np.ndarray] | None = None
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="blas"):  # small problems: threads only contend
            for c in self.classifier_c:
                proba = np.zeros((len(y), n_classes))
                for train, test in splits:
                    model = self._classifier(float(c)).fit(X[train], y[train])
                    proba[np.ix_(test, model.classes_)] = model.predict_proba(X[test])
                loss = float(-np.mean(np.log(np.clip(proba[np.arange(len(y)), y], 1e-12, 1.0))))
                if best is None or loss < best[0]:
                    best = (loss, float(c), proba)
        loss, c, proba = best
        return proba, c, loss

    def _shrunk_means(self, membership: np.ndarray, quality: np.ndarray) -> np.ndarray:
        """Per domain and LLM: (sum of quality + k * overall mean) / (answered queries + k)."""
        answered = np.isfinite(quality)
        values = np.where(answered, quality, 0.0)
        overall = values.sum(axis=0) / np.maximum(answered.sum(axis=0), 1)
        sums = membership.T @ values
        counts = membership.T @ answered.astype(float)
        k = self.prior_strength
        table = (sums + k * overall) / np.maximum(counts + k, 1e-12)
        return np.where(counts + k > 0, table, overall)

    # ------------------------------------------------------------------------------------ predict

    def _check_fitted(self) -> None:
        if not hasattr(self, "table_"):
            raise NotFittedError("DomainModel is not fitted; call fit(X, labels, quality, llms)")

    def _proba(self, X: np.ndarray, standardised: bool = False) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        if not standardised:
            X = (X - self.mean_) / self.scale_
        logits = X @ self.coef_.T + self.intercept_
        logits -= logits.max(axis=1, keepdims=True)
        proba = np.exp(logits)
        return proba / proba.sum(axis=1, keepdims=True)

    def predict_proba(self, X: np.ndarray, tasks: Sequence[str | None] | None = None) -> np.ndarray:
        """P(domain | x) per row; a row whose task names a known domain gets that domain for sure."""
        self._check_fitted()
        proba = self._proba(X)
        if tasks is not None:
            if len(tasks) != proba.shape[0]:
                raise RoutingError(f"got {len(tasks)} tasks for {proba.shape[0]} queries")
            for row, task in enumerate(tasks):
                column = self.task_index(task)
                if column is not None:
                    proba[row] = 0.0
                    proba[row, column] = 1.0
        return proba

    def task_index(self, task: str | None) -> int | None:
        """The domain column a task label names, or None (no task, or one the router never saw)."""
        if task is None or task == "" or task not in self.classes_ or self.classes_ == ["all"]:
            return None
        return self.classes_.index(task)

    def prior(self, proba: np.ndarray, llms: Sequence[str]) -> np.ndarray:
        """Expected quality of each LLM given the domain probabilities: (queries x llms)."""
        self._check_fitted()
        columns = [self.llms_.index(llm) for llm in llms]
        return np.asarray(proba) @ self.table_[:, columns]

    # ---------------------------------------------------------------------------------- the pool

    def add_llm(self, name: str, per_domain_quality: np.ndarray) -> None:
        """A new LLM's prior column (one value per domain)."""
        self._check_fitted()
        column = np.asarray(per_domain_quality, dtype=np.float64).reshape(-1, 1)
        if column.shape[0] != self.table_.shape[0]:
            raise ValueError(f"need {self.table_.shape[0]} per-domain values, got {column.shape[0]}")
        self.table_ = np.hstack([self.table_, column])
        self.overall_ = np.append(self.overall_, float(column.mean()))
        self.llms_.append(name)

    def remove_llm(self, name: str) -> None:
        self._check_fitted()
        j = self.llms_.index(name)
        self.table_ = np.delete(self.table_, j, axis=1)
        self.overall_ = np.delete(self.overall_, j)
        self.llms_.pop(j)

    def describe(self) -> list[dict[str, Any]]:
        """Each domain with its training size and its best LLM by mean quality."""
        self._check_fitted()
        rows = []
        for d, name in enumerate(self.classes_):
            best = int(np.argmax(self.table_[d])) if self.llms_ else None
            rows.append({"domain": name, "training_queries": int(self.counts_[d]),
                         "best_llm": None if best is None else self.llms_[best],
                         "best_mean_quality": None if best is None else float(self.table_[d, best])})
        return rows

    # ----------------------------------------------------------------------------- persistence

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(JSON-able metadata, arrays) that fully describe the fitted model."""
        self._check_fitted()
        meta = {"params": self.get_params(), "classes": list(self.classes_), "llms": list(self.llms_),
                "c": self.c_, "cv_log_loss": self.cv_log_loss_}
        arrays = {"coef": self.coef_, "intercept": self.intercept_, "mean": self.mean_, "scale": self.scale_,
                  "table": self.table_,
                  "overall": self.overall_, "counts": self.counts_}
        return meta, arrays

    @classmethod
    def from_state(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> DomainModel:
        params = dict(meta["params"])
        params["classifier_c"] = tuple(params["classifier_c"])
        model = cls(**params)
        model.classes_ = list(meta["classes"])
        model.llms_ = list(meta["llms"])
        model.c_ = float(meta["c"]) if meta["c"] is not None else float("nan")
        model.cv_log_loss_ = float(meta["cv_log_loss"]) if meta["cv_log_loss"] is not None else float("nan")
        model.coef_ = np.asarray(arrays["coef"], dtype=np.float64)
        model.intercept_ = np.asarray(arrays["intercept"], dtype=np.float64)
        model.mean_ = np.asarray(arrays["mean"], dtype=np.float64)
        model.scale_ = np.asarray(arrays["scale"], dtype=np.float64)
        model.table_ = np.asarray(arrays["table"], dtype=np.float64)
        model.overall_ = np.asarray(arrays["overall"], dtype=np.float64)
        model.counts_ = np.asarray(arrays["counts"], dtype=np.float64)
        model.n_features_in_ = model.coef_.shape[1]
        return model

"""MixLLMRouter: domains (task labels or tag clusters) -> domain-enhanced encoder -> per-LLM
predictors (domain prior + Bayesian residual head, cost) -> meta decision (decision.py).

q_m is LLM m's mean quality in the query's domain (domains.py) plus what its head predicts on top
(predictors.py); the head's ridge is chosen by generalised cross-validation on the training data.
The decision rule, score_m = q_m - lambda * c_m / cost_scale + alpha * sigma_m - P_m, and the
latency penalty P_m are in decision.py.

The class is split by role: this module fits and predicts (and saves, through router_format),
routing.py chooses (per-request constraints, the decision policy, latency penalties), and
online_learning.py learns from feedback and changes the pool without a retrain.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mixllm import __version__
from mixllm.config import LLMConfig, MixLLMConfig, config_from_dict
from mixllm.core import estimators
from mixllm.core.bayesian_linear import BayesianLinearRegressor, VarianceMemo, gcv_ridge
from mixllm.core.decision import Predictions
from mixllm.core.domains import domain_labels
from mixllm.core.embeddings import EmbeddingCache, QueryEncoder
from mixllm.core.errors import NotFittedError, RoutingError
from mixllm.core.estimator_base import BaseEstimator
from mixllm.core.online_learning import OnlineLearningMixin
from mixllm.core.predictors import CostPredictor, QualityPredictor, departures, pool_mean, share_posteriors
from mixllm.core.router_inputs import check_log, check_queries, check_tasks, token_columns
from mixllm.core.routing import RoutingMixin
from mixllm.core.units import outcome_tables, typical_output_tokens

if TYPE_CHECKING:  # pandas is imported where a frame is made: a service start (logs, router, a route) never needs it
    import pandas as pd

logger = logging.getLogger(__name__)

DRIFT_REFERENCE_ROWS = 500  # training queries kept (their features) for the drift monitor: drift.npz


class MixLLMRouter(RoutingMixin, OnlineLearningMixin, BaseEstimator):
    """The MixLLM router as one estimator: `fit`, `route`, `partial_fit`, `add_llm`, `remove_llm`, `save`/`load`.

    `config` carries every setting (the typed params.yaml); ablations are config changes.
    `cache_dir` keeps embeddings on disk between runs; `progress` forces progress bars on/off.
    """

    def __init__(self, config: MixLLMConfig | None = None, cache_dir: str | Path | None = None,
                 progress: bool | None = None):
        self.config = config
        self.cache_dir = cache_dir
        self.progress = progress

    # ------------------------------------------------------------------------------------------ fit

    @property
    def _config(self) -> MixLLMConfig:
        return self.config if self.config is not None else config_from_dict({})

    def _embed(self, encoder: QueryEncoder, queries: list[str]) -> np.ndarray:
        if self.cache_dir is None:
            return encoder.transform(queries)
        return EmbeddingCache(self.cache_dir).transform(encoder, queries)

    def fit(self, log: pd.DataFrame, *, domains: Mapping[str, str] | None = None,
            encoder: QueryEncoder | None = None, tag_report: dict[str, Any] | None = None) -> MixLLMRouter:
        """Train on a long interaction log (full-information or bandit) of the training queries.

        `domains` (query_id -> domain label, from `fit_domains`, with its `tag_report`) and `encoder`
        (from `fit_encoder`) let a pipeline run those stages separately and cache them; when absent
        they are computed here. Everything an earlier fit or use left behind is reset.
        """
        config = self._config
        started = time.perf_counter()
        # State that fit does not set below, from an earlier fit, partial_fit or training's choice.
        self.n_feedback_ = 0
        self.backend_choice_ = None
        self._policy_rng = None  # the stochastic policy's draws start again from decision.seed
        log = check_log(log)
        catalogue = {llm.name: llm for llm in config.llms}
        unknown = sorted(set(log["llm"]) - set(catalogue)) if catalogue else []
        if unknown:
            raise RoutingError(f"the log has LLMs missing from params.yaml llms: {', '.join(unknown)}; add them there")
        columns = ["query_id", "query"] + (["source"] if "source" in log.columns else [])
        queries_frame = log.drop_duplicates("query_id")[columns].reset_index(drop=True)
        queries = queries_frame["query"].tolist()
        self.timings_: dict[str, float] = {}
        logger.info("fitting on %d interactions: %d queries x %d LLMs", len(log), len(queries), log["llm"].nunique())

        sources = queries_frame["source"].tolist() if "source" in queries_frame else None
        if domains is None:
            labels, self.tag_report_ = self.fit_domains(queries, sources)
        else:
            labels = queries_frame["query_id"].astype(str).map(lambda q: domains.get(q, "")).fillna("").to_numpy(dtype=object)
            self.tag_report_ = tag_report if tag_report is not None else {"enabled": True, "precomputed": True}
        t = time.perf_counter()
        self.encoder_ = encoder if encoder is not None else self.fit_encoder(queries, labels)
        self.encoder_probes_ = None  # this machine's vectors for the probe sentences are made at save
        self.encoder_check_ = None
        self.timings_["fine_tune_s"] = time.perf_counter() - t
        t = time.perf_counter()
        embeddings = self._embed(self.encoder_, queries)
        self.timings_["embed_s"] = time.perf_counter() - t
        features_config = config.features
        self.featurizer_ = estimators.query_featurizer(config).fit(queries, embeddings)
        base = self.featurizer_.transform(queries, embeddings)
        # What the drift monitor compares recent traffic with: a sample of the training queries' features.
        keep = np.random.default_rng(0).permutation(len(base))[:DRIFT_REFERENCE_ROWS]
        self.drift_reference_ = np.asarray(base[np.sort(keep)], dtype=np.float32)
        import pandas as pd

        row_of = pd.Series(np.arange(len(queries)), index=queries_frame["query_id"].to_numpy())
        log = log.assign(_row=log["query_id"].map(row_of).to_numpy())
        llms = sorted(log["llm"].unique())
        quality = outcome_tables(log, llms, queries_frame["query_id"], repeats="mean")[0].to_numpy(dtype=np.float64)

        t = time.perf_counter()
        domains_config = config.domains
        if not features_config.use_domains:
            labels = np.array([""] * len(queries), dtype=object)
        self.domain_model_ = estimators.domain_model(config).fit(base, labels, quality, llms)
        self.domain_weight_ = float(domains_config.weight)
        self.n_base_features_ = base.shape[1]
        X = self.join_domain_proba(base, self.domain_model_.train_proba_)
        self.n_features_in_ = X.shape[1]
        prior = self.domain_model_.prior(self.domain_model_.train_proba_, llms)
        self.timings_["domains_s"] = time.perf_counter() - t

        per_llm_cost = log.groupby("llm")["cost_usd"].mean()
        self.cost_scale_usd_ = float(config.decision.cost_scale_usd or max(per_llm_cost.max(), 1e-12))
        self.mean_quality_ = float(log["quality"].mean())
        self.mean_query_chars_ = float(np.mean([len(q) for q in queries]))
        quality_config = config.predictors.quality
        residual = quality - prior
        self.difficulty_model_ = self._fit_difficulty(X, residual) if quality_config.shared_difficulty else None
        prior = prior + self.difficulty(X)[:, None]
        if quality_config.ridge is not None:
            self.ridge_ = float(quality_config.ridge)
        else:
            targets = residual
            if self.difficulty_model_ is not None:
                targets = departures(residual)
                if not np.isfinite(targets).any():  # a bandit log, one LLM per query: no departures to see
                    targets = quality - prior
            self.ridge_, scores = gcv_ridge(X, targets, quality_config.ridge_grid)
            logger.info("quality heads: ridge %g chosen by GCV (%s)", self.ridge_,
                        ", ".join(f"{a:g}: {v:.4f}" for a, v in scores.items()))
        self.catalogue_: dict[str, dict[str, Any]] = {}
        self.anchors_: dict[str, dict[str, Any]] = {}  # LLMs added after training: their resemblance anchors
        self.quality_models_: dict[str, QualityPredictor] = {}
        self.cost_models_: dict[str, CostPredictor] = {}
        self.typical_output_tokens_: dict[str, float] = {}
        self.residual_variance_: dict[str, float] = {}
        t = time.perf_counter()
        for j, (llm, rows) in enumerate(log.groupby("llm", sort=True)):
            entry = catalogue.get(llm) or LLMConfig(name=llm, input_usd_per_1k=0.0, output_usd_per_1k=0.0)
            self.catalogue_[llm] = entry.model_dump(mode="json")
            positions = rows["_row"].to_numpy()
            self._fit_llm(llm, X[positions], prior[positions, llms.index(llm)], rows)
        share_posteriors(self.quality_models_.values())
        self.timings_["predictors_s"] = time.perf_counter() - t
        for name, entry in catalogue.items():  # catalogue LLMs without data join with a prior
            if name not in self.catalogue_:
                logger.info("LLM %s has no interactions: added with a prior (add_llm)", name)
                self.add_llm(name, entry.input_usd_per_1k, entry.output_usd_per_1k, latency=entry.latency,
                             enabled=entry.enabled)
        self.trained_at_ = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.n_training_queries_ = len(queries)
        self.timings_["total_s"] = time.perf_counter() - started
        logger.info("router fitted in %.1fs (%s)", self.timings_["total_s"],
                    ", ".join(f"{k}={v:.1f}" for k, v in self.timings_.items()))
        return self

    def _fit_difficulty(self, X: np.ndarray, residual: np.ndarray) -> BayesianLinearRegressor:
        """The shared difficulty head: each training query's mean residual over the LLMs that answered
        it (weighted by how many did), ridge by GCV. The pool's common part of every LLM's residual."""
        quality_config = self._config.predictors.quality
        mean_residual, answered = pool_mean(residual)
        ridge, _ = gcv_ridge(X, mean_residual, quality_config.ridge_grid)
        logger.info("shared difficulty head: ridge %g chosen by GCV", ridge)
        return BayesianLinearRegressor(ridge=ridge, noise_scale=quality_config.noise_scale).fit(
            X, mean_residual, sample_weight=answered)

    def difficulty(self, X: np.ndarray) -> np.ndarray:
        """The shared difficulty part of every LLM's predicted quality for feature rows X (0 when the
        router has no difficulty head: predictors.quality.shared_difficulty false, or an older save)."""
        if self.difficulty_model_ is None:
            return np.zeros(len(X))
        return self.difficulty_model_.predict(np.asarray(X, dtype=np.float64))

    def join_domain_proba(self, base: np.ndarray, domain_proba: np.ndarray) -> np.ndarray:
        """The heads' input: the base features, then the domain memberships scaled by domains.weight.
        (`features` joins the predicted memberships; training joins out-of-fold ones,
        `domain_model_.train_proba_`, as the heads saw them.)"""
        return np.hstack([base, self.domain_weight_ * np.asarray(domain_proba, dtype=np.float64)])

    def domain_proba(self, X: np.ndarray) -> np.ndarray:
        """The domain memberships inside a feature matrix from `features` (its last block)."""
        return np.asarray(X)[:, self.n_base_features_:] / self.domain_weight_

    def fit_encoder(self, queries: Sequence[str], labels: Sequence[str] | None) -> QueryEncoder:
        """The domain-enhanced encoder: fine-tuned on domain triplets when the config says so."""
        config = self._config
        domain_ids = None
        if config.embedding.fine_tune.enabled and labels is not None:
            names = sorted(set(labels) - {""})
            index = {name: i for i, name in enumerate(names)}
            domain_ids = np.array([index.get(label, -1) for label in labels], dtype=int)
        return estimators.query_encoder(config, self.progress).fit(list(queries), domain_ids)

    def fit_domains(self, queries: Sequence[str], sources: Sequence[Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Each training query's domain label ("" for none) and a report of where they came from.

        With task labels in the log (`sources`) and domains.labels auto or source, the labels are
        the tasks and no tagging runs; otherwise the queries are tagged and the tags clustered
        (MixLLM's domains; the report then holds domain names, sizes and example tags)."""
        config = self._config
        queries = list(queries)
        self.timings_ = getattr(self, "timings_", {})
        needs_domains = config.features.use_domains or config.embedding.fine_tune.enabled
        self.clusterer_ = None
        if not needs_domains:
            return np.array([""] * len(queries), dtype=object), {"enabled": False}
        domains_config = config.domains
        if domains_config.labels != "tags" and sources is not None:
            labels, origin = domain_labels(sources, None, "source", domains_config.min_queries)
            if origin == "source":
                names, counts = np.unique(labels[labels != ""], return_counts=True)
                logger.info("domains from the log's task labels: %d (%s)", len(names), ", ".join(names))
                return labels, {
                    "enabled": True, "method": "source", "queries_without_tags": int((labels == "").sum()),
                    "domains": [{"domain": i, "name": str(n), "tags": 0, "examples": []}
                                for i, n in enumerate(names)],
                    "domain_counts": counts.tolist(), "example_tags": [],
                }
        tag_domains, report = self._tag_domains(queries)
        labels, origin = domain_labels(None, tag_domains, "tags", domains_config.min_queries)
        if origin != "tags":
            logger.warning("the tag clusters gave fewer than two domains of %d queries; domains are off",
                           domains_config.min_queries)
        return labels, report

    def _tag_domains(self, queries: list[str]) -> tuple[np.ndarray, dict[str, Any]]:
        """Tag the queries and cluster the tags: each query's dominant tag domain (-1: none), and a report."""
        config = self._config
        t = time.perf_counter()
        base_encoder = estimators.tagging_encoder(config, self.progress).fit(queries)
        base = base_encoder.model_
        tagger = estimators.tagger(config).fit(queries, base)
        query_tags = tagger.transform(queries, base, query_embeddings=self._embed(base_encoder, queries))
        self.clusterer_ = estimators.tag_clusterer(config).fit(query_tags, lambda tags: tagger.tag_vectors(tags, base))
        domains = self.clusterer_.dominant_domains(query_tags)
        self.timings_["tags_s"] = time.perf_counter() - t
        report = {
            "enabled": True,
            "method": config.tags.method,
            "queries_without_tags": int((domains < 0).sum()),
            "domains": self.clusterer_.describe(),
            "domain_counts": np.bincount(domains[domains >= 0], minlength=self.clusterer_.n_domains_).tolist(),
            "example_tags": [{"query": q[:120], "tags": t} for q, t in list(zip(queries, query_tags))[:20]],
        }
        logger.info("tagged %d queries into %d domains: %s", len(queries), self.clusterer_.n_domains_,
                    "; ".join(self.clusterer_.domain_names_))
        return domains, report

    def _fit_llm(self, llm: str, X: np.ndarray, prior: np.ndarray, rows: pd.DataFrame) -> None:
        config = self._config
        quality = rows["quality"].to_numpy(dtype=np.float64)
        self.quality_models_[llm] = estimators.quality_predictor(config, self.ridge_).fit(X, quality, prior=prior)
        # How far answers stray from the head's prediction: the scale of a newcomer's prior (add_llm).
        self.residual_variance_[llm] = float(np.mean((quality - self.quality_models_[llm].predict(X, prior=prior))**2))
        self.cost_models_[llm] = estimators.cost_predictor(
            config, self.catalogue_[llm], self.cost_scale_usd_, prior_cost_usd=float(rows["cost_usd"].mean()),
        ).fit(X, rows["cost_usd"].to_numpy(), rows["query"].str.len().to_numpy(), *token_columns(rows))
        self.typical_output_tokens_[llm] = typical_output_tokens(rows)

    # ------------------------------------------------------------------------------------ predict

    def _check_fitted(self) -> None:
        if not hasattr(self, "quality_models_"):
            raise NotFittedError("MixLLMRouter is not fitted; call fit(log) or MixLLMRouter.load(folder)")

    @property
    def llms_(self) -> list[str]:
        """Every LLM the router has predictors for, enabled or not."""
        self._check_fitted()
        return sorted(self.quality_models_)

    @property
    def enabled_llms_(self) -> list[str]:
        return [llm for llm in self.llms_ if self.catalogue_[llm].get("enabled", True)]

    def embed(self, queries: Sequence[str]) -> np.ndarray:
        """The fitted encoder's vectors for `queries` (through the embedding cache, when there is one):
        what the embedding baselines read, so that they compare on the router's own embeddings."""
        self._check_fitted()
        return self._embed(self.encoder_, check_queries(queries))

    def features(self, queries: Sequence[str], tasks: Sequence[str | None] | None = None) -> np.ndarray:
        """The predictors' input for `queries` (one encoder batch). A query whose task (the
        caller's label, e.g. a benchmark or an application) names a known domain is placed in
        that domain; otherwise its domain is predicted from the text."""
        self._check_fitted()
        queries = check_queries(queries)
        base = self.featurizer_.transform(queries, self._embed(self.encoder_, queries))
        return self.join_domain_proba(base, self.domain_model_.predict_proba(base, check_tasks(tasks, len(queries))))

    def predict_from_features(self, X: np.ndarray, query_chars: np.ndarray, llms: Sequence[str] | None = None) -> Predictions:
        llms = list(llms) if llms is not None else self.llms_
        X = np.asarray(X, dtype=np.float64)
        n = X.shape[0]
        quality = np.zeros((n, len(llms)))
        sigma = np.zeros((n, len(llms)))
        cost = np.zeros((n, len(llms)))
        tokens = np.zeros((n, len(llms)))
        proba = self.domain_proba(X)
        prior = self.domain_model_.prior(proba, llms)
        difficulty = self.difficulty(X)
        memo = VarianceMemo()  # heads that share a posterior read the same X: one uncertainty product
        for j, llm in enumerate(llms):
            head_input = self._head_input(llm, X, proba, prior[:, j])
            quality[:, j], sigma[:, j] = self.quality_models_[llm].predict(
                head_input, prior=prior[:, j] + difficulty, return_std=True, memo=memo)
            cost[:, j] = np.maximum(self.cost_models_[llm].predict(X, query_chars), 0.0)
            predicted_tokens = self.cost_models_[llm].predict_output_tokens(X)
            tokens[:, j] = predicted_tokens if predicted_tokens is not None else self.typical_output_tokens_[llm]
        return Predictions(llms, quality, sigma, cost, tokens)

    def _head_input(self, llm: str, X: np.ndarray, proba: np.ndarray, prior: np.ndarray) -> np.ndarray:
        """What `llm`'s quality head reads: the features, and for an LLM that joined after training
        also its resemblance block: how much each anchor LLM's prediction (frozen at the join)
        exceeds the newcomer's prior, so a few answers tell which LLMs it behaves like."""
        anchor = self.anchors_.get(llm)
        if anchor is None:
            return X
        with_bias = np.hstack([X, np.ones((len(X), 1))])
        anchors = np.clip(proba @ anchor["table"] + with_bias @ anchor["coef"].T, 0.0, 1.0)
        return np.hstack([anchor["weight"] * (anchors - np.asarray(prior).reshape(-1, 1)), X])

    def predict(self, queries: Sequence[str], tasks: Sequence[str | None] | None = None) -> Predictions:
        queries = check_queries(queries)
        return self.predict_from_features(self.features(queries, tasks), np.array([len(q) for q in queries]))

    @property
    def tasks_(self) -> list[str]:
        """The task labels this router knows as domains (empty when its domains are tag clusters)."""
        self._check_fitted()
        classes = self.domain_model_.classes_
        return [] if classes == ["all"] or all(c.startswith("tags:") for c in classes) else list(classes)

    # ---------------------------------------------------------------------------- persistence

    @staticmethod
    def copy_with_calibrated_lambda(folder: Path | str, lambda_: float, target: Path | str) -> Path:
        """A copy of a saved router carrying the lambda calibrated for the budget (router_format)."""
        from mixllm.core.router_format import copy_with_calibrated_lambda

        return copy_with_calibrated_lambda(folder, lambda_, target)

    def save(self, folder: Path | str) -> Path:
        """A self-describing folder in plain formats (no pickle): see mixllm.core.router_format."""
        from mixllm.core.router_format import save_router

        self._check_fitted()
        return save_router(self, folder)

    @classmethod
    def load(cls, folder: Path | str, *, progress: bool | None = None) -> MixLLMRouter:
        from mixllm.core.router_format import load_router

        return load_router(folder, progress=progress)

    def check_encoder(self) -> dict[str, Any] | None:
        """Embed the probe sentences and compare with the vectors saved with this router where it was
        saved (mixllm.core.encoder_check); kept as encoder_check_ for describe(). None for a router
        that was not loaded from a folder with them (fitted here, or saved before the check)."""
        from mixllm.core.encoder_check import agreement

        reference = getattr(self, "encoder_probes_", None)
        self.encoder_check_ = None if reference is None else agreement(reference, self.encoder_)
        return self.encoder_check_

    def describe(self) -> dict[str, Any]:
        """What a person (or /model) needs to know about this router; no secrets."""
        self._check_fitted()
        return {
            "mixllm_version": __version__,
            "trained_at": self.trained_at_,
            "llms": [
                {"name": llm, "enabled": self.catalogue_[llm].get("enabled", True),
                 "input_usd_per_1k": self.catalogue_[llm]["input_usd_per_1k"],
                 "output_usd_per_1k": self.catalogue_[llm]["output_usd_per_1k"],
                 "latency": self.catalogue_[llm].get("latency"),
                 "interactions_seen": self.quality_models_[llm].n_samples_seen_}
                for llm in self.llms_
            ],
            "decision": {**self._config.decision.model_dump(by_alias=True), "default_lambda": self.default_lambda},
            "cost_scale_usd": self.cost_scale_usd_,
            "encoder": {"backend": self.encoder_.backend, "fine_tuned": self.encoder_.fine_tuned_,
                        "max_seq_length": self.encoder_.max_seq_length, "quantize": self.encoder_.quantize,
                        "backend_choice": getattr(self, "backend_choice_", None),
                        "check": getattr(self, "encoder_check_", None)},
            "features": {**self.featurizer_.block_sizes_, "domains": len(self.domain_model_.classes_)},
            "quality_ridge": self.ridge_,
            "difficulty_ridge": None if self.difficulty_model_ is None else self.difficulty_model_.ridge,
            "domains": self.domain_model_.describe(),
            "tasks": self.tasks_,
            "n_training_queries": self.n_training_queries_,
            "n_feedback": getattr(self, "n_feedback_", 0),
        }

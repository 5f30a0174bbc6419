"""MixLLMRouter: domains (task labels or tag clusters) -> domain-enhanced encoder -> per-LLM
predictors (domain prior + Bayesian residual head, cost) -> meta decision (decision.py).

q_m is LLM m's mean quality in the query's domain (domains.py) plus what its head predicts on top
(predictors.py); the head's ridge is chosen by generalised cross-validation on the training data.
The decision rule, score_m = q_m - lambda * c_m / cost_scale + alpha * sigma_m - P_m, and the
latency penalty P_m are in decision.py. Per-request constraints (candidate subset, maximum
predicted cost, minimum predicted quality) filter the candidates first; when none is left, the
constraint is relaxed and the decision says so.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator

from mixllm import __version__, estimators
from mixllm.config import LatencyProfile, LLMConfig, MixLLMConfig, config_from_dict
from mixllm.decision import (
    CandidateScore,
    Decision,
    LoadSnapshot,
    Predictions,
    action_probabilities,
    decide,
    expected_latency_s,
    latency_penalty,
)
from mixllm.embeddings import EmbeddingCache, QueryEncoder
from mixllm.errors import NotFittedError, RoutingError
from mixllm.domains import domain_labels
from mixllm.predictors import CostPredictor, QualityPredictor, gcv_ridge
from mixllm.units import call_cost_usd, tokens_from_chars, typical_output_tokens

logger = logging.getLogger(__name__)
_DRAW_LOCK = threading.Lock()

DRIFT_REFERENCE_ROWS = 500  # training queries kept (their features) for the drift monitor: drift.npz


class MixLLMRouter(BaseEstimator):
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
            encoder: QueryEncoder | None = None) -> MixLLMRouter:
        """Train on a long interaction log (full-information or bandit) of the training queries.

        `domains` (query_id -> domain label, from `fit_domains`) and `encoder` (from `fit_encoder`)
        let a pipeline run those stages separately and cache them; when absent they are computed here.
        """
        config = self._config
        started = time.perf_counter()
        log = _check_log(log)
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
            self.tag_report_ = getattr(self, "tag_report_", {"enabled": True, "precomputed": True})
        t = time.perf_counter()
        self.encoder_ = encoder if encoder is not None else self.fit_encoder(queries, labels)
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
        row_of = pd.Series(np.arange(len(queries)), index=queries_frame["query_id"].to_numpy())
        log = log.assign(_row=log["query_id"].map(row_of).to_numpy())
        llms = sorted(log["llm"].unique())
        quality = log.pivot_table(index="_row", columns="llm", values="quality", aggfunc="mean")
        quality = quality.reindex(index=range(len(queries)), columns=llms).to_numpy(dtype=np.float64)

        t = time.perf_counter()
        domains_config = config.domains
        if not features_config.use_domains:
            labels = np.array([""] * len(queries), dtype=object)
        self.domain_model_ = estimators.domain_model(config).fit(base, labels, quality, llms)
        self.domain_weight_ = float(domains_config.weight)
        self.n_base_features_ = base.shape[1]
        X = self._join(base, self.domain_model_.train_proba_)
        self.n_features_in_ = X.shape[1]
        prior = self.domain_model_.prior(self.domain_model_.train_proba_, llms)
        self.timings_["domains_s"] = time.perf_counter() - t

        per_llm_cost = log.groupby("llm")["cost_usd"].mean()
        self.cost_scale_usd_ = float(config.decision.cost_scale_usd or max(per_llm_cost.max(), 1e-12))
        self.mean_quality_ = float(log["quality"].mean())
        self.mean_query_chars_ = float(np.mean([len(q) for q in queries]))
        quality_config = config.predictors.quality
        if quality_config.ridge is not None:
            self.ridge_ = float(quality_config.ridge)
        else:
            self.ridge_, scores = gcv_ridge(X, quality - prior, quality_config.ridge_grid)
            logger.info("quality heads: ridge %g chosen by GCV (%s)", self.ridge_,
                        ", ".join(f"{a:g}: {v:.4f}" for a, v in scores.items()))
        self.catalogue_: dict[str, dict[str, Any]] = {}
        self.anchors_: dict[str, dict[str, Any]] = {}  # LLMs added after training: their resemblance anchors
        self.quality_models_: dict[str, QualityPredictor] = {}
        self.cost_models_: dict[str, CostPredictor] = {}
        self.typical_output_tokens_: dict[str, float] = {}
        t = time.perf_counter()
        for j, (llm, rows) in enumerate(log.groupby("llm", sort=True)):
            entry = catalogue.get(llm) or LLMConfig(name=llm, input_usd_per_1k=0.0, output_usd_per_1k=0.0)
            self.catalogue_[llm] = entry.model_dump(mode="json")
            positions = rows["_row"].to_numpy()
            self._fit_llm(llm, X[positions], prior[positions, llms.index(llm)], rows)
        self.timings_["predictors_s"] = time.perf_counter() - t
        for name, entry in catalogue.items():  # catalogue LLMs without data join with a prior
            if name not in self.catalogue_:
                logger.info("LLM %s has no interactions: added with a prior (high uncertainty)", name)
                self.add_llm(name, entry.input_usd_per_1k, entry.output_usd_per_1k, latency=entry.latency,
                             enabled=entry.enabled)
        self.trained_at_ = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.n_training_queries_ = len(queries)
        self.timings_["total_s"] = time.perf_counter() - started
        logger.info("router fitted in %.1fs (%s)", self.timings_["total_s"],
                    ", ".join(f"{k}={v:.1f}" for k, v in self.timings_.items()))
        return self

    def _join(self, base: np.ndarray, domain_proba: np.ndarray) -> np.ndarray:
        """The heads' input: the base features, then the domain memberships scaled by domains.weight."""
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
        self.quality_models_[llm] = estimators.quality_predictor(config, self.ridge_).fit(
            X, rows["quality"].to_numpy(), prior=prior)
        self.cost_models_[llm] = estimators.cost_predictor(
            config, self.catalogue_[llm], self.cost_scale_usd_, prior_cost_usd=float(rows["cost_usd"].mean()),
        ).fit(X, rows["cost_usd"].to_numpy(), rows["query"].str.len().to_numpy(), *_tokens(rows))
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

    def features(self, queries: Sequence[str], tasks: Sequence[str | None] | None = None) -> np.ndarray:
        """The predictors' input for `queries` (one encoder batch). A query whose task (the
        caller's label, e.g. a benchmark or an application) names a known domain is placed in
        that domain; otherwise its domain is predicted from the text."""
        self._check_fitted()
        queries = _check_queries(queries)
        base = self.featurizer_.transform(queries, self._embed(self.encoder_, queries))
        return self._join(base, self.domain_model_.predict_proba(base, _check_tasks(tasks, len(queries))))

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
        for j, llm in enumerate(llms):
            head_input = self._head_input(llm, X, proba, prior[:, j])
            quality[:, j], sigma[:, j] = self.quality_models_[llm].predict(head_input, prior=prior[:, j],
                                                                           return_std=True)
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
        queries = _check_queries(queries)
        return self.predict_from_features(self.features(queries, tasks), np.array([len(q) for q in queries]))

    @property
    def tasks_(self) -> list[str]:
        """The task labels this router knows as domains (empty when its domains are tag clusters)."""
        self._check_fitted()
        classes = self.domain_model_.classes_
        return [] if classes == ["all"] or all(c.startswith("tags:") for c in classes) else list(classes)

    # ------------------------------------------------------------------------------------- route

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
        lambda_ = _check_number("lambda", self.default_lambda if lambda_ is None else lambda_)
        exploration = _check_number("exploration", decision_config.exploration if exploration is None else exploration)
        tolerance = _check_number(
            "latency_tolerance_s", decision_config.latency_tolerance_s if latency_tolerance_s is None else latency_tolerance_s
        )
        if max_cost_usd is not None:
            max_cost_usd = _check_number("max_cost", max_cost_usd)
        if min_quality is not None:
            min_quality = _check_number("min_quality", min_quality)
        llms = self._candidates(candidates)
        tasks = _check_tasks(tasks, len(queries) if predictions is None else len(predictions.quality))
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
    def default_lambda(self) -> float:
        """lambda when a request gives none: decision.lambda if set, else the one calibrated to the
        cost budget when the model was registered, else 1."""
        configured = self._config.decision.lambda_
        if configured is not None:
            return float(configured)
        calibrated = getattr(self, "calibrated_lambda_", None)
        return 1.0 if calibrated is None else float(calibrated)  # a calibrated 0 is a real answer

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

    # ------------------------------------------------------------------------------- continual

    def partial_fit(self, interactions: pd.DataFrame, features: np.ndarray | None = None) -> MixLLMRouter:
        """Learn from bandit feedback: each row updates only its own LLM's predictors.

        `interactions` needs query, llm, quality, cost_usd (NaN when unknown: then only quality
        learns; tokens optional); `features` may hold
        their representation already (one row per interaction) to skip the encoder.
        """
        self._check_fitted()
        # Feedback may come without a cost (a thumbs-up on a /route decision): it teaches quality only.
        frame = _check_log(interactions, need_query_id=False, allow_missing_cost=True)
        unknown = sorted(set(frame["llm"]) - set(self.quality_models_))
        if unknown:
            raise RoutingError(f"feedback for unknown LLM(s) {', '.join(unknown)}; add them with add_llm first")
        if features is None:
            tasks = frame["task"].where(frame["task"].notna(), None).tolist() if "task" in frame else None
            X = self.features(frame["query"].tolist(), tasks)
        else:
            X = np.asarray(features, dtype=np.float64)
        if X.shape[0] != len(frame):
            raise RoutingError(f"features has {X.shape[0]} rows for {len(frame)} interactions")
        proba = self.domain_proba(X)
        for llm, rows in frame.groupby("llm", sort=False):
            positions = frame.index.get_indexer(rows.index)
            prior = self.domain_model_.prior(proba[positions], [llm])[:, 0]
            head_input = self._head_input(llm, X[positions], proba[positions], prior)
            self.quality_models_[llm].partial_fit(head_input, rows["quality"].to_numpy(), prior=prior)
            self.cost_models_[llm].partial_fit(X[positions], rows["cost_usd"].to_numpy(),
                                               rows["query"].str.len().to_numpy(), *_tokens(rows))
        self.n_feedback_ = getattr(self, "n_feedback_", 0) + len(frame)
        return self

    def add_llm(self, name: str, input_usd_per_1k: float, output_usd_per_1k: float, *,
                latency: LatencyProfile | Mapping[str, Any] | None = None, prior_quality: float | None = None,
                enabled: bool = True) -> MixLLMRouter:
        """A new candidate with a prior and a high uncertainty, so exploration tries it. No retrain."""
        self._check_fitted()
        if not name or not isinstance(name, str):
            raise RoutingError("add_llm needs a non-empty LLM name")
        if name in self.quality_models_:
            raise RoutingError(f"LLM '{name}' is already in the pool; remove_llm it first to reset it")
        if input_usd_per_1k < 0 or output_usd_per_1k < 0:
            raise RoutingError("prices must be >= 0 USD per 1k tokens")
        profile = latency if isinstance(latency, LatencyProfile) else LatencyProfile(**(latency or {}))
        entry = LLMConfig(name=name, input_usd_per_1k=input_usd_per_1k, output_usd_per_1k=output_usd_per_1k,
                          latency=profile, enabled=enabled)
        if prior_quality is not None and not (isinstance(prior_quality, (int, float)) and 0 <= prior_quality <= 1):
            raise RoutingError(f"prior_quality must be a number in 0..1, got {prior_quality!r}")
        per_domain = (np.full(len(self.domain_model_.classes_), float(prior_quality)) if prior_quality is not None
                      else self._newcomer_prior(input_usd_per_1k + output_usd_per_1k))
        quality_config = self._config.predictors.quality
        established = [llm for llm in self.llms_ if llm not in self.anchors_
                       and self.quality_models_[llm].kind == "bayesian_linear"]
        if established and quality_config.resemblance_weight > 0:
            columns = [self.domain_model_.llms_.index(llm) for llm in established]
            self.anchors_[name] = {
                "llms": established, "weight": float(quality_config.resemblance_weight),
                "table": self.domain_model_.table_[:, columns].copy(),
                "coef": np.vstack([self.quality_models_[llm].model_.coef_ for llm in established]),
            }
        self.catalogue_[name] = entry.model_dump(mode="json")
        self.domain_model_.add_llm(name, per_domain)
        n_anchors = len(self.anchors_.get(name, {}).get("llms", []))
        self.quality_models_[name] = estimators.newcomer_quality_predictor(self._config).start_empty(
            self.n_features_in_ + n_anchors)
        typical_output = float(np.mean(list(self.typical_output_tokens_.values()))) if self.typical_output_tokens_ else 100.0
        prior_cost = self._newcomer_cost(input_usd_per_1k, output_usd_per_1k, typical_output)
        self.cost_models_[name] = estimators.cost_predictor(
            self._config, entry, self.cost_scale_usd_, prior_cost_usd=prior_cost).start_empty(self.n_features_in_)
        self.typical_output_tokens_[name] = typical_output
        logger.info("added LLM %s (prior quality %.3f on average over domains, prior cost $%.6f)", name,
                    float(np.mean(per_domain)), prior_cost)
        return self

    def _newcomer_cost(self, input_usd_per_1k: float, output_usd_per_1k: float, typical_output_tokens: float) -> float:
        """A newcomer's prior dollars per query: its list price times what the pool pays per unit of
        list price (the median over priced LLMs that have logged costs), so it is priced the way
        the log's costs were made (e.g. prompt tokens only); else tokens x prices."""
        ratios = []
        for llm, model in self.cost_models_.items():
            price = self.catalogue_[llm]["input_usd_per_1k"] + self.catalogue_[llm]["output_usd_per_1k"]
            if price > 0 and model.prior_cost_usd > 0 and llm not in self.anchors_:
                ratios.append(model.prior_cost_usd / price)
        if ratios:
            return float(np.median(ratios)) * (input_usd_per_1k + output_usd_per_1k)
        return float(call_cost_usd(tokens_from_chars(self.mean_query_chars_), typical_output_tokens,
                                   input_usd_per_1k, output_usd_per_1k))

    def _newcomer_prior(self, price_per_1k: float) -> np.ndarray:
        """A newcomer's per-domain prior quality (predictors.quality.newcomer_prior).

        optimistic (default): in each domain, as good as the best pool LLM that costs no more
        (price = input + output per 1k tokens; the cheapest LLMs when none is cheaper). An LLM is
        added because it is expected to compete at its price; the optimism gets it tried, its
        feedback corrects it domain by domain, and the uncertainty bonus shrinks as it does.
        price_tier: the pool's per-domain means weighted by closeness in log price.
        mean: the pool's per-domain mean."""
        rule = self._config.predictors.quality.newcomer_prior
        table = self.domain_model_.table_
        existing = [llm for llm in self.domain_model_.llms_ if llm in self.catalogue_]
        if not existing:
            return np.full(table.shape[0], self.mean_quality_)
        columns = [self.domain_model_.llms_.index(llm) for llm in existing]
        pool = table[:, columns]
        prices = np.array([self.catalogue_[llm]["input_usd_per_1k"] + self.catalogue_[llm]["output_usd_per_1k"]
                           for llm in existing])
        if rule == "mean":
            return pool.mean(axis=1)
        if rule == "optimistic":
            affordable = prices <= price_per_1k * (1 + 1e-9)
            if not affordable.any():
                affordable = prices <= prices.min() * (1 + 1e-9)
            return pool[:, affordable].max(axis=1)
        if price_per_1k <= 0 or (prices <= 0).all():
            return pool.mean(axis=1)
        distance = np.log(np.maximum(prices, 1e-12)) - np.log(price_per_1k)
        weights = np.exp(-0.5 * distance**2) * (prices > 0)
        weights = weights / weights.sum() if weights.sum() > 0 else np.full(len(existing), 1 / len(existing))
        return pool @ weights

    def remove_llm(self, name: str) -> MixLLMRouter:
        """Take an LLM out of the pool; the others are untouched."""
        self._check_fitted()
        if name not in self.quality_models_:
            raise RoutingError(f"LLM '{name}' is not in the pool ({', '.join(self.llms_)})")
        for table in (self.quality_models_, self.cost_models_, self.catalogue_, self.typical_output_tokens_):
            table.pop(name, None)
        self.domain_model_.remove_llm(name)
        self.anchors_.pop(name, None)
        logger.info("removed LLM %s", name)
        return self

    def set_enabled(self, name: str, enabled: bool) -> MixLLMRouter:
        """Keep an LLM's predictors but take it out of (or put it back into) the candidates."""
        self._check_fitted()
        if name not in self.catalogue_:
            raise RoutingError(f"LLM '{name}' is not in the pool ({', '.join(self.llms_)})")
        self.catalogue_[name] = {**self.catalogue_[name], "enabled": bool(enabled)}
        return self

    def apply_enabled_flags(self, llms: Sequence[LLMConfig]) -> list[str]:
        """Only the catalogue's enabled flags, for LLMs already in the pool (what a served model
        takes from params.yaml at once; adding and removing LLMs is apply_catalogue's). Returns
        what changed, one line each."""
        self._check_fitted()
        changes = []
        enabled_now = set(self.enabled_llms_)
        for llm in llms:
            if llm.name in self.catalogue_ and (llm.name in enabled_now) != llm.enabled:
                self.set_enabled(llm.name, llm.enabled)
                changes.append(f"{'enabled' if llm.enabled else 'disabled'} {llm.name}")
        return changes

    def apply_catalogue(self, llms: Sequence[LLMConfig]) -> list[str]:
        """Make the pool match a catalogue: add new LLMs, drop absent ones, update prices, latency and
        enabled flags. Returns what changed, one line each."""
        self._check_fitted()
        changes = []
        wanted = {llm.name: llm for llm in llms}
        for name in list(self.quality_models_):
            if name not in wanted:
                self.remove_llm(name)
                changes.append(f"removed {name}")
        for name, entry in wanted.items():
            if name not in self.quality_models_:
                self.add_llm(name, entry.input_usd_per_1k, entry.output_usd_per_1k, latency=entry.latency,
                             enabled=entry.enabled)
                changes.append(f"added {name}")
                continue
            current = self.catalogue_[name]
            updated = entry.model_dump(mode="json")
            if current != updated:
                if current.get("enabled", True) != entry.enabled:
                    changes.append(f"{'enabled' if entry.enabled else 'disabled'} {name}")
                else:
                    changes.append(f"updated {name}")
                self.catalogue_[name] = updated
                cost_model = self.cost_models_[name]
                cost_model.input_usd_per_1k = entry.input_usd_per_1k
                cost_model.output_usd_per_1k = entry.output_usd_per_1k
        return changes

    # ---------------------------------------------------------------------------- persistence

    @staticmethod
    def copy_with_calibrated_lambda(folder: Path | str, lambda_: float, target: Path | str) -> Path:
        """A copy of a saved router carrying the lambda calibrated for the budget (router_format)."""
        from mixllm.router_format import copy_with_calibrated_lambda

        return copy_with_calibrated_lambda(folder, lambda_, target)

    def save(self, folder: Path | str) -> Path:
        """A self-describing folder in plain formats (no pickle): see mixllm.router_format."""
        from mixllm.router_format import save_router

        self._check_fitted()
        return save_router(self, folder)

    @classmethod
    def load(cls, folder: Path | str, *, progress: bool | None = None) -> MixLLMRouter:
        from mixllm.router_format import load_router

        return load_router(folder, progress=progress)

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
                        "backend_choice": getattr(self, "backend_choice_", None)},
            "features": {**self.featurizer_.block_sizes_, "domains": len(self.domain_model_.classes_)},
            "quality_ridge": self.ridge_,
            "domains": self.domain_model_.describe(),
            "tasks": self.tasks_,
            "n_training_queries": self.n_training_queries_,
            "n_feedback": getattr(self, "n_feedback_", 0),
        }


# ------------------------------------------------------------------------------------ helpers


def _select(predictions: Predictions, llms: list[str]) -> Predictions:
    if predictions.llms == llms:
        return predictions
    index = [predictions.llms.index(llm) for llm in llms]
    return Predictions(llms, predictions.quality[:, index], predictions.uncertainty[:, index],
                       predictions.cost_usd[:, index], predictions.output_tokens[:, index])


def _check_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise RoutingError(f"{name} must be a number >= 0, got {value!r}", field=name)
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise RoutingError(f"{name} must be a finite number >= 0, got {value}", field=name)
    return value


def _check_queries(queries: Sequence[str]) -> list[str]:
    if isinstance(queries, str):
        raise RoutingError("queries must be a list of strings; wrap a single query in a list")
    queries = list(queries)
    if not queries:
        raise RoutingError("no queries given")
    for i, query in enumerate(queries):
        if not isinstance(query, str):
            raise RoutingError(f"query {i} must be text, got {type(query).__name__}")
        if not query.strip():
            raise RoutingError(f"query {i} is empty; send the text to route")
    return queries


def _check_tasks(tasks: Sequence[str | None] | None, n: int) -> list[str | None] | None:
    if tasks is None:
        return None
    if isinstance(tasks, str):
        raise RoutingError("tasks must be a list (one label or None per query); wrap a single task in a list")
    tasks = list(tasks)
    if len(tasks) != n:
        raise RoutingError(f"got {len(tasks)} tasks for {n} queries; give one (or None) per query")
    for i, task in enumerate(tasks):
        if task is not None and not isinstance(task, str):
            raise RoutingError(f"task {i} must be text or None, got {type(task).__name__}")
    return [task if task else None for task in tasks]


def _check_log(log: pd.DataFrame, need_query_id: bool = True, allow_missing_cost: bool = False) -> pd.DataFrame:
    needed = ["query", "llm", "quality", "cost_usd"] + (["query_id"] if need_query_id else [])
    missing = [c for c in needed if c not in log.columns]
    if missing:
        raise RoutingError(f"interactions need column(s) {', '.join(missing)}")
    if log.empty:
        raise RoutingError("no interactions given")
    quality = pd.to_numeric(log["quality"], errors="coerce")
    cost = pd.to_numeric(log["cost_usd"], errors="coerce")
    missing_cost = log["cost_usd"].isna()  # unknown; anything else must be a finite number
    bad_cost = (~np.isfinite(cost) & ~missing_cost) | (missing_cost & (not allow_missing_cost))
    if not np.isfinite(quality).all() or bad_cost.any():
        raise RoutingError("interactions have a missing or non-finite quality or cost; validate them with mixllm.data first")
    _check_queries(log["query"].tolist())
    return log.reset_index(drop=True)


def _tokens(rows: pd.DataFrame) -> tuple[np.ndarray | None, np.ndarray | None]:
    if "input_tokens" in rows and "output_tokens" in rows and rows["output_tokens"].notna().any():
        return rows["input_tokens"].to_numpy(dtype=float), rows["output_tokens"].to_numpy(dtype=float)
    return None, None

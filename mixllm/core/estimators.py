"""From settings to estimators: the one place that turns the typed config into constructor arguments.

Every estimator of the router is built here, so a setting reaches its estimator by one path and the
defaults live in the `config` package alone. The estimators' own constructor defaults equal the config's
(tests/test_config.py checks it), so an estimator built by hand behaves like the configured one.
Arguments that come from the data (a chosen ridge, an LLM's logged mean cost) are passed in.
"""

from __future__ import annotations

from typing import Any

from mixllm.config import LLMConfig, MixLLMConfig
from mixllm.core.domains import DomainModel
from mixllm.core.embeddings import QueryEncoder
from mixllm.core.features import QueryFeaturizer
from mixllm.core.predictors import CostPredictor, QualityPredictor
from mixllm.core.tags import TagClusterer, make_tagger

# Tags only shape the domains, so the encoder that tags reads shorter inputs (cheaper).
TAGGING_MAX_SEQ_LENGTH = 128


def query_encoder(config: MixLLMConfig, progress: bool | None = None) -> QueryEncoder:
    """The router's encoder (fine-tuned on domain triplets when embedding.fine_tune.enabled)."""
    embedding, ft = config.embedding, config.embedding.fine_tune
    return QueryEncoder(
        model_path=embedding.model_path, max_seq_length=embedding.max_seq_length,
        truncation_side=embedding.truncation_side, batch_size=embedding.batch_size, quantize=embedding.quantize,
        fine_tune=ft.enabled, epochs=ft.epochs, max_triplets=ft.max_triplets, train_batch_size=ft.batch_size,
        learning_rate=ft.learning_rate, warmup_ratio=ft.warmup_ratio, train_max_seq_length=ft.max_seq_length,
        random_state=ft.seed, progress=progress,
        # auto: the encoder stage keeps the transformer; the predictors stage derives and compares
        backend="torch" if embedding.backend == "auto" else embedding.backend, static_dims=embedding.static_dims,
    )


def tagging_encoder(config: MixLLMConfig, progress: bool | None = None) -> QueryEncoder:
    """The base encoder (never fine-tuned) that tags read, on inputs of at most 128 tokens."""
    embedding = config.embedding
    return QueryEncoder(model_path=embedding.model_path,
                        max_seq_length=min(embedding.max_seq_length, TAGGING_MAX_SEQ_LENGTH),
                        truncation_side=embedding.truncation_side, batch_size=embedding.batch_size,
                        fine_tune=False, progress=progress)


def tagger(config: MixLLMConfig) -> Any:
    """KeyBERT n-gram tags, or InsTag-style tags from an LLM (tags.method)."""
    tags = config.tags
    if tags.method == "keybert":
        return make_tagger("keybert", top_k=tags.top_k, ngram_max=tags.ngram_max, min_df=tags.min_df,
                           max_df=tags.max_df)
    llm = tags.llm
    return make_tagger("llm", top_k=tags.top_k, base_url=llm.base_url, model=llm.model,
                       api_key_env=llm.api_key_env, cache_dir=str(config.path(llm.cache_dir)), timeout_s=llm.timeout_s)


def tag_clusterer(config: MixLLMConfig) -> TagClusterer:
    tags = config.tags
    return TagClusterer(n_clusters=tags.n_clusters, method=tags.clustering, names_per_cluster=tags.names_per_cluster,
                        random_state=tags.seed)


def query_featurizer(config: MixLLMConfig) -> QueryFeaturizer:
    features, tfidf = config.features, config.features.tfidf
    return QueryFeaturizer(
        use_length=features.use_length, use_tfidf=tfidf.enabled, tfidf_max_features=tfidf.max_features,
        tfidf_ngram_max=tfidf.ngram_max, tfidf_min_df=tfidf.min_df, svd_components=tfidf.svd_components,
        tfidf_weight=tfidf.weight,
    )


def domain_model(config: MixLLMConfig) -> DomainModel:
    domains = config.domains
    return DomainModel(classifier_c=domains.classifier_c, prior_strength=domains.prior_strength,
                       cross_fit_folds=domains.cross_fit_folds, random_state=domains.seed)


def quality_predictor(config: MixLLMConfig, ridge: float) -> QualityPredictor:
    """A trained LLM's quality head; `ridge` is predictors.quality.ridge or the one GCV chose."""
    quality = config.predictors.quality
    return QualityPredictor(kind=quality.kind, ridge=ridge, noise_scale=quality.noise_scale, prior_mean=0.0,
                            random_state=quality.seed)


def newcomer_quality_predictor(config: MixLLMConfig, empirical_ridge: float) -> QualityPredictor:
    """The head of an LLM added without data: Bayesian linear (it learns online), its prior precision
    predictors.quality.new_llm_prior_ridge, or `empirical_ridge` (from the pool) when that is null."""
    quality = config.predictors.quality
    ridge = quality.new_llm_prior_ridge if quality.new_llm_prior_ridge is not None else empirical_ridge
    return QualityPredictor(kind="bayesian_linear", ridge=ridge,
                            noise_scale=quality.noise_scale, prior_mean=0.0, random_state=quality.seed)


def cost_predictor(config: MixLLMConfig, llm: LLMConfig | dict[str, Any], cost_scale_usd: float,
                   prior_cost_usd: float) -> CostPredictor:
    """An LLM's cost head: its catalogue prices, the router's cost scale and its prior dollars per query."""
    entry = llm if isinstance(llm, dict) else llm.model_dump(mode="json")
    return CostPredictor(ridge=config.predictors.cost.ridge, input_usd_per_1k=entry["input_usd_per_1k"],
                         output_usd_per_1k=entry["output_usd_per_1k"], cost_scale_usd=cost_scale_usd,
                         prior_cost_usd=prior_cost_usd)

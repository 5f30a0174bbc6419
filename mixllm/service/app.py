"""The BentoML route service: a thin HTTP shell over MixLLMRouter, the registry and the store.

    bentoml serve mixllm.service.app:MixLLMService --host 127.0.0.1 --port 3000

Serves the registry's champion (service.model_alias), polls the alias and swaps models atomically
(requests in flight finish on the model they started with), logs every decision and feedback row
to the decision log, and proxies OpenAI-compatible chat completions to the chosen LLM.
Configuration: params.yaml from the working folder, or MIXLLM_PARAMS. The endpoints are here; their
work is in mixins of one role each: model_lifecycle.py, decisions.py, proxy.py, spending.py,
watchers.py.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Annotated, Any

import bentoml
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException

from mixllm.core.errors import StoreBusyError
from mixllm.io.scratch_folders import remove_own_downloads
from mixllm.service import header_deadline
from mixllm.service.access import BearerAuth, ClientRateLimit, TenantKeys, reporting_client
from mixllm.service.api_models import (
    PROXY_SPENDS_KEYS,
    ROUTABLE,
    SETTINGS,
    BatchOfRequests,
    ChatRequest,
    CloseCircuitsRequest,
    FeedbackRequest,
    FeedbackResponse,
    RouteRequest,
    RouteResponse,
    error,
)
from mixllm.service.circuit import CircuitBreakers
from mixllm.service.decisions import RouteDecisions
from mixllm.service.middleware import (
    AnswerNotReady,
    BodyLimit,
    OpenAIErrors,
    OpenAPIContract,
    RetryAfterOnUnavailable,
    UnavailableReason,
    quiet_refusals,
)
from mixllm.service.model_lifecycle import LoadedModel, ModelLifecycle
from mixllm.service.openapi_contract import openapi_contract
from mixllm.service.proxy import ChatProxy
from mixllm.service.request_batching import RequestCoalescer
from mixllm.service.spending import TenantBudgets
from mixllm.service.watchers import ServiceMetrics, ServiceWatchers

# A worker that cannot start (no champion in the registry) must stop `bentoml serve` with its
# message instead of being respawned every few seconds; this only turns off respawning.
os.environ.setdefault("BENTOML_CONTAINERIZED", "true")

logger = logging.getLogger("bentoml.mixllm")  # bentoml serve shows "bentoml.*" loggers
TENANT_KEYS = TenantKeys()  # filled in when the service starts; read by BearerAuth and ClientRateLimit
UNAVAILABLE = UnavailableReason()  # set when the service starts; read by RetryAfterOnUnavailable and AnswerNotReady


# ------------------------------------------------------------------------------------- service

openai_app = FastAPI(title="mixllm OpenAI-compatible proxy")
admin_app = FastAPI(title="mixllm admin")
root_app = FastAPI(title="mixllm model info")  # mounted last at "/": only its own routes match


@openai_app.exception_handler(RequestValidationError)
async def _chat_request_invalid(request: Any, exc: RequestValidationError) -> JSONResponse:
    """A 400 naming the field, like every other endpoint. FastAPI's own 422 echoes the input, and
    an input holding a lone surrogate cannot be encoded: that was a 500."""
    problems = exc.errors()
    problem = problems[0] if problems else {}
    loc = [str(part) for part in problem.get("loc", ())]
    loc = loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc  # where, not what
    return error(400, loc[0] if loc else None, f"{'.'.join(loc) or 'body'}: {problem.get('msg', 'invalid request')}")


async def _http_error(request: Any, exc: HTTPException) -> JSONResponse:
    """FastAPI's own errors (a body that is not JSON, the 503 while loading) in the service's error
    format, {"error": ..., "field": ...}, as the OpenAPI contract documents them."""
    field = "body" if exc.status_code == 400 else None
    return error(exc.status_code, field, str(exc.detail), dict(exc.headers or {}))


async def _store_unavailable(request: Any, exc: Exception) -> JSONResponse:
    """The decision log is down, or another writer holds its lock, wherever a page or the proxy
    reads or writes it: a 503 that says to retry, never a 500."""
    logger.warning("%s answered 503: %s", request.url.path, exc)
    return error(503, None, str(exc), {"Retry-After": "1"})


for _app in (openai_app, admin_app, root_app):
    _app.add_exception_handler(HTTPException, _http_error)
    _app.add_exception_handler(StoreBusyError, _store_unavailable)
for _app in (root_app, admin_app):  # /stats?days=abc, /admin/circuits/close {"llms": 1}: a 400
    _app.add_exception_handler(RequestValidationError, _chat_request_invalid)


@bentoml.service(workers=1, threads=SETTINGS.threads, traffic={"timeout": SETTINGS.request_timeout_s})
@bentoml.asgi_app(openai_app, path="/v1")
@bentoml.asgi_app(admin_app, path="/admin")
@bentoml.asgi_app(root_app, path="/")
class MixLLMService(ModelLifecycle, RouteDecisions, ChatProxy, TenantBudgets, ServiceWatchers):
    """Routes queries with the MLflow champion and closes the continual-learning loop."""

    def __init__(self) -> None:
        from mixllm.config import load_config
        from mixllm.io.registry import Registry
        from mixllm.io.store import InteractionLog
        from mixllm.service.live_traffic import LiveTraffic

        quiet_refusals()  # here, not at import: BentoML configures its logging when the worker starts
        self.config = load_config()
        self.registry = Registry(self.config)
        alias = self.config.service.model_alias
        self.served_copy = None
        if self.config.service.warm_start:
            from mixllm.service.served_copy import ServedCopy

            self.served_copy = ServedCopy(self.config.path(self.config.service.served_copy_dir),
                                          self.config.mlflow_tracking_uri, self.config.mlflow.registered_model_name, alias)
        # With a copy of the version served last, the registry is asked in the background (MLflow
        # takes ~2 s to import and open); without one, a start with no champion is refused here.
        copied = self.served_copy.version() if self.served_copy is not None else None
        version = None if copied is not None else self.registry.alias_version(alias)
        if copied is None and version is None:
            message = (f"refusing to start: the MLflow registry ({self.config.mlflow_tracking_uri}) has no "
                       f"'{alias}' version of {self.config.mlflow.registered_model_name}. Train one first: mixllm train")
            logger.error(message)
            raise RuntimeError(message)
        self.store = InteractionLog(self.config.sqlalchemy_url(self.config.service.feedback_store_url),
                                    busy_timeout_s=self.config.service.store_busy_timeout_s)
        ROUTABLE.stored_query = self._stored_query
        from mixllm.core.budgets import BudgetPacer
        from mixllm.io.ledger import TenantLedger

        self.ledger = TenantLedger(self.store, key_cache_s=self.config.budgets.key_cache_s)
        self.pacer = BudgetPacer(self.config.budgets.pacing)
        self._start_spend_records()
        from mixllm.io.attempts import AttemptLog
        from mixllm.io.sessions import SessionLog

        self.sessions = SessionLog(self.store, ttl_s=self.config.session.ttl_s)
        self.attempts = AttemptLog(self.store, background=True)
        TENANT_KEYS.enabled, TENANT_KEYS.lookup = bool(self.config.budgets.tenants), self._tenant_of_key
        UNAVAILABLE.explain, UNAVAILABLE.not_ready = self._why_unavailable, self._not_ready_reason
        self.load = LiveTraffic(max_age_s=self.config.service.in_flight_max_age_s,
                             window=self.config.service.latency_window,
                             max_client_share=self.config.service.latency_client_share)
        self.metrics = ServiceMetrics()
        failover = self.config.service.failover
        # A probe lost without its outcome is given up after the server's request timeout (by then
        # the server has cancelled a plain call; a stream may run longer, and then another probe starts).
        self.breakers = CircuitBreakers(failover.breaker_failures, failover.breaker_window_s,
                                        failover.breaker_cooldown_s,
                                        probe_timeout_s=float(self.config.service.request_timeout_s))
        self.model: LoadedModel | None = None
        self.loading_reason = (f"loading {alias} version {version} from the registry" if copied is None
                               else f"loading the local copy of {alias} version {copied}")
        self._reload_lock = threading.Lock()
        # Concurrent /route calls share encoder passes (the same batches /route_batch gets).
        self._route_coalescer = RequestCoalescer(self._route_pass, max_batch_size=self.config.service.max_batch_size)
        self._stop = threading.Event()
        self.started = time.time()
        threading.Thread(target=self._load_then_poll, args=(version,), daemon=True, name="mixllm-load").start()
        self.shadow = None
        if self.config.service.shadow.enabled:
            from mixllm.service.shadow import ShadowLog, ShadowScorer

            self.shadow = ShadowScorer(ShadowLog(self.store), self.config.service.shadow.share)
        self._off_policy_cache: tuple[float, int | None, dict[str, Any], int] | None = None
        self.drift_report = None
        if self.config.drift.enabled and self.config.drift.interval_s > 0:
            threading.Thread(target=self._watch_drift, daemon=True, name="mixllm-drift").start()
        if self.config.service.exit_with_parent:
            threading.Thread(target=self._exit_when_parent_dies, args=(os.getppid(),), daemon=True,
                             name="mixllm-parent-watch").start()

    def __is_ready__(self) -> bool:
        if self.model is None:
            raise HTTPException(status_code=503, detail=f"not ready: {self.loading_reason}")
        return True

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        self._stop.set()
        self.attempts.flush(timeout_s=2.0)  # the upstream calls' rows still queued
        self.store.dispose()
        remove_own_downloads()  # the worker ends without running exit hooks, which would remove them

    @bentoml.api(route="/route")
    def route(self, request: RouteRequest, /) -> RouteResponse:
        """Choose the LLM for one query; the decision is logged and gets a decision_id for /feedback."""
        started = time.perf_counter()
        not_ready = self._not_ready()
        if not_ready is not None:
            return not_ready
        result = self._route_coalescer(request)
        self.metrics.route_latency.labels(endpoint="route").observe(time.perf_counter() - started)
        return result

    @bentoml.api(route="/route_batch", batchable=True, max_batch_size=SETTINGS.max_batch_size,
                 max_latency_ms=SETTINGS.max_batch_latency_ms)
    def route_batch(self, requests: BatchOfRequests) -> list[RouteResponse]:
        """Many queries in one encoder pass: {"requests": [<a /route body>, ...]}. Concurrent calls
        are merged by adaptive batching. Each call is validated on its own before merging, so an
        invalid item fails its own call (400) and no other."""
        started = time.perf_counter()
        results = self._route_many(self._current(bentoml_api=True), requests, atomic=True)
        self.metrics.route_latency.labels(endpoint="route_batch").observe(time.perf_counter() - started)
        busy = [r for r in results if isinstance(r, JSONResponse) and r.status_code == 503]
        if busy:
            from bentoml.exceptions import ServiceUnavailable

            raise ServiceUnavailable("the decision log is busy (another writer holds its lock) or unreachable; nothing "
                                     "was logged, retry shortly")
        if any(isinstance(result, JSONResponse) for result in results):
            # Only when something changed between validation and routing (a candidate was disabled,
            # or another call took an item's request_id meanwhile): the merged calls fail together,
            # told nothing of each other's input.
            from bentoml.exceptions import InvalidArgument

            raise InvalidArgument("an item no longer routes: the served model changed (candidates) or its "
                                  "request_id was taken while this batch was queued; nothing was logged, retry")
        return results

    # BentoML works out a list's media type from its JSON schema on every response, which was a
    # seventh of the event loop's time under /route_batch load; a list of decisions is always JSON.
    route_batch.output_spec.media_type = "application/json"

    # --------------------------------------------------------------------------------- feedback

    @bentoml.api(route="/feedback")
    def feedback(self, request: FeedbackRequest, /, ctx: bentoml.Context) -> FeedbackResponse:
        """Store feedback durably (answers after the commit); a retry with the same decision_id or
        request_id is recognised and stores nothing new."""
        answer = self._store_feedback(request, reporting_client(ctx.request, self.config.service.auth_token_env))
        if isinstance(answer, JSONResponse):  # BentoML answers with the context's status, whatever is returned
            ctx.response.status_code = answer.status_code
        return answer

    def _store_feedback(self, request: FeedbackRequest, reporter: str | None) -> Any:
        """POST /feedback's work; `reporter` (access.reporting_client) sent it: a tenant, an anonymous
        address (no admin token configured), or None for the admin token."""
        from mixllm.core.errors import MixLLMError
        from mixllm.io.store import UnknownDecisionError
        from mixllm.io.validation import implausible_values

        model = self.model
        # While the model loads, the catalogue says which LLMs exist (feedback is accepted meanwhile).
        known = list(model.router.llms_) if model is not None else [llm.name for llm in self.config.llms]
        if request.llm and request.llm not in known:
            return error(400, "llm", f"unknown LLM '{request.llm}'; known: {', '.join(known)}")
        implausible = implausible_values(self.config.data.limits, cost_usd=request.cost_usd,
                                         latency_s=request.latency_s, input_tokens=request.input_tokens,
                                         output_tokens=request.output_tokens)
        if implausible:
            field, message = next(iter(implausible.items()))
            return error(400, field, message)
        kind = request.kind or ("binary" if request.thumbs is not None else "refined")
        quality = float(request.thumbs) if request.thumbs is not None else float(request.quality)
        if kind == "binary" and quality not in (0.0, 1.0):
            return error(400, "quality", "binary feedback must be 0 or 1 (or send thumbs)")
        try:
            if request.decision_id:
                # A call record the database refused carries the LLM that answered this decision
                # (the proxy may have failed over): written first, this feedback names that LLM.
                self._write_spend_of(request.decision_id)
            stored = self.store.add_feedback(
                quality=quality, kind=kind, decision_id=request.decision_id, request_id=request.request_id,
                query=request.query, llm=request.llm, cost_usd=request.cost_usd, latency_s=request.latency_s,
                input_tokens=request.input_tokens, output_tokens=request.output_tokens)
        except UnknownDecisionError as exc:
            return error(404, "decision_id", str(exc))
        except StoreBusyError as exc:
            return error(503, None, str(exc), {"Retry-After": "1"})
        except MixLLMError as exc:
            return error(400, exc.field, str(exc))
        if stored.created:
            self.metrics.feedback.labels(kind=kind).inc()
            # A measured call (bounded by data.limits above) of a decision this service made and did
            # not time itself (the proxy's own measurement is counted already): a bare query + llm
            # report costs nothing to send, and a few dozen would move the median.
            # A reporter's (a tenant's, an anonymous address's) reports hold at most
            # service.latency_client_share of the LLM's window.
            if request.latency_s is not None and request.decision_id and not stored.latency_measured:
                self.load.observe_latency(stored.llm, request.latency_s, client=reporter)
        return FeedbackResponse(feedback_id=stored.feedback_id, created=stored.created)

    # ------------------------------------------------------------------------------------ info

    @root_app.get("/model")
    def model_info(self) -> dict[str, Any]:
        """Served version, alias, LLM catalogue (no secrets) and decision settings."""
        model = self._current()
        description = model.router.describe()
        upstreams = {llm.name: llm.upstream.base_url for llm in self.config.llms if llm.upstream is not None}
        for llm in description["llms"]:
            llm["upstream"] = upstreams.get(llm["name"])
        snapshot = self.load.snapshot()
        return {"model_name": self.config.mlflow.registered_model_name, "alias": self.config.service.model_alias,
                "version": model.version, "loaded_from": model.source, "uptime_s": round(time.time() - self.started, 1),
                "in_flight": snapshot.in_flight, "observed_latency_s": snapshot.observed_latency_s,
                "open_circuits": self.breakers.open_llms(),
                "drift": self.drift_report.to_dict() if self.drift_report is not None else None, **description}

    @root_app.get("/budgets")
    def budgets(self, http_request: Request) -> dict[str, Any]:
        """Each tenant's budgets: spend, pace against the budget line, lambda factor, reset times.
        A tenant's key sees its own; the admin token sees every tenant."""
        return self.budget_report(self._tenant(http_request))

    @root_app.get("/stats")
    def stats(self, http_request: Request, days: Annotated[float | None, Query(ge=0.001, le=36_500)] = None) -> dict[str, Any]:
        """The proxy's answered calls (the last `days`, or all): traffic share per LLM, spend, what
        the same calls would have cost on the reference LLM, savings net of the router's compute,
        mean feedback quality and failovers; overall, per tenant, per tenant and model version.
        A tenant's key sees its own calls; the admin token sees every tenant's."""
        tenant = self._tenant(http_request)
        summary = self.usage_report(tenant, days)[0]
        if tenant is None and self.shadow is not None:
            summary["shadow"] = self._shadow_stats()
        return summary

    @root_app.get("/dashboard", response_class=HTMLResponse)
    def dashboard(self, http_request: Request, days: Annotated[float | None, Query(ge=0.001, le=36_500)] = None) -> HTMLResponse:
        """/stats as a page, with charts drawn by the service (no script, no CDN)."""
        from mixllm.evaluation.savings import charts, dashboard_html

        summary, calls = self.usage_report(self._tenant(http_request), days)
        return HTMLResponse(dashboard_html(summary, charts(calls, summary)))

    @admin_app.post("/reload")
    def reload(self) -> dict[str, Any]:
        """Reload the alias now (the service also polls it every service.poll_interval_s), and apply
        params.yaml's llms[].enabled flags to the served model."""
        before = self.model.version if self.model else None
        try:
            after = self._reload()
            pool_changes = self._reload_enabled_flags()
        except Exception as exc:  # noqa: BLE001 - report, keep serving the old model
            return error(503, None, f"reload failed, still serving version {before}: {exc}")
        return {"before": before, "version": after, "changed": before != after, "pool_changes": pool_changes,
                "enabled": list(self._current().router.enabled_llms_)}

    @admin_app.post("/circuits/close")
    def close_circuits(self, request: CloseCircuitsRequest | None = None) -> Any:
        """Close circuit breakers now (body {"llms": [...]}; no body: every LLM's), once an upstream
        is fixed, instead of waiting service.failover.breaker_cooldown_s for a probe."""
        llms = request.llms if request is not None else None
        known = {llm.name for llm in self.config.llms}
        unknown = sorted(set(llms or ()) - known)
        if unknown:
            return error(400, "llms", f"no such LLM in the catalogue: {', '.join(unknown)[:500]}; "
                                      f"known: {', '.join(sorted(known))[:1000]}")
        closed = self.breakers.close(llms)
        logger.info("circuit breakers closed by the operator: %s", ", ".join(closed) or "none were open")
        return {"closed": closed, "open_circuits": self.breakers.open_llms()}

    # ------------------------------------------------------------------------- OpenAI proxy

    @openai_app.get("/models")
    def list_models(self) -> dict[str, Any]:
        model = self._current()
        names = ["mixllm"] + [llm for llm in model.router.enabled_llms_]
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "mixllm"} for n in names]}

    @openai_app.post("/chat/completions")
    async def chat_completions(self, request: ChatRequest, http_request: Request) -> Any:
        """`model: "mixllm"` (or "mixllm:<lambda>") routes the conversation (its last user turn after
        a bounded window of context); any catalogue LLM name goes to that LLM directly. The call is
        forwarded to the LLM's upstream. A session id keeps a conversation on the LLM that answered
        it, unless that LLM fails (session.sticky)."""
        return await self._chat(request, http_request)

# Outermost first: the body limit, then the per-client limit (which reads /route_batch bodies the
# body limit has bounded, and counts rejected tokens too), then the token check.
MixLLMService.add_asgi_middleware(OpenAPIContract, fix=openapi_contract)
MixLLMService.add_asgi_middleware(OpenAIErrors)  # /v1 errors in OpenAI's shape, whichever layer answers
MixLLMService.add_asgi_middleware(RetryAfterOnUnavailable, reason=UNAVAILABLE)  # every 503 says when to retry, and why
MixLLMService.add_asgi_middleware(BodyLimit, max_bytes=SETTINGS.max_body_bytes,
                                  read_timeout_s=SETTINGS.body_read_timeout_s)
MixLLMService.add_asgi_middleware(ClientRateLimit, rate_per_s=SETTINGS.client_rate_per_s, burst=SETTINGS.client_burst,
                                  token_env=SETTINGS.auth_token_env, tenant_keys=TENANT_KEYS)
MixLLMService.add_asgi_middleware(BearerAuth, token_env=SETTINGS.auth_token_env,
                                  protect_route=SETTINGS.require_token_for_route, protect_proxy=PROXY_SPENDS_KEYS,
                                  tenant_keys=TENANT_KEYS)
MixLLMService.add_asgi_middleware(AnswerNotReady, reason=UNAVAILABLE)  # /route_batch's 503 while loading, unlogged
# Below the middleware: a request's headers must be complete before any middleware sees it, so the
# deadline for them is the HTTP server's (uvicorn's protocol class, set before BentoML starts it).
header_deadline.install(SETTINGS.header_read_timeout_s)

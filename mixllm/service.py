"""The BentoML route service: a thin HTTP shell over MixLLMRouter, the registry and the store.

    bentoml serve mixllm.service:MixLLMService --host 127.0.0.1 --port 3000

Serves the registry's champion (service.model_alias), polls the alias and swaps models atomically
(requests in flight finish on the model they started with), logs every decision and feedback row
to the interaction store, and proxies OpenAI-compatible chat completions to the chosen LLM.
Configuration: params.yaml from the working folder, or MIXLLM_PARAMS.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional

import bentoml
import numpy as np
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from starlette.exceptions import HTTPException

# A worker that cannot start (no champion in the registry) must stop `bentoml serve` with its
# message instead of being respawned every few seconds; this only turns off respawning.
os.environ.setdefault("BENTOML_CONTAINERIZED", "true")

logger = logging.getLogger("bentoml.mixllm")  # bentoml serve shows "bentoml.*" loggers


# ------------------------------------------------------------------------------------- schemas


class _Routable:
    """The served model's enabled LLMs, for checks that must run per HTTP request, before BentoML
    merges concurrent /route_batch calls: one caller's unknown candidate must fail only its own
    call, and must not show its input to the callers it was merged with. Set at every model swap
    (one worker process: workers=1); None until the first model is loaded."""

    enabled: tuple[str, ...] | None = None


ROUTABLE = _Routable()


def _checked_query(query: str, hint: str) -> str:
    from mixllm.schemas import is_blank

    if is_blank(query):
        raise ValueError(f"query is blank (only spaces or invisible characters); {hint}")
    limit = SETTINGS.max_query_chars
    if len(query) > limit:
        raise ValueError(f"query has {len(query)} characters; the limit is {limit} (service.max_query_chars)")
    return query



class RouteRequest(BaseModel):
    """One query to route, with optional per-request overrides."""

    # No schema "examples": BentoML 1.4's OpenAPI builder rejects the key (500 on /docs.json).
    # allow_inf_nan=False: JSON's Infinity/NaN would reach the router's arithmetic as numbers.
    model_config = ConfigDict(populate_by_name=True, extra="forbid", allow_inf_nan=False)

    query: Annotated[str, Field(min_length=1, description="The text to route.")]
    # strict=True on numbers: JSON true/false or "0.5" are mistakes, not 1.0/0.0/0.5 (integers still pass).
    lambda_: Annotated[Optional[float], Field(alias="lambda", ge=0, strict=True, description="Cost weight; default from params.yaml.")] = None
    exploration: Annotated[Optional[float], Field(ge=0, strict=True, description="Weight of the uncertainty bonus.")] = None
    candidates: Annotated[Optional[list[str]], Field(min_length=1, description="Route among these LLMs only.")] = None
    max_cost: Annotated[Optional[float], Field(ge=0, strict=True, description="Only LLMs predicted to cost at most this (USD).")] = None
    min_quality: Annotated[Optional[float], Field(ge=0, le=1, strict=True, description="Only LLMs predicted at least this good.")] = None
    request_id: Annotated[Optional[str], Field(min_length=1, max_length=128, description="Idempotency key.")] = None
    task: Annotated[Optional[str], Field(min_length=1, max_length=200, description=(
        "What the caller knows about the query's kind (a benchmark, an application, a prompt template). "
        "A task the router was trained on (GET /model: tasks) places the query in that domain; "
        "others are ignored, and the response's notes say so."))] = None

    @field_validator("query")
    @classmethod
    def _query_is_text(cls, query: str) -> str:
        # Checked here, per request, so a bad query never reaches (and fails) a merged batch.
        return _checked_query(query, "send the text to route")

    @field_validator("candidates")
    @classmethod
    def _candidates_are_routable(cls, candidates: list[str] | None) -> list[str] | None:
        enabled = ROUTABLE.enabled
        if candidates is None or enabled is None:
            return candidates
        unknown = [c for c in candidates if c not in enabled]
        if unknown:
            raise ValueError(f"unknown or disabled LLM(s) in candidates: {', '.join(unknown)}; choose from "
                             f"{', '.join(enabled)}")
        return candidates


class Candidate(BaseModel):
    llm: str
    quality: float
    cost_usd: float
    uncertainty: float
    penalty: float
    score: Optional[float]
    eligible: bool


class RouteResponse(BaseModel):
    model_config = ConfigDict(serialize_by_alias=True)

    llm: str
    decision_id: str
    model_version: int
    lambda_: float = Field(serialization_alias="lambda")
    relaxed: list[str]
    candidates: list[Candidate]
    notes: list[str] = []


class FeedbackRequest(BaseModel):
    """Feedback on a decision (decision_id), or a whole interaction (query + llm)."""

    # A non-finite cost or latency would poison the cost model and the latency average.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    decision_id: Annotated[Optional[str], Field(min_length=1, max_length=64)] = None
    request_id: Annotated[Optional[str], Field(min_length=1, max_length=128)] = None
    query: Annotated[Optional[str], Field(min_length=1)] = None
    llm: Annotated[Optional[str], Field(min_length=1)] = None
    # Strict types: "yes" is not a thumbs-up and true is not a quality of 1. Upper bounds on cost,
    # latency and tokens are data.limits, checked by the handler (they come from params.yaml).
    # thumbs comes first so that quality's check can see it (validation runs in field order).
    thumbs: Annotated[Optional[bool], Field(strict=True, description="Binary feedback: up (true) or down (false).")] = None
    quality: Annotated[Optional[float], Field(ge=0, le=1, strict=True, validate_default=True,
                                              description="Refined feedback, 0..1.")] = None
    kind: Optional[Literal["refined", "binary"]] = None
    cost_usd: Annotated[Optional[float], Field(ge=0, strict=True)] = None
    latency_s: Annotated[Optional[float], Field(ge=0, strict=True)] = None
    input_tokens: Annotated[Optional[int], Field(ge=0, strict=True)] = None
    output_tokens: Annotated[Optional[int], Field(ge=0, strict=True)] = None

    @field_validator("query")
    @classmethod
    def _query_is_text(cls, query: str | None) -> str | None:
        return None if query is None else _checked_query(query, "send the text that was answered")

    @field_validator("quality")
    @classmethod
    def _quality_or_thumbs(cls, quality: float | None, info: ValidationInfo) -> float | None:
        """A field check, not a model check, so the 400 names the field (quality)."""
        if "thumbs" in info.data and (quality is None) == (info.data["thumbs"] is None):
            raise ValueError("give exactly one of quality (0..1) or thumbs (true/false)")
        return quality

    @model_validator(mode="after")
    def _complete(self) -> FeedbackRequest:
        if not self.decision_id and not (self.query and self.llm):
            raise ValueError("give decision_id, or query and llm")
        return self


class FeedbackResponse(BaseModel):
    feedback_id: int
    created: bool


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: Any = None


# The OpenAI chat-completion parameters the proxy forwards besides model, messages and stream.
# Anything else is refused with a 400 naming it: the upstream is paid with the server's key.
FORWARDED_CHAT_FIELDS = frozenset({
    "stream_options", "temperature", "top_p", "max_tokens", "max_completion_tokens", "n", "stop",
    "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "user", "seed",
    "response_format", "tools", "tool_choice", "parallel_tool_calls",
})


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = "mixllm"
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    stream: Annotated[bool, Field(strict=True)] = False


# ------------------------------------------------------------------------------------- helpers


def error(status: int, field: str | None, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    # A lone surrogate from the request (JSON allows "\ud800") cannot be encoded as UTF-8: escape it.
    body = {"error": message.encode("utf-8", "backslashreplace").decode("utf-8")}
    if field:
        body["field"] = field.encode("utf-8", "backslashreplace").decode("utf-8")
    return JSONResponse(body, status_code=status, headers=headers)


def _surrogate_path(value: Any, path: str = "") -> str | None:
    """Where in a parsed JSON body a string holds a lone UTF-16 surrogate (not valid Unicode), or None."""
    if isinstance(value, str):
        return path or "body" if any("\ud800" <= ch <= "\udfff" for ch in value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            if _surrogate_path(str(key)):  # the key itself: name where it sits
                return path or "body"
            found = _surrogate_path(item, f"{path}.{key}" if path else str(key))
            if found:
                return found
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found = _surrogate_path(item, f"{path}[{index}]")
            if found:
                return found
    return None


def _redacted(text: str, secrets: list[str]) -> str:
    """Text from an upstream, safe to log: the keys it might echo, and any bearer token, removed."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return re.sub(r"(?i)bearer\s+[^\s\"']+", "Bearer [redacted]", text)


@dataclass(frozen=True)
class LoadedModel:
    """What requests read: swapped as a whole, so a request never sees half a reload."""

    router: Any
    version: int


class ServiceMetrics:
    """Prometheus metrics next to BentoML's own request metrics on /metrics."""

    def __init__(self) -> None:
        import prometheus_client as prom

        self.decisions = prom.Counter("mixllm_decisions_total", "Routing decisions per chosen LLM", ["llm"])
        self.route_latency = prom.Histogram(
            "mixllm_route_seconds", "Time to route (per HTTP call)", ["endpoint"],
            buckets=(0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12))
        self.feedback = prom.Counter("mixllm_feedback_rows_total", "Feedback rows stored", ["kind"])
        self.model_version = prom.Gauge("mixllm_model_version", "Registry version being served",
                                        multiprocess_mode="max")
        self.in_flight = prom.Gauge("mixllm_in_flight", "Calls in flight per LLM", ["llm"],
                                    multiprocess_mode="livesum")
        self.proxied = prom.Counter("mixllm_proxy_calls_total", "Proxied chat completions", ["llm", "status"])


class BodyLimit:
    """ASGI middleware: 413 above the size limit, 415 for form bodies (BentoML would answer 500)."""

    blocked = {b"multipart/form-data", b"application/x-www-form-urlencoded"}

    def __init__(self, app: Any, max_bytes: int = 1_048_576):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if content_type in self.blocked:
            return await _reject(send, 415, "send the body as application/json")
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _reject(send, 413, f"request body is larger than {self.max_bytes} bytes")
        chunks, seen, more = [], 0, True
        while more:  # buffer (bounded) so chunked uploads are limited too
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.max_bytes:
                return await _reject(send, 413, f"request body is larger than {self.max_bytes} bytes")
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class BearerAuth:
    """ASGI middleware: the configured token guards /feedback and /admin/* (and /route* if asked),
    and the chat proxy whenever it calls upstreams with the server's keys: then it needs a token
    even if none is configured (it answers 401 saying so), so no anonymous caller spends the keys."""

    def __init__(self, app: Any, token_env: str = "MIXLLM_API_TOKEN", protect_route: bool = False,
                 protect_proxy: bool = True):
        self.app, self.token_env = app, token_env
        self.protect_route, self.protect_proxy = protect_route, protect_proxy

    def _protected(self, path: str) -> bool:
        if path.startswith("/feedback") or path.startswith("/admin"):
            return True
        if path.startswith("/v1/chat"):
            return self.protect_route or self.protect_proxy
        return self.protect_route and path.startswith("/route")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        token = os.environ.get(self.token_env)
        path = scope.get("path", "")
        if scope["type"] == "http" and self._protected(path):
            if not token and self.protect_proxy and path.startswith("/v1/chat"):
                return await _reject(send, 401, f"this proxy calls upstreams with the server's API keys, so it needs a "
                                                f"token: set {self.token_env} for the service and send "
                                                "Authorization: Bearer <token>", field="Authorization")
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            # Constant time: the comparison must not tell an attacker how much of a guess was right.
            if token and not hmac.compare_digest(header.encode("latin-1"), f"Bearer {token}".encode("latin-1", "replace")):
                return await _reject(send, 401, "missing or wrong bearer token (header: Authorization: Bearer <token>)",
                                     field="Authorization")
        await self.app(scope, receive, send)


async def _reject(send: Any, status: int, message: str, field: str | None = None) -> None:
    payload = {"error": message, **({"field": field} if field else {})}
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _candidates(decision: Any) -> list[Candidate]:
    return [Candidate(llm=c.llm, quality=c.quality, cost_usd=c.cost_usd, uncertainty=c.uncertainty, penalty=c.penalty,
                      score=c.score if np.isfinite(c.score) else None, eligible=c.eligible)
            for c in decision.candidates]


def _decision_details(decision: Any) -> dict[str, Any]:
    """What the decision log keeps beside the choice, so a retried request_id gets the same answer."""
    return {"candidates": [c.__dict__ for c in decision.candidates], "relaxed": list(decision.relaxed),
            "notes": list(decision.notes)}


def _stored_response(stored: dict[str, Any]) -> RouteResponse:
    """The response a request_id got the first time, rebuilt from its logged decision."""
    details = json.loads(stored["candidates"]) if stored.get("candidates") else {}
    if isinstance(details, list):  # decisions logged before relaxed and notes were kept
        details = {"candidates": details}
    candidates = details.get("candidates", [])
    return RouteResponse(
        llm=stored["llm"], decision_id=stored["decision_id"], model_version=int(stored["model_version"] or 0),
        lambda_=float(stored["lambda_"] if stored["lambda_"] is not None else 0.0),
        relaxed=list(details.get("relaxed", [])), notes=list(details.get("notes", [])),
        candidates=[Candidate(llm=c["llm"], quality=c["quality"], cost_usd=c["cost_usd"],
                              uncertainty=c["uncertainty"], penalty=c["penalty"],
                              score=c["score"] if c["score"] is not None and np.isfinite(c["score"]) else None,
                              eligible=c["eligible"]) for c in candidates])


def _last_user_text(messages: list[ChatMessage]) -> str | None:
    for message in reversed(messages):
        if message.role == "user":
            content = message.content
            if isinstance(content, str):
                return content
            if isinstance(content, list):  # OpenAI content parts
                return "\n".join(p["text"] for p in content
                                 if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str))
    return None


# ------------------------------------------------------------------------------------- service

def _settings() -> tuple[Any, bool]:
    """Service settings needed before the class exists (decorators, middleware), and whether the
    proxy spends upstream keys (any llms[].upstream.api_key_env). Safe defaults when params.yaml
    cannot be read yet (then __init__ reports the config error in full)."""
    try:
        from mixllm.config import load_config

        config = load_config()
        return config.service, any(llm.upstream is not None and llm.upstream.api_key_env for llm in config.llms)
    except Exception:  # noqa: BLE001
        from mixllm.config import ServiceConfig

        return ServiceConfig(), True


SETTINGS, PROXY_SPENDS_KEYS = _settings()
BatchOfRequests = Annotated[list[RouteRequest], Field(min_length=1, max_length=SETTINGS.max_batch_size)]

openai_app = FastAPI(title="mixllm OpenAI-compatible proxy")
admin_app = FastAPI(title="mixllm admin")
root_app = FastAPI(title="mixllm model info")  # mounted last at "/": only its own routes match


@openai_app.exception_handler(RequestValidationError)
async def _chat_request_invalid(request: Any, exc: RequestValidationError) -> JSONResponse:
    """A 400 naming the field, like every other endpoint. FastAPI's own 422 echoes the input, and
    an input holding a lone surrogate cannot be encoded: that was a 500."""
    problems = exc.errors()
    problem = problems[0] if problems else {}
    loc = [str(part) for part in problem.get("loc", ()) if part != "body"]
    return error(400, loc[0] if loc else None, f"{'.'.join(loc) or 'body'}: {problem.get('msg', 'invalid request')}")


@bentoml.service(workers=1, traffic={"timeout": 120})
@bentoml.asgi_app(openai_app, path="/v1")
@bentoml.asgi_app(admin_app, path="/admin")
@bentoml.asgi_app(root_app, path="/")
class MixLLMService:
    """Routes queries with the MLflow champion and closes the continual-learning loop."""

    def __init__(self) -> None:
        from mixllm.config import load_config
        from mixllm.live_traffic import LiveLoad
        from mixllm.registry import Registry
        from mixllm.store import InteractionLog

        self.config = load_config()
        self.registry = Registry(self.config)
        alias = self.config.service.model_alias
        version = self.registry.alias_version(alias)
        if version is None:
            message = (f"refusing to start: the MLflow registry ({self.config.mlflow_tracking_uri}) has no "
                       f"'{alias}' version of {self.config.mlflow.registered_model_name}. Train one first: mixllm train")
            logger.error(message)
            raise RuntimeError(message)
        self.store = InteractionLog(self.config.sqlalchemy_url(self.config.service.feedback_store_url))
        self.load = LiveLoad(max_age_s=self.config.service.in_flight_max_age_s,
                             window=self.config.service.latency_window)
        self.metrics = ServiceMetrics()
        self.model: LoadedModel | None = None
        self.loading_reason = f"loading {alias} version {version} from the registry"
        self._reload_lock = threading.Lock()
        self._stop = threading.Event()
        self.started = time.time()
        threading.Thread(target=self._reload, args=(version,), daemon=True, name="mixllm-load").start()
        if self.config.service.poll_interval_s > 0:
            threading.Thread(target=self._poll, daemon=True, name="mixllm-poll").start()
        if self.config.service.exit_with_parent:
            threading.Thread(target=self._exit_when_parent_dies, args=(os.getppid(),), daemon=True,
                             name="mixllm-parent-watch").start()

    def _exit_when_parent_dies(self, parent_pid: int) -> None:
        """`bentoml serve` runs this service in a worker process that inherits the listening socket.
        If the serving process is killed (kill -9, the OOM killer), the worker would live on as an
        orphan, still answering and holding the port, so a restart could not bind it. When the
        parent is gone (the worker is re-parented) the worker stops itself: SIGTERM, the graceful
        way, then a hard exit if that did not end it within 10 s."""
        while not self._stop.wait(1.0):
            if os.getppid() != parent_pid:
                logger.error("the serving process (pid %d) is gone; worker %d exits so the port is freed and a "
                             "restart can bind it", parent_pid, os.getpid())
                os.kill(os.getpid(), signal.SIGTERM)
                if not self._stop.wait(10.0):
                    os._exit(1)
                return

    # -------------------------------------------------------------------------- model lifecycle

    def _reload(self, version: int | None = None) -> int:
        """Load `version` (default: what the alias points at now) and swap it in atomically."""
        with self._reload_lock:
            alias = self.config.service.model_alias
            target = version or self.registry.alias_version(alias)
            if target is None:
                raise RuntimeError(f"the registry has no '{alias}' version")
            if self.model is not None and self.model.version == target:
                return target
            started = time.perf_counter()
            router, number = self.registry.load_router(target)
            # params.yaml's enabled flags act at once (e.g. an upstream outage); adding and removing
            # LLMs is the continual flow's job, so the served model stays the registered one.
            for llm in self.config.llms:
                if llm.name in router.llms_:
                    router.set_enabled(llm.name, llm.enabled)
            router.route(["warm-up query"])  # first-call costs are paid here, not by a request
            self.model = LoadedModel(router, number)
            ROUTABLE.enabled = tuple(router.enabled_llms_)
            self.loading_reason = ""
            self.metrics.model_version.set(number)
            logger.info("serving %s version %d (loaded in %.1fs)", self.config.mlflow.registered_model_name, number,
                        time.perf_counter() - started)
            return number

    def _poll(self) -> None:
        interval = self.config.service.poll_interval_s
        while not self._stop.wait(interval):
            try:
                current = self.registry.alias_version(self.config.service.model_alias)
                if current is not None and (self.model is None or current != self.model.version):
                    logger.info("registry alias moved to version %s: reloading", current)
                    self._reload(current)
            except Exception as exc:  # noqa: BLE001 - polling must survive a registry hiccup
                logger.warning("registry poll failed (%s: %s); will retry", type(exc).__name__, exc)

    def __is_ready__(self) -> bool:
        if self.model is None:
            raise HTTPException(status_code=503, detail=f"not ready: {self.loading_reason}")
        return True

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        self._stop.set()
        self.store.dispose()

    def _current(self, *, bentoml_api: bool = False) -> LoadedModel:
        """The served model, or a 503 while none is loaded. BentoML's own endpoints answer 500 for
        starlette's HTTPException, so they get BentoML's ServiceUnavailable (a 503, whose text
        BentoML replaces with a generic one; /route answers its own 503 first, see _not_ready)."""
        model = self.model
        if model is None:
            if bentoml_api:
                from bentoml.exceptions import ServiceUnavailable

                raise ServiceUnavailable(f"not ready: {self.loading_reason}; retry in a few seconds")
            raise HTTPException(status_code=503, detail=f"not ready: {self.loading_reason}")
        return model

    def _not_ready(self) -> JSONResponse | None:
        if self.model is not None:
            return None
        return error(503, None, f"not ready: {self.loading_reason}; retry in a few seconds", {"Retry-After": "2"})

    # ------------------------------------------------------------------------------------ route

    def _route_many(self, model: LoadedModel, items: list[RouteRequest], atomic: bool = False) -> list[Any]:
        """Route items in one encoder pass; returns a RouteResponse or a JSONResponse error per item.

        A retried request_id gets its stored decision back (routing again could choose another
        LLM under a different load). With `atomic`, one invalid item means nothing is logged."""
        from mixllm.errors import RoutingError

        results: list[Any] = [None] * len(items)
        valid = []
        for i, item in enumerate(items):
            stored = self.store.decision_by_request(item.request_id) if item.request_id else None
            if stored is not None and stored["query"] != item.query:
                results[i] = error(409, "request_id", f"request_id {item.request_id!r} was already used for another "
                                   "query; a retry must repeat the same query, a new query needs a new request_id")
            elif stored is not None:
                results[i] = _stored_response(stored)
            else:
                valid.append(i)
        if not valid:
            return results
        router = model.router
        predictions = router.predict([items[i].query for i in valid], tasks=[items[i].task for i in valid])
        snapshot = self.load.snapshot()
        records = []
        for row, i in enumerate(valid):
            item = items[i]
            try:
                decision = router.route([item.query], lambda_=item.lambda_, exploration=item.exploration,
                                        candidates=item.candidates, max_cost_usd=item.max_cost,
                                        min_quality=item.min_quality, load=snapshot,
                                        predictions=predictions.subset(slice(row, row + 1)), tasks=[item.task])[0]
            except RoutingError as exc:
                results[i] = error(400, exc.field, str(exc))
                continue
            records.append((i, item, decision))
        if atomic and any(isinstance(result, JSONResponse) for result in results):
            return results
        decision_ids = self._log_decisions(model, records)
        # A decision is not a call: counting it as in flight let anyone steer everyone's traffic off
        # an LLM with one big anonymous batch. Only calls the proxy makes count (see _forward).
        for (i, _, decision), decision_id in zip(records, decision_ids):
            self.metrics.decisions.labels(llm=decision.llm).inc()
            results[i] = RouteResponse(llm=decision.llm, decision_id=decision_id, model_version=model.version,
                                       lambda_=decision.lambda_, relaxed=list(decision.relaxed),
                                       candidates=_candidates(decision), notes=list(decision.notes))
        return results

    def _log_decisions(self, model: LoadedModel, records: list[tuple[int, RouteRequest, Any]]) -> list[str]:
        ids = []
        plain = [(item, d) for _, item, d in records if not item.request_id]
        if plain:  # one transaction for the batch
            ids_plain = iter(self.store.log_decisions([
                {"query": item.query, "llm": d.llm, "model_version": model.version, "lambda_": d.lambda_,
                 "candidates": _decision_details(d)} for item, d in plain]))
        for _, item, decision in records:
            if item.request_id:
                ids.append(self.store.log_decision(item.query, decision.llm, model_version=model.version,
                                                   lambda_=decision.lambda_, request_id=item.request_id,
                                                   candidates=_decision_details(decision)))
            else:
                ids.append(next(ids_plain))
        return ids

    @bentoml.api(route="/route")
    def route(self, request: RouteRequest, /) -> RouteResponse:
        """Choose the LLM for one query; the decision is logged and gets a decision_id for /feedback."""
        started = time.perf_counter()
        not_ready = self._not_ready()
        if not_ready is not None:
            return not_ready
        result = self._route_many(self._current(bentoml_api=True), [request])[0]
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
        if any(isinstance(result, JSONResponse) for result in results):
            # Only when the served model changed between validation and routing (a candidate was
            # disabled meanwhile): the merged calls fail together, told nothing of each other's input.
            from bentoml.exceptions import InvalidArgument

            raise InvalidArgument("the served model changed while this batch was queued and an item no longer "
                                  "routes (candidates); nothing was logged, retry")
        return results

    # --------------------------------------------------------------------------------- feedback

    @bentoml.api(route="/feedback")
    def feedback(self, request: FeedbackRequest, /) -> FeedbackResponse:
        """Store feedback durably (answers after the commit); a retry with the same decision_id or
        request_id is recognised and stores nothing new."""
        from mixllm.data import implausible_values
        from mixllm.errors import MixLLMError
        from mixllm.store import UnknownDecisionError

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
            stored = self.store.add_feedback(
                quality=quality, kind=kind, decision_id=request.decision_id, request_id=request.request_id,
                query=request.query, llm=request.llm, cost_usd=request.cost_usd, latency_s=request.latency_s,
                input_tokens=request.input_tokens, output_tokens=request.output_tokens)
        except UnknownDecisionError as exc:
            return error(404, "decision_id", str(exc))
        except MixLLMError as exc:
            return error(400, exc.field, str(exc))
        if stored.created:
            self.metrics.feedback.labels(kind=kind).inc()
            if request.latency_s is not None:  # a measured call (bounded by data.limits above)
                self.load.observe_latency(stored.llm, request.latency_s)
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
                "version": model.version, "uptime_s": round(time.time() - self.started, 1),
                "in_flight": snapshot.in_flight, "observed_latency_s": snapshot.observed_latency_s, **description}

    @admin_app.post("/reload")
    def reload(self) -> dict[str, Any]:
        """Reload the alias now (the service also polls it every service.poll_interval_s)."""
        before = self.model.version if self.model else None
        try:
            after = self._reload()
        except Exception as exc:  # noqa: BLE001 - report, keep serving the old model
            return error(503, None, f"reload failed, still serving version {before}: {exc}")
        return {"before": before, "version": after, "changed": before != after}

    # ------------------------------------------------------------------------- OpenAI proxy

    @openai_app.get("/models")
    def list_models(self) -> dict[str, Any]:
        model = self._current()
        names = ["mixllm"] + [llm for llm in model.router.enabled_llms_]
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "mixllm"} for n in names]}

    @openai_app.post("/chat/completions")
    async def chat_completions(self, request: ChatRequest) -> Any:
        """`model: "mixllm"` (or "mixllm:<lambda>") routes the last user message; any catalogue LLM
        name goes to that LLM directly. The call is forwarded to the LLM's upstream."""
        import anyio

        model = self._current()
        upstreams = {llm.name: llm.upstream for llm in self.config.llms if llm.upstream is not None}
        refusal = self._chat_refusal(request)
        if refusal is not None:
            return refusal
        text = _last_user_text(request.messages)
        if not text:
            return error(400, "messages", "no user message with text to route")
        decision_id, routed = None, request.model == "mixllm" or request.model.startswith("mixllm:")
        if routed:
            lambda_ = None
            if ":" in request.model:
                try:
                    lambda_ = float(request.model.split(":", 1)[1])
                except ValueError:
                    return error(400, "model", f"'{request.model}': after 'mixllm:' comes lambda, a number >= 0")
            candidates = [m for m in model.router.enabled_llms_ if m in upstreams]
            if not candidates:
                return error(503, None, "no LLM in the catalogue has an upstream (llms[].upstream in params.yaml)")
            try:
                item = RouteRequest(query=text, lambda_=lambda_, candidates=candidates)
            except ValidationError as exc:
                problem = exc.errors()[0]
                field = "model" if problem["loc"] and problem["loc"][0] in ("lambda", "lambda_") else "messages"
                return error(400, field, f"{field}: {problem['msg']}")
            routed_result = (await anyio.to_thread.run_sync(self._route_many, model, [item]))[0]
            if isinstance(routed_result, JSONResponse):
                return routed_result
            chosen, decision_id = routed_result.llm, routed_result.decision_id
        else:
            chosen = request.model
            if chosen not in upstreams:
                return error(404, "model", f"unknown model '{chosen}'; use mixllm, mixllm:<lambda> or one of "
                                           f"{', '.join(sorted(upstreams))}")
        return await self._forward(request, chosen, upstreams[chosen], decision_id, model.version)

    def _chat_refusal(self, request: ChatRequest) -> JSONResponse | None:
        """A 400 naming the field for what the proxy must not forward: text that is not valid
        Unicode, a parameter outside FORWARDED_CHAT_FIELDS, n or max_tokens above the caps."""
        where = _surrogate_path(request.model_dump())
        if where:
            return error(400, where.split(".")[0].split("[")[0], f"{where} holds a lone UTF-16 surrogate, which is "
                                                                  "not valid Unicode text")
        extra = request.model_extra or {}
        unknown = sorted(set(extra) - FORWARDED_CHAT_FIELDS)
        if unknown:
            return error(400, unknown[0], f"'{unknown[0]}' is not a chat-completion parameter this proxy forwards "
                                          f"(it forwards model, messages, stream, {', '.join(sorted(FORWARDED_CHAT_FIELDS))})")
        caps = {"n": self.config.service.proxy_max_n, "max_tokens": self.config.service.proxy_max_tokens,
                "max_completion_tokens": self.config.service.proxy_max_tokens}
        for name, cap in caps.items():
            value = extra.get(name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= cap):
                setting = "proxy_max_n" if name == "n" else "proxy_max_tokens"
                return error(400, name, f"{name} must be an integer from 1 to {cap} (service.{setting}), got {value!r}")
        return None

    async def _forward(self, request: ChatRequest, llm: str, upstream: Any, decision_id: str | None,
                       version: int) -> Any:
        import httpx

        payload = request.model_dump(exclude_none=True)
        payload["model"] = upstream.model or llm
        if request.stream:
            payload.setdefault("stream_options", {"include_usage": True})
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(upstream.api_key_env) if upstream.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"

        def upstream_failed(status: int, detail: str, what: str = "") -> JSONResponse:
            # The caller gets no upstream text (it may echo the key); the log gets it, redacted.
            logger.warning("upstream for %s answered %d%s: %s", llm, status, what, _redacted(detail[:500], [key or ""]))
            return error(502, None, f"upstream for {llm} answered {status}{what}; the service log has the details")
        url = upstream.base_url.rstrip("/") + "/chat/completions"
        call_id = decision_id or uuid.uuid4().hex
        # The proxy reports completion itself, so the call counts until then (or the upstream timeout).
        self.load.start(call_id, llm, expires_after_s=upstream.timeout_s)
        self.metrics.in_flight.labels(llm=llm).inc()
        mixllm_headers = {"x-mixllm-llm": llm, "x-mixllm-model-version": str(version),
                          **({"x-mixllm-decision-id": decision_id} if decision_id else {})}
        started = time.perf_counter()
        client = httpx.AsyncClient(timeout=upstream.timeout_s)

        def finish(status: str, usage: dict | None) -> None:
            latency = time.perf_counter() - started
            self.metrics.in_flight.labels(llm=llm).dec()
            self.metrics.proxied.labels(llm=llm, status=status).inc()
            # A failed call's time says nothing about the LLM's speed (a dead upstream fails fast).
            self.load.finish(call_id, latency if status == "ok" else None)
            if decision_id and status == "ok":
                tokens_in = (usage or {}).get("prompt_tokens")
                tokens_out = (usage or {}).get("completion_tokens")
                cost = self._price(llm, tokens_in, tokens_out)
                self.store.complete_decision(decision_id, cost_usd=cost, latency_s=latency,
                                             input_tokens=tokens_in, output_tokens=tokens_out)

        try:
            if not request.stream:
                response = await client.post(url, json=payload, headers=headers)
                await client.aclose()
                if response.status_code >= 400:
                    finish("upstream_error", None)
                    return upstream_failed(response.status_code, response.text)
                try:
                    body = response.json()
                    if not isinstance(body, dict):
                        raise ValueError("not a JSON object")
                except ValueError:
                    finish("upstream_error", None)
                    return upstream_failed(response.status_code, response.text, " without a JSON object")
                finish("ok", body.get("usage") if isinstance(body.get("usage"), dict) else None)
                body["model"] = llm
                body["mixllm"] = {"llm": llm, "decision_id": decision_id, "model_version": version}
                return JSONResponse(body, headers=mixllm_headers)
            upstream_request = client.build_request("POST", url, json=payload, headers=headers)
            response = await client.send(upstream_request, stream=True)
            if response.status_code >= 400:
                text = (await response.aread()).decode(errors="replace")
                await response.aclose()
                await client.aclose()
                finish("upstream_error", None)
                return upstream_failed(response.status_code, text)
        except httpx.HTTPError as exc:
            await client.aclose()
            finish("unreachable", None)
            return error(502, None, f"upstream for {llm} is unreachable ({type(exc).__name__})")

        async def relay() -> Any:
            usage = None
            try:
                async for line in response.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        try:
                            chunk = json.loads(line[6:])
                        except json.JSONDecodeError:
                            chunk = None
                        if isinstance(chunk, dict):  # anything else is relayed untouched
                            if isinstance(chunk.get("usage"), dict):
                                usage = chunk["usage"]
                            chunk["model"] = llm
                            line = "data: " + json.dumps(chunk)
                    yield line + "\n"
            finally:
                await response.aclose()
                await client.aclose()
                finish("ok", usage)

        return StreamingResponse(relay(), media_type="text/event-stream", headers=mixllm_headers)

    def _price(self, llm: str, tokens_in: float | None, tokens_out: float | None) -> float | None:
        if tokens_in is None and tokens_out is None:
            return None
        entry = next((c for c in self.config.llms if c.name == llm), None)
        if entry is None:
            return None
        from mixllm.units import call_cost_usd

        return float(call_cost_usd(tokens_in or 0, tokens_out or 0, entry.input_usd_per_1k, entry.output_usd_per_1k))


MixLLMService.add_asgi_middleware(BodyLimit, max_bytes=SETTINGS.max_body_bytes)
MixLLMService.add_asgi_middleware(BearerAuth, token_env=SETTINGS.auth_token_env,
                                  protect_route=SETTINGS.require_token_for_route, protect_proxy=PROXY_SPENDS_KEYS)

"""The service's HTTP API: request and response models, the error format, and the limits read
from params.yaml before the service class exists (BentoML's decorators need them).

Every 4xx is {"error": message, "field": the request field at fault}; BentoML's own validation
errors carry the field in detail[0].loc instead.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal, Optional

import numpy as np
from fastapi.responses import JSONResponse
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator,
                      model_validator)


def _settings() -> tuple[Any, Any, bool]:
    """Service settings needed before the class exists (decorators, middleware), the plausibility
    limits of feedback (for the OpenAPI contract), and whether the proxy spends upstream keys (any
    llms[].upstream.api_key_env). Safe defaults when params.yaml cannot be read yet: the service's
    __init__ then reads it again and refuses to start with the config error in full. Only a config
    error is caught: a bug here must not hide behind defaults."""
    from mixllm.config import PlausibilityConfig, ServiceConfig, load_config
    from mixllm.core.errors import ConfigError

    try:
        config = load_config()
    except ConfigError as error:
        logging.getLogger(__name__).warning("service settings: defaults for now (%s)", error)
        return ServiceConfig(), PlausibilityConfig(), True
    return (config.service, config.data.limits,
            any(llm.upstream is not None and llm.upstream.api_key_env for llm in config.llms))


SETTINGS, LIMITS, PROXY_SPENDS_KEYS = _settings()


class _Routable:
    """The served model's enabled LLMs, for checks that must run per HTTP request, before BentoML
    merges concurrent /route_batch calls: one caller's unknown candidate must fail only its own
    call, and must not show its input to the callers it was merged with. Set at every model swap
    (one worker process: workers=1); None until the first model is loaded. `known`: every LLM of
    the served model, enabled or not (feedback may name any)."""

    enabled: tuple[str, ...] | None = None
    known: tuple[str, ...] | None = None
    stored_query: Any = None  # request_id -> the query it was first used for, or None (the decision log)


ROUTABLE = _Routable()


def _checked_query(query: str, hint: str) -> str:
    from mixllm.core.schemas import is_blank

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
    # Set by the service, never by a caller (a private attribute is no request field): why the
    # candidates are what they are (the proxy's open circuit breakers), logged with the decision.
    _service_notes: list[str] = PrivateAttr(default_factory=list)

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
    # Under the decision policy: 1 for the argmax policy's choice; a stochastic policy's probabilities
    # (decision.policy), which the decision log keeps for off-policy evaluation.
    probability: float = 0.0


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


class CloseCircuitsRequest(BaseModel):
    """POST /admin/circuits/close: the LLMs whose circuit breakers to close; none named, every one."""

    model_config = ConfigDict(extra="forbid")

    llms: Annotated[Optional[list[Annotated[str, Field(min_length=1, max_length=200)]]],
                    Field(max_length=1000, description="LLM names; omitted or null: every LLM.")] = None


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


# The keys a chat message may carry, and its roles (OpenAI's, tool calls included). A message with
# another key is refused, as a request with another parameter is: it too goes to the paid upstream.
FORWARDED_MESSAGE_FIELDS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id", "function_call",
                                      "refusal", "audio"})
MESSAGE_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


# Fields the proxy reads itself and never forwards: a session id in metadata, and candidates (the
# LLMs this chat may be routed to; the openai client sends them with extra_body).
CONSUMED_CHAT_FIELDS = frozenset({"metadata", "candidates"})


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = "mixllm"
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    stream: Annotated[bool, Field(strict=True)] = False

    def forwarded(self) -> dict[str, Any]:
        """What goes upstream: every field but those the proxy consumes (the model name is the
        caller's until the proxy names the upstream's)."""
        return self.model_dump(exclude_none=True, exclude=set(CONSUMED_CHAT_FIELDS))


def error(status: int, field: str | None, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    # A lone surrogate from the request (JSON allows "\ud800") cannot be encoded as UTF-8: escape it.
    body = {"error": message.encode("utf-8", "backslashreplace").decode("utf-8")}
    if field:
        body["field"] = field.encode("utf-8", "backslashreplace").decode("utf-8")
    return JSONResponse(body, status_code=status, headers=headers)


def surrogate_path(value: Any, path: str = "") -> str | None:
    """Where in a parsed JSON body a string holds a lone UTF-16 surrogate (not valid Unicode), or None."""
    if isinstance(value, str):
        return path or "body" if any("\ud800" <= ch <= "\udfff" for ch in value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            if surrogate_path(str(key)):  # the key itself: name where it sits
                return path or "body"
            found = surrogate_path(item, f"{path}.{key}" if path else str(key))
            if found:
                return found
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found = surrogate_path(item, f"{path}[{index}]")
            if found:
                return found
    return None


def _candidate(fields: dict[str, Any], chosen: str | None = None) -> Candidate:
    """A response's candidate from a mixllm.core.decision.CandidateScore's fields, live or as logged (the
    one schema: test_api_models checks the two agree). Decisions logged before propensities were
    kept get probability 1 for the chosen LLM, 0 for the others."""
    score = fields.get("score")
    return Candidate(**{**fields, "score": score if score is not None and np.isfinite(score) else None,
                        "probability": fields.get("probability", float(fields["llm"] == chosen))})


def _fields(candidate: Any) -> dict[str, Any]:
    """A CandidateScore's fields, all plain values (a dataclass without slots keeps exactly its
    fields in __dict__): dataclasses.asdict's deep copy, then dataclasses.fields, each took a tenth
    of a routed batch's time."""
    return dict(vars(candidate))


def candidate_scores(decision: Any) -> list[Candidate]:
    return [_candidate(_fields(c)) for c in decision.candidates]


def decision_details(decision: Any) -> dict[str, Any]:
    """What the decision log keeps beside the choice, so a retried request_id gets the same answer."""
    return {"candidates": [_fields(c) for c in decision.candidates], "relaxed": list(decision.relaxed),
            "notes": list(decision.notes)}


def stored_response(stored: dict[str, Any]) -> RouteResponse:
    """The response a request_id got the first time, rebuilt from its logged decision."""
    from mixllm.io.store_schema import logged_decision_details  # here: only a retried request needs it

    details = logged_decision_details(stored.get("candidates"))
    return RouteResponse(
        llm=stored["llm"], decision_id=stored["decision_id"], model_version=int(stored["model_version"] or 0),
        lambda_=float(stored["lambda_"] if stored["lambda_"] is not None else 0.0),
        relaxed=details["relaxed"], notes=details["notes"],
        candidates=[_candidate(c, chosen=stored["llm"]) for c in details["candidates"]])


def message_text(message: ChatMessage) -> str | None:
    content = message.content
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return "\n".join(p["text"] for p in content
                         if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str))
    return None


def last_user_text(messages: list[ChatMessage]) -> str | None:
    for message in reversed(messages):
        if message.role == "user":
            return message_text(message)
    return None


def conversation_text(messages: list[ChatMessage], max_messages: int, max_chars: int) -> str | None:
    """What a chat is routed on: up to `max_messages` messages before the last user turn (oldest
    cut first, to `max_chars` characters), then that turn, which is kept whole. The encoder keeps a
    prompt's end when it is too long, so the turn being answered is never the part cut."""
    last = max((i for i, m in enumerate(messages) if m.role == "user"), default=None)
    if last is None:
        return None
    turn = message_text(messages[last])
    if not turn:
        return turn
    context, budget = [], max_chars
    for message in reversed(messages[max(last - max_messages, 0):last] if max_messages else []):
        text = message_text(message)
        if not text or message.role not in ("user", "assistant", "system"):
            continue
        line = f"{message.role}: {text}"
        if len(line) > budget:
            if budget > 0:
                context.append(line[len(line) - budget:])
            break
        context.append(line)
        budget -= len(line)
    return "\n".join([*reversed(context), turn]) if context else turn


def _request_ids_are_fresh(items: list[RouteRequest]) -> list[RouteRequest]:
    """A request_id already used for another query fails its own call here, per HTTP request:
    found after BentoML merged concurrent calls, it would fail every caller of the merged batch."""
    seen: dict[str, str] = {}
    for i, item in enumerate(items):
        if item.request_id and seen.setdefault(item.request_id, item.query) != item.query:
            raise ValueError(f"requests[{i}].request_id {item.request_id!r} is given to two different queries "
                             "in this batch; each query needs its own request_id")
    lookup = ROUTABLE.stored_query
    if lookup is None:
        return items
    for i, item in enumerate(items):
        if not item.request_id:
            continue
        try:
            stored = lookup(item.request_id)
        except Exception:  # noqa: BLE001 - a busy store: routing checks again, and answers 503 if need be
            return items
        if stored is not None and stored != item.query:
            raise ValueError(f"requests[{i}].request_id {item.request_id!r} was already used for another query; "
                             "a retry must repeat the same query, a new query needs a new request_id")
    return items


BatchOfRequests = Annotated[list[RouteRequest], Field(min_length=1, max_length=SETTINGS.max_batch_size),
                            AfterValidator(_request_ids_are_fresh)]

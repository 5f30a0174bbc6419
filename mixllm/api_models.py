"""The service's HTTP API: request and response models, the error format, and the limits read
from params.yaml before the service class exists (BentoML's decorators need them).

Every 4xx is {"error": message, "field": the request field at fault}; BentoML's own validation
errors carry the field in detail[0].loc instead.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Optional

import numpy as np
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator


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


def candidate_scores(decision: Any) -> list[Candidate]:
    return [Candidate(llm=c.llm, quality=c.quality, cost_usd=c.cost_usd, uncertainty=c.uncertainty, penalty=c.penalty,
                      score=c.score if np.isfinite(c.score) else None, eligible=c.eligible)
            for c in decision.candidates]


def decision_details(decision: Any) -> dict[str, Any]:
    """What the decision log keeps beside the choice, so a retried request_id gets the same answer."""
    return {"candidates": [c.__dict__ for c in decision.candidates], "relaxed": list(decision.relaxed),
            "notes": list(decision.notes)}


def stored_response(stored: dict[str, Any]) -> RouteResponse:
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


def last_user_text(messages: list[ChatMessage]) -> str | None:
    for message in reversed(messages):
        if message.role == "user":
            content = message.content
            if isinstance(content, str):
                return content
            if isinstance(content, list):  # OpenAI content parts
                return "\n".join(p["text"] for p in content
                                 if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str))
    return None


BatchOfRequests = Annotated[list[RouteRequest], Field(min_length=1, max_length=SETTINGS.max_batch_size)]

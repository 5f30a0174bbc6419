"""ASGI middleware of the service: body limits, the published contract and errors in the caller's
shape, answered before BentoML parses anything (so a bad request never costs a model call, and
never becomes a 500). Who may call, and how often: mixllm.service.access."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from mixllm.config.operations import ServiceConfig


class BodyLimit:
    """ASGI middleware: 413 above the size limit, 415 for form bodies (BentoML would answer 500),
    408 for a body not received within `read_timeout_s` (a client that sends half a body and stalls
    would otherwise hold its connection and a request slot for as long as it likes)."""

    blocked = {b"multipart/form-data", b"application/x-www-form-urlencoded"}

    def __init__(self, app: Any, max_bytes: int = ServiceConfig.default_for("max_body_bytes"),
                 read_timeout_s: float = ServiceConfig.default_for("body_read_timeout_s")):
        self.app, self.max_bytes, self.read_timeout_s = app, max_bytes, read_timeout_s

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if content_type in self.blocked:
            return await reject(send, 415, "send the body as application/json")
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await reject(send, 413, f"request body is larger than {self.max_bytes} bytes")
        import anyio

        chunks, seen, more = [], 0, True
        deadline = time.monotonic() + self.read_timeout_s
        while more:  # buffer (bounded) so chunked uploads are limited too
            try:
                with anyio.fail_after(max(deadline - time.monotonic(), 0.0)):
                    message = await receive()
            except TimeoutError:
                return await reject(send, 408, f"the request body did not arrive within {self.read_timeout_s:g} s "
                                                "(service.body_read_timeout_s)")
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.max_bytes:
                return await reject(send, 413, f"request body is larger than {self.max_bytes} bytes")
            chunks.append(chunk)
            more = message.get("more_body", False)
        await self.app(scope, replaying(b"".join(chunks), receive), send)


def replaying(body: bytes, receive: Any) -> Any:
    """An ASGI receive that hands the app the body already read, then defers to the real one."""
    replayed = False

    async def replay() -> dict:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def reject(send: Any, status: int, message: str, field: str | None = None,
                  headers: dict[str, str] | None = None) -> None:
    payload = {"error": message, **({"field": field} if field else {})}
    body = json.dumps(payload).encode()
    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]})
    await send({"type": "http.response.body", "body": body})


class RefusalsWithoutTraceback(logging.Filter):
    """BentoML logs every request it answers with an error raised through it at ERROR with a full
    traceback, refusals included: a body that fails validation or an InvalidArgument (4xx), and the
    503s the service raises on purpose (the decision log busy on /route_batch, no model loaded yet).
    A log that cries wolf for each refused request buries the real errors. This filter turns the
    4xx records into one INFO line, and those 503s into one WARNING line (an operator wants to
    know the log was busy, not a stack), each naming the path and the reason; every other error
    keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        status = _refusal_status(error) if error is not None else None
        if status is not None:
            summary = " ".join(str(error).split())[:300]
            level = logging.INFO if status < 500 else logging.WARNING
            kind = "client error, answered 4xx" if status < 500 else f"refused, answered {status}"
            record.msg, record.args = f"{record.getMessage()}: {kind}: %s", (summary,)
            record.levelno, record.levelname = level, logging.getLevelName(level)
            record.exc_info, record.exc_text = None, None
        return True


def _refusal_status(error: BaseException) -> int | None:
    """The status of a refusal (a 4xx, or BentoML's ServiceUnavailable, which only the service
    raises, on purpose); None for anything else."""
    from bentoml.exceptions import BentoMLException, ServiceUnavailable
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        return 400
    if not isinstance(error, BentoMLException):
        return None
    status = int(getattr(error.error_code, "value", 500))
    return status if status < 500 or isinstance(error, ServiceUnavailable) else None


def quiet_refusals(logger_name: str = "bentoml._internal.server.http_app") -> None:
    """Install RefusalsWithoutTraceback on the logger BentoML's request errors go to (once)."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, RefusalsWithoutTraceback) for f in logger.filters):
        logger.addFilter(RefusalsWithoutTraceback())


class OpenAPIContract:
    """ASGI middleware: GET /docs.json answers BentoML's generated OpenAPI document passed through
    `fix` (openapi_contract.openapi_contract), so the published contract is the one the service keeps."""

    def __init__(self, app: Any, fix: Any, path: str = "/docs.json"):
        self.app, self.fix, self.path = app, fix, path

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") != self.path or scope.get("method") != "GET":
            return await self.app(scope, receive, send)
        start: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def capture(message: dict) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = b"".join(chunks)
            if start.get("status") == 200:
                body = json.dumps(self.fix(json.loads(body))).encode()
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, capture)


# OpenAI's error "type" for a status, so its client raises the matching exception with our text.
OPENAI_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                      404: "not_found_error", 408: "timeout_error", 409: "conflict_error", 413: "invalid_request_error",
                      415: "invalid_request_error", 429: "rate_limit_error"}


def openai_error(body: dict[str, Any], status: int) -> dict[str, Any]:
    """The service's {"error": text, "field": name} in OpenAI's shape, {"error": {"message", "type",
    "param", "code"}}, keeping "field" beside it (so one reader serves every endpoint)."""
    text, field = body.get("error"), body.get("field")
    kind = OPENAI_ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": text, "type": kind, "param": field, "code": None},
            **({"field": field} if field else {})}


# What BentoML answers for any exception of 500 or more it catches, whatever the exception said.
BENTOML_GENERIC_ERROR = b"An unexpected error has occurred, please check the server log."


class UnavailableReason:
    """Why the service answers 503 now (the service sets both when it starts): `explain`, what
    RetryAfterOnUnavailable puts in place of BentoML's generic text; `not_ready`, why no model serves
    yet (None once one does), which AnswerNotReady answers with."""

    def __init__(self) -> None:
        self.explain: Any = None  # () -> str
        self.not_ready: Any = None  # () -> str | None


class AnswerNotReady:
    """ASGI middleware, the innermost: a batched endpoint (/route_batch) called while no model is
    loaded gets its 503 here, before BentoML queues it for a batch. Raised inside BentoML's batched
    call the 503 reached the client too, but each one went through the batch queue and into the log
    (dozens at each start and reload; RefusalsWithoutTraceback makes a 503 raised there one line).
    /route answers its own 503 (it is not batched) and never comes here."""

    def __init__(self, app: Any, reason: UnavailableReason, paths: tuple[str, ...] = ("/route_batch",)):
        self.app, self.reason, self.paths = app, reason, paths

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        batched = scope["type"] == "http" and scope["path"] in self.paths
        why = self.reason.not_ready() if batched and self.reason.not_ready is not None else None
        if why is None:  # a model serves (or another path): BentoML's endpoint answers
            return await self.app(scope, receive, send)
        body = json.dumps({"error": why}).encode()
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class RetryAfterOnUnavailable:
    """ASGI middleware: every 503 tells the client when to retry, and why. The service's own 503s
    say so already; those raised through BentoML (a busy decision log on /route_batch, the model
    still loading) cannot carry a header, and BentoML replaces their message with a generic one.
    A client without Retry-After retries at once or gives up; one without a reason cannot act."""

    def __init__(self, app: Any, seconds: int = 1, reason: UnavailableReason | None = None):
        self.app, self.header = app, (b"retry-after", str(int(seconds)).encode())
        self.reason = reason or UnavailableReason()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held: dict | None = None  # a 503's start, until its body shows whether it is BentoML's generic one

        async def with_retry_after(message: dict) -> None:
            nonlocal held
            if message["type"] == "http.response.start" and message["status"] == 503:
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"retry-after" for k, _ in headers):
                    message = {**message, "headers": [*headers, self.header]}
                if self.reason.explain is not None:
                    held = message
                    return
            if message["type"] == "http.response.body" and held is not None:
                start, held = held, None
                if not message.get("more_body") and _is_bentoml_generic_error(message.get("body", b"")):
                    body = json.dumps({"error": self.reason.explain()}).encode()
                    start = {**start, "headers": [(k, str(len(body)).encode() if k.lower() == b"content-length" else v)
                                                  for k, v in start["headers"]]}
                    message = {**message, "body": body}
                await send(start)
            await send(message)

        await self.app(scope, receive, with_retry_after)
        if held is not None:  # the app sent a start and no body: send both, as it meant to
            await send(held)
            await send({"type": "http.response.body", "body": b""})


def _is_bentoml_generic_error(body: bytes) -> bool:
    try:
        return json.loads(body) == {"error": BENTOML_GENERIC_ERROR.decode()}
    except ValueError:
        return False


class OpenAIErrors:
    """ASGI middleware: on /v1/*, error answers (from any layer: the middleware's 401/408/413/429,
    the proxy's 4xx, 502 and 503) take OpenAI's error shape, so the openai client shows our message
    instead of "Error code: 429". Successful answers, streams included, pass through untouched."""

    def __init__(self, app: Any, prefix: str = "/v1/"):
        self.app, self.prefix = app, prefix

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope.get("path", "").startswith(self.prefix):
            return await self.app(scope, receive, send)
        start: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def rewrite(message: dict) -> None:
            if message["type"] == "http.response.start":
                if message["status"] < 400:
                    start["passthrough"] = True
                    return await send(message)
                start.update(message)
                return
            if start.get("passthrough") or message["type"] != "http.response.body":
                return await send(message)
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = b"".join(chunks)
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None
            if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
                body = json.dumps(openai_error(parsed, start["status"])).encode()
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, rewrite)

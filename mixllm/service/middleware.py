"""ASGI middleware of the service: body limits and bearer-token checks, answered before BentoML
parses anything (so a bad request never costs a model call, and never becomes a 500)."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import time
from typing import Any


class BodyLimit:
    """ASGI middleware: 413 above the size limit, 415 for form bodies (BentoML would answer 500),
    408 for a body not received within `read_timeout_s` (a client that sends half a body and stalls
    would otherwise hold its connection and a request slot for as long as it likes)."""

    blocked = {b"multipart/form-data", b"application/x-www-form-urlencoded"}

    def __init__(self, app: Any, max_bytes: int = 1_048_576, read_timeout_s: float = 10.0):
        self.app, self.max_bytes, self.read_timeout_s = app, max_bytes, read_timeout_s

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
        import anyio

        chunks, seen, more = [], 0, True
        deadline = time.monotonic() + self.read_timeout_s
        while more:  # buffer (bounded) so chunked uploads are limited too
            try:
                with anyio.fail_after(max(deadline - time.monotonic(), 0.0)):
                    message = await receive()
            except TimeoutError:
                return await _reject(send, 408, f"the request body did not arrive within {self.read_timeout_s:g} s "
                                                "(service.body_read_timeout_s)")
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.max_bytes:
                return await _reject(send, 413, f"request body is larger than {self.max_bytes} bytes")
            chunks.append(chunk)
            more = message.get("more_body", False)
        await self.app(scope, _replaying(b"".join(chunks), receive), send)


TENANT_HEADER = b"x-mixllm-tenant"  # set by BearerAuth only; a client's own is dropped


class TenantKeys:
    """How BearerAuth looks up tenant API keys: the service sets `lookup` (key -> tenant or None)
    when it starts; `enabled` when params.yaml lists tenants. BearerAuth also remembers which keys
    it has seen valid (as hashes), so ClientRateLimit, which runs first, can tell a client's own key
    from a made-up one without a lookup."""

    max_remembered = 100_000

    def __init__(self) -> None:
        self.enabled = False
        self.lookup: Any = None
        self._seen_valid: dict[str, None] = {}  # hashes of authorization headers, oldest first

    def remember_valid(self, authorization: bytes) -> None:
        digest = _client_digest(authorization)
        self._seen_valid.pop(digest, None)
        self._seen_valid[digest] = None
        if len(self._seen_valid) > self.max_remembered:
            del self._seen_valid[next(iter(self._seen_valid))]

    def seen_valid(self, authorization: bytes) -> bool:
        return _client_digest(authorization) in self._seen_valid


def _client_digest(authorization: bytes) -> str:
    return hashlib.sha256(authorization).hexdigest()[:16]


def _is_admin(authorization: bytes, token_env: str) -> bool:
    """Whether an Authorization header carries the admin token (env `token_env`)."""
    token = os.environ.get(token_env)
    # Constant time: the comparison must not tell an attacker how much of a guess was right.
    return bool(token) and hmac.compare_digest(authorization, f"Bearer {token}".encode("latin-1", "replace"))


class BearerAuth:
    """ASGI middleware: who is calling, and may they.

    The admin token (env `token_env`) guards /admin/* and /feedback (and /route* if asked). With
    tenants configured, a tenant's API key is accepted wherever the admin token is, except /admin;
    the request then carries the tenant's name in x-mixllm-tenant (a client cannot set it), and an
    unknown or revoked key is a 401. The chat proxy always needs a token or a tenant key when it
    calls upstreams with the server's keys (it answers 401 saying so), so no anonymous caller spends
    them. /dashboard also opens with a signed, expiring link (`dashboard_link`), since a browser
    sends no Authorization header."""

    def __init__(self, app: Any, token_env: str = "MIXLLM_API_TOKEN", protect_route: bool = False,
                 protect_proxy: bool = True, tenant_keys: TenantKeys | None = None):
        self.app, self.token_env = app, token_env
        self.protect_route, self.protect_proxy = protect_route, protect_proxy
        self.tenant_keys = tenant_keys or TenantKeys()

    def _protected(self, path: str) -> bool:
        if path.startswith(("/feedback", "/admin", "/budgets", "/stats", "/dashboard")):
            return True
        if path.startswith("/v1/chat"):
            return self.protect_route or self.protect_proxy or self.tenant_keys.enabled
        return self.protect_route and path.startswith("/route")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        token = os.environ.get(self.token_env)
        path = scope.get("path", "")
        headers = [(k, v) for k, v in scope["headers"] if k != TENANT_HEADER]
        header = dict(headers).get(b"authorization", b"").decode("latin-1")
        admin = _is_admin(header.encode("latin-1"), self.token_env)
        tenant = None
        if not admin and self.tenant_keys.enabled and header.startswith("Bearer ") and self.tenant_keys.lookup:
            import anyio

            try:
                tenant = await anyio.to_thread.run_sync(self.tenant_keys.lookup, header[len("Bearer "):])
            except Exception as exc:  # noqa: BLE001 - the key store is down: say so, never a 500
                logging.getLogger("bentoml.mixllm").warning("API key not checked: %s", exc)
                return await _reject(send, 503, "the API key cannot be checked now (the decision log is unreachable); "
                                                "retry shortly", headers={"Retry-After": "1"})
            if tenant is None:
                return await _reject(send, 401, "unknown or revoked API key (header: Authorization: Bearer <key>; "
                                                "`mixllm keys list` shows the active keys)", field="Authorization")
            self.tenant_keys.remember_valid(header.encode("latin-1"))
            headers.append((TENANT_HEADER, tenant.encode("latin-1")))
        scope = {**scope, "headers": headers}
        if self._protected(path) and not admin:
            if tenant is not None and path.startswith("/admin"):
                return await _reject(send, 403, "a tenant's API key does not open /admin; use the admin token",
                                     field="Authorization")
            if tenant is None:
                if not token and not self.tenant_keys.enabled:
                    if self.protect_proxy and path.startswith("/v1/chat"):
                        return await _reject(send, 401, "this proxy calls upstreams with the server's API keys, so it "
                                             f"needs a token: set {self.token_env} for the service and send "
                                             "Authorization: Bearer <token>", field="Authorization")
                    return await self.app(scope, receive, send)  # no token configured: open
                if path == "/dashboard" and token and _signed_link_valid(scope, token):
                    return await self.app(scope, receive, send)  # a browser: `mixllm report --link`
                return await _reject(send, 401, "missing or wrong bearer token (header: Authorization: Bearer "
                                                "<token or API key>; for /dashboard in a browser: "
                                                "`mixllm report --link`)", field="Authorization")
        await self.app(scope, receive, send)


def dashboard_link(base_url: str, token: str, valid_s: float = 3600.0, now: float | None = None) -> str:
    """A /dashboard URL a browser can open without the token: it expires, and its signature (an
    HMAC of the expiry with the admin token) proves who made it, without carrying the token."""
    expires = int((now if now is not None else time.time()) + valid_s)
    signature = hmac.new(token.encode(), f"dashboard:{expires}".encode(), hashlib.sha256).hexdigest()
    return f"{base_url.rstrip('/')}/dashboard?expires={expires}&signature={signature}"


def _signed_link_valid(scope: dict, token: str) -> bool:
    from urllib.parse import parse_qs

    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    expires, signature = (query.get("expires") or [""])[0], (query.get("signature") or [""])[0]
    if not expires.isdigit() or int(expires) < time.time():
        return False
    wanted = hmac.new(token.encode(), f"dashboard:{expires}".encode(), hashlib.sha256).hexdigest()
    return hmac.compare_digest(wanted, signature)


class ClientRateLimit:
    """ASGI middleware: a token bucket per client, so one client cannot crowd out the others or
    steer routing with a flood of decisions. A client is its bearer token (hashed) when the token is
    a valid one (the admin token, or a tenant key BearerAuth has accepted before), else its IP
    address: a made-up token, new on every call, must not buy a fresh bucket on the paths that need
    none. A /route_batch call costs one token per query, other calls one. A client with tokens left
    may spend more than it has (a full batch goes through), and then waits until the bucket is
    positive again. Over the limit: 429 with Retry-After, naming the setting."""

    limited = ("/route", "/feedback", "/v1/chat")

    def __init__(self, app: Any, rate_per_s: float, burst: int, token_env: str = "MIXLLM_API_TOKEN",
                 tenant_keys: TenantKeys | None = None, address_header: str | None = None,
                 clock: Any = time.monotonic):
        self.app, self.rate, self.burst, self.clock = app, float(rate_per_s), float(burst), clock
        self.token_env, self.tenant_keys = token_env, tenant_keys or TenantKeys()
        # Behind a reverse proxy: the header it appends the client's address to (its last entry).
        self.address_header = address_header.lower().encode("latin-1") if address_header else None
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, when last refilled)

    def _client(self, scope: dict) -> str:
        headers = dict(scope["headers"])
        authorization = headers.get(b"authorization", b"")
        if authorization and (_is_admin(authorization, self.token_env) or self.tenant_keys.seen_valid(authorization)):
            return "token:" + _client_digest(authorization)
        forwarded = headers.get(self.address_header, b"").split(b",")[-1].strip() if self.address_header else b""
        if forwarded:
            return "ip:" + forwarded.decode("latin-1")
        return "ip:" + str((scope.get("client") or ("unknown",))[0])

    def _take(self, client: str, cost: float) -> float:
        """0 if the call may go ahead (its cost is taken), else the seconds until it may."""
        now = self.clock()
        tokens, then = self._buckets.get(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        if tokens <= 0:
            self._buckets[client] = (tokens, now)
            return (1.0 - tokens) / self.rate
        self._buckets[client] = (tokens - cost, now)
        if len(self._buckets) > 100_000:  # forget idle clients (a full bucket is what a new client gets)
            self._buckets = {k: v for k, v in self._buckets.items() if v[0] + (now - v[1]) * self.rate < self.burst}
        return 0.0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or self.rate <= 0 or not path.startswith(self.limited):
            return await self.app(scope, receive, send)
        client = self._client(scope)
        cost, body = 1.0, None
        if path.startswith("/route_batch"):  # one token per query: read the (size-limited) body once
            chunks, more = [], True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunks.append(message.get("body", b""))
                more = message.get("more_body", False)
            body = b"".join(chunks)
            try:
                requests = json.loads(body).get("requests")
                cost = float(max(1, len(requests))) if isinstance(requests, list) else 1.0
            except (ValueError, AttributeError):
                cost = 1.0  # the service itself answers the malformed body
        wait_s = self._take(client, cost)
        if wait_s > 0:
            return await _reject(send, 429, f"too many requests from this client: {self.rate:g} queries/s, bursts of "
                                            f"{self.burst:g} (service.client_rate_per_s, service.client_burst); retry "
                                            f"in {wait_s:.1f} s", headers={"Retry-After": str(max(1, math.ceil(wait_s)))})
        await self.app(scope, receive if body is None else _replaying(body, receive), send)


def _replaying(body: bytes, receive: Any) -> Any:
    """An ASGI receive that hands the app the body already read, then defers to the real one."""
    replayed = False

    async def replay() -> dict:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _reject(send: Any, status: int, message: str, field: str | None = None,
                  headers: dict[str, str] | None = None) -> None:
    payload = {"error": message, **({"field": field} if field else {})}
    body = json.dumps(payload).encode()
    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]})
    await send({"type": "http.response.body", "body": body})


class ClientErrorsWithoutTraceback(logging.Filter):
    """BentoML logs every request it answers with a 4xx (a body that fails validation, an
    InvalidArgument) at ERROR with a full traceback: a log that cries wolf for each bad request.
    This filter turns those records into one INFO line naming the path and the error; 5xx and
    every other error keep their traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and _is_client_error(error):
            summary = " ".join(str(error).split())[:300]
            record.msg, record.args = f"{record.getMessage()}: client error, answered 4xx: %s", (summary,)
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info, record.exc_text = None, None
        return True


def _is_client_error(error: BaseException) -> bool:
    from bentoml.exceptions import BentoMLException
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        return True
    return isinstance(error, BentoMLException) and int(getattr(error.error_code, "value", 500)) < 500


def quiet_client_errors(logger_name: str = "bentoml._internal.server.http_app") -> None:
    """Install ClientErrorsWithoutTraceback on the logger BentoML's request errors go to (once)."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, ClientErrorsWithoutTraceback) for f in logger.filters):
        logger.addFilter(ClientErrorsWithoutTraceback())


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


class RetryAfterOnUnavailable:
    """ASGI middleware: every 503 tells the client when to retry. The service's own 503s say so
    already; those raised through BentoML (a busy decision log on /route_batch, the model still
    loading) cannot carry a header, and a client without Retry-After retries at once or gives up."""

    def __init__(self, app: Any, seconds: int = 1):
        self.app, self.header = app, (b"retry-after", str(int(seconds)).encode())

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_retry_after(message: dict) -> None:
            if message["type"] == "http.response.start" and message["status"] == 503:
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"retry-after" for k, _ in headers):
                    message = {**message, "headers": [*headers, self.header]}
            await send(message)

        await self.app(scope, receive, with_retry_after)


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

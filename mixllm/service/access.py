"""Who may call the service, and how often: the admin token and tenants' API keys (BearerAuth),
signed /dashboard links, and a token bucket per client (ClientRateLimit). ASGI middleware, answered
before BentoML parses anything."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import time
from typing import Any

from mixllm.service.middleware import reject, replaying

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

    def forget(self, authorization: bytes) -> None:
        """A key that no longer checks out (revoked): its client shares the made-up keys' bucket again."""
        self._seen_valid.pop(_client_digest(authorization), None)

    def seen_valid(self, authorization: bytes) -> bool:
        return _client_digest(authorization) in self._seen_valid


def reporting_tenant(request: Any) -> str | None:
    """The tenant that sent a request (BearerAuth checked its key), for capping what one tenant's
    reports may weigh (the latency a /feedback reports); None otherwise (see reporting_client)."""
    return request.headers.get(TENANT_HEADER.decode()) or None


def reporting_client(request: Any, token_env: str) -> str | None:
    """Whose latency reports a /feedback carries, for LiveTraffic's per-client cap: a tenant
    ("tenant:<name>"); the admin token's holder, the operator, uncapped (None); or, when no admin
    token is configured and /feedback is open to anyone, the caller's address ("address:<ip>"):
    anonymous reporters were uncapped too, and a few dozen of them pinned an LLM's median.
    The admin token's reports are not capped: capping the operator's own backend would shrink the
    window where it is the only reporter. So a deployment whose backend reports latencies should
    give it the admin token: without one, its reports hold latency_client_share of the window, and
    behind a reverse proxy every caller shares one address, and so one share."""
    tenant = reporting_tenant(request)
    if tenant:
        return f"tenant:{tenant}"
    if os.environ.get(token_env):  # BearerAuth let only the admin token through to /feedback
        return None
    client = getattr(request, "client", None)
    return f"address:{client.host if client is not None else 'unknown'}"


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
                return await reject(send, 503, "the API key cannot be checked now (the decision log is unreachable); "
                                                "retry shortly", headers={"Retry-After": "1"})
            if tenant is None:
                self.tenant_keys.forget(header.encode("latin-1"))
                return await reject(send, 401, "unknown or revoked API key (header: Authorization: Bearer <key>; "
                                                "`mixllm keys list` shows the active keys)", field="Authorization")
            self.tenant_keys.remember_valid(header.encode("latin-1"))
            headers.append((TENANT_HEADER, tenant.encode("latin-1")))
        scope = {**scope, "headers": headers}
        if self._protected(path) and not admin:
            if tenant is not None and path.startswith("/admin"):
                return await reject(send, 403, "a tenant's API key does not open /admin; use the admin token",
                                     field="Authorization")
            if tenant is None:
                if not token and not self.tenant_keys.enabled:
                    if self.protect_proxy and path.startswith("/v1/chat"):
                        return await reject(send, 401, "this proxy calls upstreams with the server's API keys, so it "
                                             f"needs a token: set {self.token_env} for the service and send "
                                             "Authorization: Bearer <token>", field="Authorization")
                    return await self.app(scope, receive, send)  # no token configured: open
                if path == "/dashboard" and token and _signed_link_valid(scope, token):
                    return await self.app(scope, receive, send)  # a browser: `mixllm report --link`
                return await reject(send, 401, "missing or wrong bearer token (header: Authorization: Bearer "
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
                 tenant_keys: TenantKeys | None = None, clock: Any = time.monotonic):
        self.app, self.rate, self.burst, self.clock = app, float(rate_per_s), float(burst), clock
        self.token_env, self.tenant_keys = token_env, tenant_keys or TenantKeys()
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, when last refilled)

    def _client(self, scope: dict) -> str:
        authorization = dict(scope["headers"]).get(b"authorization", b"")
        if authorization and (_is_admin(authorization, self.token_env) or self.tenant_keys.seen_valid(authorization)):
            return "token:" + _client_digest(authorization)
        # Behind a reverse proxy the address is the client's already: uvicorn (under BentoML) takes it
        # from X-Forwarded-For when the proxy's address is in FORWARDED_ALLOW_IPS (default: localhost).
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
            return await reject(send, 429, f"too many requests from this client: {self.rate:g} queries/s, bursts of "
                                            f"{self.burst:g} (service.client_rate_per_s, service.client_burst); retry "
                                            f"in {wait_s:.1f} s", headers={"Retry-After": str(max(1, math.ceil(wait_s)))})
        await self.app(scope, receive if body is None else replaying(body, receive), send)

"""The OpenAI-compatible proxy's work: what it refuses to forward, the upstream call (plain or
streamed) with its accounting (in-flight count, latency, cost, the decision's real cost), and the
error it answers when an upstream fails; and the whole of a chat completion (`_chat`: route or
take the named LLM, the tenant's budget and session, failover). A mixin of the service class, which
owns the endpoints.

Imports: `bentoml serve` imports the service module twice at start (the serving process reads its
settings, then the worker serves), so what only a request needs (pandas, SQLAlchemy: ~0.6 s) is
imported where it is used; by the first request the worker has them loaded anyway."""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from mixllm.core.decision import fallback_ranking
from mixllm.core.errors import StoreBusyError
from mixllm.service.api_models import (
    CONSUMED_CHAT_FIELDS,
    FORWARDED_CHAT_FIELDS,
    FORWARDED_MESSAGE_FIELDS,
    MESSAGE_ROLES,
    ChatRequest,
    RouteRequest,
    conversation_text,
    error,
    last_user_text,
    surrogate_path,
)

logger = logging.getLogger("bentoml.mixllm")  # bentoml serve shows "bentoml.*" loggers


def _redacted(text: str, secrets: list[str]) -> str:
    """Text from an upstream, safe to log: the keys it might echo, and any bearer token, removed."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return re.sub(r"(?i)bearer\s+[^\s\"']+", "Bearer [redacted]", text)


class ChatProxy:
    """Needs from the class it is mixed into: config, load (live traffic), metrics, store,
    sessions (mixllm.io.sessions.SessionLog), attempts (mixllm.io.attempts.AttemptLog), breakers
    (mixllm.service.circuit.CircuitBreakers) and _record_call (mixllm.service.spending.TenantBudgets)."""

    def _chat_refusal(self, request: ChatRequest) -> JSONResponse | None:
        """A 400 naming the field for what the proxy must not forward: text that is not valid
        Unicode, a parameter outside FORWARDED_CHAT_FIELDS, a message key outside FORWARDED_MESSAGE_FIELDS
        or an unknown role, n or max_tokens above the caps."""
        where = surrogate_path(request.model_dump())
        if where:
            return error(400, where.split(".")[0].split("[")[0], f"{where} holds a lone UTF-16 surrogate, which is "
                                                                  "not valid Unicode text")
        for index, message in enumerate(request.messages):
            if message.role not in MESSAGE_ROLES:
                return error(400, "messages", f"messages[{index}].role is {message.role!r}; a message's role is one of "
                                              f"{', '.join(sorted(MESSAGE_ROLES))}")
            unknown_keys = sorted(set(message.model_extra or {}) - FORWARDED_MESSAGE_FIELDS)
            if unknown_keys:
                return error(400, "messages", f"messages[{index}].{unknown_keys[0]} is not a message field this proxy "
                                              f"forwards (it forwards {', '.join(sorted(FORWARDED_MESSAGE_FIELDS))})")
        extra = request.model_extra or {}
        unknown = sorted(set(extra) - FORWARDED_CHAT_FIELDS - CONSUMED_CHAT_FIELDS)
        if unknown:
            return error(400, unknown[0], f"'{unknown[0]}' is not a chat-completion parameter this proxy forwards "
                                          f"(it forwards model, messages, stream, {', '.join(sorted(FORWARDED_CHAT_FIELDS))};"
                                          f" it reads {', '.join(sorted(CONSUMED_CHAT_FIELDS))})")
        metadata, candidates = extra.get("metadata"), extra.get("candidates")
        if metadata is not None and not (isinstance(metadata, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
            return error(400, "metadata", "metadata must be an object of strings (e.g. {\"session_id\": \"abc\"})")
        if candidates is not None and not (isinstance(candidates, list) and candidates
                                           and all(isinstance(c, str) for c in candidates)):
            return error(400, "candidates", "candidates must be a non-empty list of LLM names")
        caps = {"n": self.config.service.proxy_max_n, "max_tokens": self.config.service.proxy_max_tokens,
                "max_completion_tokens": self.config.service.proxy_max_tokens}
        for name, cap in caps.items():
            value = extra.get(name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= cap):
                setting = "proxy_max_n" if name == "n" else "proxy_max_tokens"
                return error(400, name, f"{name} must be an integer from 1 to {cap} (service.{setting}), got {value!r}")
        return None

    def _routed_text(self, request: ChatRequest, last_turn: str) -> str:
        """The conversation window the router reads (session.context_*), within max_query_chars
        (the oldest context is cut first; the last user turn alone is checked by RouteRequest)."""
        settings = self.config.session
        text = conversation_text(request.messages, settings.context_messages, settings.context_chars) or last_turn
        limit = self.config.service.max_query_chars
        return text[-limit:] if len(text) > limit and len(last_turn) <= limit else text

    def _session(self, request: ChatRequest, http_request: Any, tenant: Any) -> tuple[str | None, str | None]:
        """(the session's key, the LLM it is on) from header x-mixllm-session, metadata.session_id
        or the OpenAI `user` field; (None, None) without one, the LLM None when not sticky."""
        extra = request.model_extra or {}
        session_id = (http_request.headers.get("x-mixllm-session") or (extra.get("metadata") or {}).get("session_id")
                      or (extra.get("user") if isinstance(extra.get("user"), str) else None))
        if not session_id:
            return None, None
        from mixllm.io.sessions import session_key  # here: see the module's note on imports

        key = session_key(tenant.name if tenant is not None else None, session_id)
        if not self.config.session.sticky:
            return key, None
        try:
            return key, self.sessions.llm_of(key)
        except StoreBusyError as exc:  # as a lost write does: this turn is routed afresh, not refused
            logger.warning("session %s not read (%s): this turn is routed afresh", key, exc)
            return key, None

    def _remember_session(self, key: str, llm: str) -> None:
        try:
            self.sessions.remember(key, llm)
        except Exception as exc:  # noqa: BLE001 - the answer is already on its way; only stickiness is lost
            logger.warning("session %s not remembered (%s): its next turn is routed afresh", key, exc)

    async def _forward(self, request: ChatRequest, ranking: list[str], upstreams: dict[str, Any],
                       decision_id: str | None, version: int, tenant: Any = None,
                       predicted_cost: dict[str, float] | None = None, router_ms: float | None = None) -> Any:
        """Call the first LLM of `ranking`, and on a connection error, a timeout, a 429 or a 5xx
        before the first byte, the next one (service.failover: at most max_attempts calls within
        deadline_s, skipping LLMs whose circuit breaker is open). The answer names the LLM that
        answered (x-mixllm-llm) and the calls made (x-mixllm-attempts). A tenant's answered call is
        recorded as its spend: priced from the upstream's usage, else the predicted cost."""
        settings = self.config.service.failover
        deadline = time.monotonic() + settings.deadline_s
        tried: list[str] = []
        last: Any = None
        for llm in ranking:
            if len(tried) >= settings.max_attempts or time.monotonic() >= deadline:
                break
            if not self.breakers.begin(llm):
                continue
            tried.append(llm)
            response, retryable = await self._attempt(request, llm, upstreams[llm], decision_id, version,
                                                      timeout_s=min(upstreams[llm].timeout_s, deadline - time.monotonic()),
                                                      attempt=len(tried), tenant=tenant,
                                                      predicted_cost=(predicted_cost or {}).get(llm), router_ms=router_ms)
            if not retryable:
                response.headers["x-mixllm-attempts"] = str(len(tried))
                return response
            last = response
            if len(tried) < settings.max_attempts and llm != ranking[-1]:
                logger.warning("failing over from %s (attempt %d of %d)", llm, len(tried), settings.max_attempts)
        if last is None:
            open_llms = ", ".join(self.breakers.open_llms()) or ", ".join(ranking)
            return error(503, None, f"no upstream to call: the circuit breakers of {open_llms} are open after "
                                    f"repeated failures; retry in {settings.breaker_cooldown_s:g} s",
                         {"Retry-After": str(int(settings.breaker_cooldown_s))})
        last.headers["x-mixllm-attempts"] = str(len(tried))
        return last

    async def _attempt(self, request: ChatRequest, llm: str, upstream: Any, decision_id: str | None,
                       version: int, timeout_s: float, attempt: int, tenant: Any = None,
                       predicted_cost: float | None = None, router_ms: float | None = None) -> tuple[Any, bool]:
        """One upstream call: (the response for the caller, whether another LLM may be tried)."""
        import httpx

        payload = request.model_dump(exclude_none=True, exclude=set(CONSUMED_CHAT_FIELDS))
        payload["model"] = upstream.model or llm
        if request.stream:
            payload.setdefault("stream_options", {"include_usage": True})
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(upstream.api_key_env) if upstream.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"

        def upstream_failed(status: int, detail: str, what: str = "") -> tuple[JSONResponse, bool]:
            # The caller gets no upstream text (it may echo the key); the log gets it, redacted.
            logger.warning("upstream for %s answered %d%s (attempt %d, decision %s): %s", llm, status, what, attempt,
                           decision_id, _redacted(detail[:500], [key or ""]))
            retryable = status == 429 or status >= 500 or status < 400  # < 400: a 2xx that is no answer
            return error(502, None, f"upstream for {llm} answered {status}{what}; the service log has the details",
                         {"x-mixllm-llm": llm}), retryable
        url = upstream.base_url.rstrip("/") + "/chat/completions"
        call_id = f"{decision_id or uuid.uuid4().hex}:{attempt}"
        # The proxy reports completion itself, so the call counts until then (or the upstream timeout).
        self.load.start(call_id, llm, expires_after_s=upstream.timeout_s)
        self.metrics.in_flight.labels(llm=llm).inc()
        mixllm_headers = {"x-mixllm-llm": llm, "x-mixllm-model-version": str(version),
                          **({"x-mixllm-decision-id": decision_id} if decision_id else {})}
        started = time.perf_counter()
        client = httpx.AsyncClient(timeout=max(timeout_s, 0.001))
        finished = False

        async def finish(status: str, usage: dict | None, status_code: int | None = None) -> None:
            """Account for the call: counts and breaker now; its spend and the decision's real cost
            in a worker thread (database writes must not stall the event loop every request shares),
            shielded so a client that hangs up mid-stream still has its call paid for."""
            nonlocal finished
            if finished:
                return
            finished = True
            latency = time.perf_counter() - started
            self.metrics.in_flight.labels(llm=llm).dec()
            self.metrics.proxied.labels(llm=llm, status=status).inc()
            self.attempts.submit(decision_id=decision_id, attempt=attempt, llm=llm, outcome=status,
                                 status_code=status_code, latency_s=latency)  # written by a background thread
            self.breakers.record(llm, ok=status == "ok")
            # A failed call's time says nothing about the LLM's speed (a dead upstream fails fast).
            self.load.finish(call_id, latency if status == "ok" else None)
            if status not in ("ok", "dropped"):  # refused or failed: nothing to pay for
                return
            tokens_in = (usage or {}).get("prompt_tokens")
            tokens_out = (usage or {}).get("completion_tokens")
            cost = self._price(llm, tokens_in, tokens_out)
            # Without usage: the router's prediction, else the prompt's length at the catalogue's prices.
            estimate = predicted_cost if predicted_cost is not None else self._estimated_cost(llm, request)
            from mixllm.evaluation.savings import reference_llm  # here: see the module's note on imports

            reference = reference_llm(self.config)
            reference_cost = (self._price(reference, tokens_in, tokens_out) if cost is not None
                              else self._estimated_cost(reference, request))

            def record() -> None:
                # A dropped stream was paid for too, up to where it broke.
                self._record_call(tenant, llm, cost if cost is not None else estimate, cost is None,
                                  decision_id=decision_id, model_version=version if decision_id else None,
                                  reference_cost_usd=reference_cost,
                                  router_ms=router_ms, attempts=attempt)
                if decision_id and status == "ok":
                    try:
                        self.store.complete_decision(decision_id, cost_usd=cost, latency_s=latency,
                                                     input_tokens=tokens_in, output_tokens=tokens_out, llm=llm)
                    except Exception as exc:  # noqa: BLE001 - the answer is paid for and on its way: do not fail it
                        logger.warning("decision %s: the call's cost, latency and LLM (%s) not recorded: %s",
                                       decision_id, llm, exc)

            import anyio

            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(record)

        try:
            if not request.stream:
                response = await client.post(url, json=payload, headers=headers)
                await client.aclose()
                if response.status_code >= 400:
                    await finish("upstream_error", None, response.status_code)
                    return upstream_failed(response.status_code, response.text)
                try:
                    body = response.json()
                    if not isinstance(body, dict):
                        raise ValueError("not a JSON object")
                except ValueError:
                    await finish("upstream_error", None, response.status_code)
                    return upstream_failed(response.status_code, response.text, " without a JSON object")
                usage = body.get("usage") if isinstance(body.get("usage"), dict) else None
                await finish("ok", usage, response.status_code)
                body["model"] = llm
                body["mixllm"] = {"llm": llm, "decision_id": decision_id, "model_version": version,
                                  "attempts": attempt}
                return JSONResponse(body, headers=mixllm_headers), False
            upstream_request = client.build_request("POST", url, json=payload, headers=headers)
            response = await client.send(upstream_request, stream=True)
            if response.status_code >= 400:
                text = (await response.aread()).decode(errors="replace")
                await response.aclose()
                await client.aclose()
                await finish("upstream_error", None, response.status_code)
                return upstream_failed(response.status_code, text)
        except httpx.HTTPError as exc:
            await client.aclose()
            await finish("unreachable", None)
            logger.warning("upstream for %s is unreachable (%s, attempt %d, decision %s)", llm, type(exc).__name__,
                           attempt, decision_id)
            return error(502, None, f"upstream for {llm} is unreachable ({type(exc).__name__})",
                         {"x-mixllm-llm": llm}), True

        async def relay() -> Any:
            usage, complete = None, False
            try:
                async for line in response.aiter_lines():
                    complete = complete or line.strip() == "data: [DONE]"
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
                if not complete:  # the connection ended cleanly, but the answer did not ([DONE] never came)
                    raise httpx.RemoteProtocolError("the stream ended without data: [DONE]")
            except httpx.HTTPError as exc:
                # After the first byte there is no failing over; the client must not take a cut
                # answer for a whole one, so the stream ends with an error event.
                await finish("dropped", None, response.status_code)
                logger.warning("upstream for %s dropped the stream (%s, decision %s)", llm, type(exc).__name__,
                               decision_id)
                yield "data: " + json.dumps({"error": {"message": f"upstream for {llm} dropped the stream "
                                                                  "before it was complete", "type": "upstream_error",
                                                       "code": "upstream_dropped"}}) + "\n\n"
            finally:
                await response.aclose()
                await client.aclose()
                await finish("ok", usage, response.status_code)

        return StreamingResponse(relay(), media_type="text/event-stream", headers=mixllm_headers), False

    async def _chat(self, request: ChatRequest, http_request: Any) -> Any:
        """POST /v1/chat/completions (the service's endpoint documents it): route or take the named
        LLM, apply the tenant's budget and session, forward with failover along the router's ranking."""
        import anyio

        model = self._current()
        upstreams = {llm.name: llm.upstream for llm in self.config.llms if llm.upstream is not None}
        refusal = self._chat_refusal(request)
        if refusal is not None:
            return refusal
        text = last_user_text(request.messages)
        if not text:
            return error(400, "messages", "no user message with text to route")
        circuit_open: list[str] = []  # LLMs routing left out because their breaker is open
        decision_id, routed = None, request.model == "mixllm" or request.model.startswith("mixllm:")
        if routed:
            lambda_ = None
            if ":" in request.model:
                try:
                    lambda_ = float(request.model.split(":", 1)[1])
                except ValueError:
                    return error(400, "model", f"'{request.model}': after 'mixllm:' comes lambda, a number >= 0")
            reachable = [m for m in model.router.enabled_llms_ if m in upstreams]
            if not reachable:
                return error(503, None, "no LLM in the catalogue has an upstream (llms[].upstream in params.yaml)")
            wanted = (request.model_extra or {}).get("candidates")
            if wanted is not None:
                unknown = [m for m in wanted if m not in reachable]
                if unknown:
                    return error(400, "candidates", f"unknown, disabled or unreachable LLM(s) in candidates: "
                                                    f"{', '.join(unknown)}; choose from {', '.join(reachable)}")
                reachable = [m for m in reachable if m in wanted]
            # An LLM whose circuit breaker is open is no candidate (unless every one is).
            candidates = [m for m in reachable if self.breakers.available(m)] or reachable
            circuit_open = [m for m in reachable if m not in candidates]
            tenant = self._tenant(http_request)
            # Both read the database: in a worker thread, not on the event loop every request shares.
            plan = await anyio.to_thread.run_sync(self._spend_plan, tenant, candidates, lambda_,
                                                  model.router.default_lambda)
            if isinstance(plan, JSONResponse):
                return plan
            candidates, lambda_ = plan.candidates, plan.lambda_
            session, sticky_llm = await anyio.to_thread.run_sync(self._session, request, http_request, tenant)
            try:
                item = RouteRequest(query=self._routed_text(request, text), lambda_=lambda_, candidates=candidates)
            except ValidationError as exc:
                problem = exc.errors()[0]
                field = "model" if problem["loc"] and problem["loc"][0] in ("lambda", "lambda_") else "messages"
                return error(400, field, f"{field}: {problem['msg']}")
            started = time.perf_counter()
            routed_result = await anyio.to_thread.run_sync(self._route_coalescer, item)
            router_ms = 1000 * (time.perf_counter() - started)
            if isinstance(routed_result, JSONResponse):
                return routed_result
            chosen, decision_id = routed_result.llm, routed_result.decision_id
            # Failover follows the router's own ranking: the next best eligible candidates by score.
            ranking = fallback_ranking(chosen, routed_result.candidates, candidates)
            if sticky_llm in candidates:  # the conversation stays where it is while that LLM works
                ranking = [sticky_llm, *(m for m in ranking if m != sticky_llm)]
            predicted_cost = {c.llm: c.cost_usd for c in routed_result.candidates}
        else:
            chosen = request.model
            limit = self.config.service.max_query_chars
            if len(text) > limit:  # the same cap as a routed chat's: the upstream is paid with the server's key
                return error(400, "messages", f"the last user message has {len(text)} characters; the limit is "
                                              f"{limit} (service.max_query_chars)")
            if chosen not in upstreams:
                return error(404, "model", f"unknown model '{chosen}'; use mixllm, mixllm:<lambda> or one of "
                                           f"{', '.join(sorted(upstreams))}")
            tenant = self._tenant(http_request)
            if tenant is not None and tenant.allowed_llms is not None and chosen not in tenant.allowed_llms:
                return error(403, "model", f"tenant '{tenant.name}' may not use '{chosen}'; its allowed_llms: "
                                           f"{', '.join(tenant.allowed_llms)}")
            plan = await anyio.to_thread.run_sync(self._spend_plan, tenant, sorted(upstreams), None,
                                                  model.router.default_lambda)
            if isinstance(plan, JSONResponse):
                return plan
            if chosen not in plan.candidates:  # its budget is spent: only the cheapest LLM now
                return error(429, "model", f"{plan.notes[0]}; name that LLM ({plan.candidates[0]}) or use mixllm")
            ranking = [chosen]  # the caller named this LLM: no other answers in its place
            session, predicted_cost, router_ms = None, {}, None
        response = await self._forward(request, ranking, upstreams, decision_id, model.version,
                                       tenant=plan.tenant, predicted_cost=predicted_cost, router_ms=router_ms)
        if plan.notes:  # why this tenant's chat went where it did (pacing, a spent budget)
            response.headers["x-mixllm-budget"] = plan.notes[0]
        if circuit_open:  # the decision was made without them: the caller and the log say so
            response.headers["x-mixllm-circuit-open"] = ",".join(circuit_open)
            logger.info("decision %s routed without %s (circuit open)", decision_id, ", ".join(circuit_open))
        if session is not None and response.status_code == 200:
            await anyio.to_thread.run_sync(self._remember_session, session, response.headers["x-mixllm-llm"])
            response.headers["x-mixllm-session"] = "kept" if sticky_llm == response.headers["x-mixllm-llm"] else "routed"
        return response

    def _estimated_cost(self, llm: str, request: ChatRequest) -> float | None:
        """A call's cost without usage: its messages' characters as input tokens, the default output."""
        from mixllm.core.units import DEFAULT_OUTPUT_TOKENS, tokens_from_chars

        chars = sum(len(str(message.content or "")) for message in request.messages)
        return self._price(llm, tokens_from_chars(chars), DEFAULT_OUTPUT_TOKENS)

    def _price(self, llm: str, tokens_in: float | None, tokens_out: float | None) -> float | None:
        if tokens_in is None and tokens_out is None:
            return None
        entry = next((c for c in self.config.llms if c.name == llm), None)
        if entry is None:
            return None
        from mixllm.core.units import call_cost_usd

        return float(call_cost_usd(tokens_in or 0, tokens_out or 0, entry.input_usd_per_1k, entry.output_usd_per_1k))

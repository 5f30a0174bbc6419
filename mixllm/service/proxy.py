"""The OpenAI-compatible proxy's decisions: what it refuses to forward, the conversation the router
reads, the session's sticky LLM, and the whole of a chat completion (`_chat`: route or take the named
LLM, apply the tenant's budget and session, then call along the ranking with failover, which
UpstreamCalls in mixllm.service.upstream_calls does). A mixin of the service class, which owns the
endpoints.

Imports: `bentoml serve` imports the service module twice at start (the serving process reads its
settings, then the worker serves), so what only a request needs (pandas, SQLAlchemy: ~0.6 s) is
imported where it is used; by the first request the worker has them loaded anyway."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from fastapi.responses import JSONResponse
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
from mixllm.service.upstream_calls import UpstreamCalls

logger = logging.getLogger("bentoml.mixllm")  # bentoml serve shows "bentoml.*" loggers


class ChatProxy(UpstreamCalls):
    """Needs from the class it is mixed into what UpstreamCalls needs, and sessions
    (mixllm.io.sessions.SessionLog), _tenant and _spend_plan (mixllm.service.spending.TenantBudgets)
    and _route_coalescer (the service's batching of /route calls, mixllm.service.app)."""

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
        # The whole chat goes upstream, paid with the server's key: its size is capped too, as JSON
        # (messages with their tool calls, tools, every forwarded parameter); max_query_chars caps
        # the last user turn, which is what is routed.
        chat_chars = len(json.dumps(request.forwarded(), ensure_ascii=False))
        if chat_chars > self.config.service.proxy_max_chat_chars:
            return error(400, "messages", f"the chat is {chat_chars} characters as forwarded (its messages, tools and "
                                          f"parameters, as JSON); the limit is "
                                          f"{self.config.service.proxy_max_chat_chars} (service.proxy_max_chat_chars)")
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
                if circuit_open:  # the decision's log says it was made without them
                    item._service_notes.append(f"left out, circuit breaker open: {', '.join(circuit_open)}")
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

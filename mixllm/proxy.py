"""The OpenAI-compatible proxy's work: what it refuses to forward, the upstream call (plain or
streamed) with its accounting (in-flight count, latency, cost, the decision's real cost), and the
error it answers when an upstream fails. A mixin of the service class, which owns the endpoints."""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse

from mixllm.api_models import FORWARDED_CHAT_FIELDS, ChatRequest, error, surrogate_path

logger = logging.getLogger("bentoml.mixllm")  # bentoml serve shows "bentoml.*" loggers


def _redacted(text: str, secrets: list[str]) -> str:
    """Text from an upstream, safe to log: the keys it might echo, and any bearer token, removed."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return re.sub(r"(?i)bearer\s+[^\s\"']+", "Bearer [redacted]", text)


class ChatProxy:
    """Needs from the class it is mixed into: config, load (live traffic), metrics and store."""

    def _chat_refusal(self, request: ChatRequest) -> JSONResponse | None:
        """A 400 naming the field for what the proxy must not forward: text that is not valid
        Unicode, a parameter outside FORWARDED_CHAT_FIELDS, n or max_tokens above the caps."""
        where = surrogate_path(request.model_dump())
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

"""The proxy's upstream calls: failover along a ranking (`_forward`), one call plain or streamed
(`_attempt`) with its accounting (in-flight count, latency, the circuit breaker, the attempt's
record, the tenant's spend, the decision's real cost) and the error answered when an upstream
fails; and a call's price from its usage or estimated from the prompt. A mixin of the service
class, under ChatProxy (mixllm.service.proxy), which decides what to call.

Imports: as in mixllm.service.proxy, what only a request needs is imported where it is used."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
import uuid
import weakref
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse

from mixllm.service.api_models import ChatRequest, error

logger = logging.getLogger("bentoml.mixllm")  # bentoml serve shows "bentoml.*" loggers


# Upstream statuses that refuse the request itself (a forwarded field outside what that upstream
# accepts): never held against the upstream's circuit breaker (one tenant's bad parameter must not
# open an LLM for every tenant). A routed chat fails over (another upstream may accept it, and one
# that refuses everything, e.g. a model name it does not know, is then routed around); when none
# accepts it, or the caller named the LLM, the caller gets that status, naming the field.
REQUEST_FAULTS = (400, 413, 422)


def _refused_field(detail: str) -> str | None:
    """The field an upstream's 4xx names (OpenAI's error.param), if it is a plain field name."""
    try:
        param = json.loads(detail).get("error", {}).get("param")
    except (ValueError, AttributeError):
        return None
    return param if isinstance(param, str) and re.fullmatch(r"[A-Za-z_][\w.\[\]]{0,63}", param) else None


def _redacted(text: str, secrets: list[str]) -> str:
    """Text from an upstream, safe to log: the keys it might echo, and any bearer token, removed."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return re.sub(r"(?i)bearer\s+[^\s\"']+", "Bearer [redacted]", text)


_CLOSING: set[asyncio.Future] = set()  # unread streams' upstreams being closed


def _on_loop(loop: asyncio.AbstractEventLoop, callback: Any) -> None:
    """Run `callback` on `loop` (from a finalizer, any thread); nothing if the loop is closed."""
    try:
        loop.call_soon_threadsafe(callback)
    except RuntimeError:  # the loop is gone (shutdown): nothing left to account to
        pass


def _failure(status: int) -> str:
    """A failed call's outcome, as recorded: the request's fault, or the upstream's."""
    return "refused_request" if status in REQUEST_FAULTS else "upstream_error"


class UpstreamCalls:
    """Needs from the class it is mixed into: config, load (live traffic), metrics, store,
    attempts (mixllm.io.attempts.AttemptLog), breakers (mixllm.service.circuit.CircuitBreakers)
    and _record_call (mixllm.service.spending.TenantBudgets)."""

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
            claim = self.breakers.begin(llm)
            if claim is None:
                continue
            tried.append(llm)
            response, retryable = await self._attempt(request, llm, upstreams[llm], decision_id, version,
                                                      timeout_s=min(upstreams[llm].timeout_s, deadline - time.monotonic()),
                                                      attempt=len(tried), tenant=tenant,
                                                      predicted_cost=(predicted_cost or {}).get(llm), router_ms=router_ms,
                                                      claim=claim)
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
                       predicted_cost: float | None = None, router_ms: float | None = None,
                       claim: str | None = "call") -> tuple[Any, bool]:
        """One upstream call: (the response for the caller, whether another LLM may be tried).

        `timeout_s` bounds the whole call up to its answer (streamed: its first chunk); httpx's own
        timeout bounds each read and write, so a trickling upstream could otherwise outlast it."""
        import anyio
        import httpx

        payload = request.forwarded()
        payload["model"] = upstream.model or llm
        if request.stream:
            payload.setdefault("stream_options", {"include_usage": True})
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(upstream.api_key_env) if upstream.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"

        def upstream_failed(status: int, detail: str, what: str = "") -> tuple[JSONResponse, bool]:
            # The caller gets no upstream text (it may echo the key); the log gets it, redacted (before it
            # is cut: a key across the cut would otherwise be logged in part).
            logger.warning("upstream for %s answered %d%s (attempt %d, decision %s): %s", llm, status, what, attempt,
                           decision_id, _redacted(detail, [key or ""])[:500])
            if status in REQUEST_FAULTS:
                field = _refused_field(detail)
                return error(status, field, f"upstream for {llm} refused the request ({status}): "
                             f"{'the field ' + field if field else 'a forwarded field'} is outside what it accepts; "
                             "the service log has its answer", {"x-mixllm-llm": llm}), True
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

        def settle(status: str, status_code: int | None = None) -> float | None:
            """The call's counts, attempt record, breaker outcome and live load, once: its latency,
            or None when it was settled already."""
            nonlocal finished
            if finished:
                return None
            finished = True
            latency = time.perf_counter() - started
            self.metrics.in_flight.labels(llm=llm).dec()
            self.metrics.proxied.labels(llm=llm, status=status).inc()
            self.attempts.submit(decision_id=decision_id, attempt=attempt, llm=llm, outcome=status,
                                 status_code=status_code, latency_s=latency)  # written by a background thread
            if status in ("refused_request", "cancelled"):  # no verdict on the upstream itself
                self.breakers.release(llm, claim)
            else:
                self.breakers.record(llm, ok=status == "ok")
            # A failed call's time says nothing about the LLM's speed (a dead upstream fails fast).
            self.load.finish(call_id, latency if status == "ok" else None)
            return latency

        async def finish(status: str, usage: dict | None, status_code: int | None = None) -> None:
            """Account for the call: counts and breaker now (settle); its spend and the decision's
            real cost in a worker thread (database writes must not stall the event loop every request
            shares), shielded so a client that hangs up mid-stream still has its call paid for."""
            latency = settle(status, status_code)
            if latency is None or status not in ("ok", "dropped"):  # settled, or refused or failed: nothing to pay for
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

            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(record)

        try:
            if not request.stream:
                with anyio.move_on_after(timeout_s) as limit:
                    response = await client.post(url, json=payload, headers=headers)
                if limit.cancelled_caught:
                    raise httpx.TimeoutException(f"no answer within {timeout_s:.3g} s")
                await client.aclose()
                if response.status_code >= 400:
                    await finish(_failure(response.status_code), None, response.status_code)
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
            # The stream is read up to its first data line before the caller gets anything: until
            # then nothing has reached the caller, so a stream that breaks or ends first fails over.
            opening: list[str] = []
            ended = False
            with anyio.move_on_after(timeout_s) as limit:
                response = await client.send(upstream_request, stream=True)
                if response.status_code >= 400:
                    text = (await response.aread()).decode(errors="replace")
                else:
                    lines = response.aiter_lines()
                    while not ended and not any(line.startswith("data:") for line in opening):
                        try:
                            opening.append(await lines.__anext__())
                        except StopAsyncIteration:
                            ended = True
            if limit.cancelled_caught:
                raise httpx.TimeoutException(f"no first chunk within {timeout_s:.3g} s")
            if response.status_code >= 400 or ended:
                await response.aclose()
                await client.aclose()
                if ended:
                    await finish("upstream_error", None, response.status_code)
                    return upstream_failed(response.status_code, "\n".join(opening), " but sent no data")
                await finish(_failure(response.status_code), None, response.status_code)
                return upstream_failed(response.status_code, text)
        except httpx.HTTPError as exc:
            await client.aclose()
            await finish("unreachable", None)
            logger.warning("upstream for %s is unreachable (%s, attempt %d, decision %s)", llm, type(exc).__name__,
                           attempt, decision_id)
            return error(502, None, f"upstream for {llm} is unreachable ({type(exc).__name__})",
                         {"x-mixllm-llm": llm}), True
        except BaseException:
            # Cancelled (the server's request timeout, the caller gone): the call still ends here, so
            # it leaves the in-flight count, its attempt is recorded, and a probe frees its breaker.
            await finish("cancelled", None)
            with anyio.CancelScope(shield=True):
                await client.aclose()
            raise

        def abandon() -> None:
            if settle("cancelled") is not None:
                logger.info("the stream from %s was never read (decision %s): closed", llm, decision_id)

                async def close() -> None:
                    await response.aclose()
                    await client.aclose()

                task = asyncio.ensure_future(close())
                _CLOSING.add(task)  # the loop keeps only a weak reference to a task
                task.add_done_callback(_CLOSING.discard)

        async def every_line() -> Any:
            for line in opening:
                yield line
            async for line in lines:
                yield line

        async def relay() -> Any:
            usage, complete = None, False
            try:
                async for line in every_line():
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

        streamed = StreamingResponse(relay(), media_type="text/event-stream", headers=mixllm_headers)
        # A stream whose body never runs (the caller left before it started, or the proxy failed
        # after this returned) never reaches relay's accounting: it is settled as cancelled, and
        # the upstream closed, when the response is dropped. On the event loop, not in the
        # finalizer itself: a garbage collection can run while this thread holds a breaker's lock.
        weakref.finalize(streamed, _on_loop, asyncio.get_running_loop(), abandon)
        return streamed, False

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

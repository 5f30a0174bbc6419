"""The proxy's upstream calls in process (mixllm.service.upstream_calls), against a local stub
upstream: what the service's HTTP tests cannot set up cheaply (a port with nothing listening, a
cancelled call, a short deadline, an answer without usage)."""

from __future__ import annotations

from types import SimpleNamespace

import anyio

from mixllm.config import config_from_dict
from mixllm.cli.processes import free_port
from mixllm.service.api_models import ChatRequest
from mixllm.service.circuit import CircuitBreakers
from mixllm.service.upstream_calls import UpstreamCalls
from stubs import UpstreamStub

PRICES = {"a": 0.01, "b": 0.001, "c": 0.0002}
REQUEST = ChatRequest(model="mixllm", messages=[{"role": "user", "content": "hello there"}])


class _Gauge:
    """A Prometheus metric's labels(...).inc()/dec(), counted."""

    def __init__(self) -> None:
        self.value = 0

    def labels(self, **_):
        return self

    def inc(self) -> None:
        self.value += 1

    def dec(self) -> None:
        self.value -= 1


def proxy(breakers: CircuitBreakers | None = None, **failover) -> UpstreamCalls:
    """The proxy's call logic with its collaborators recorded: attempts, spend records, live load."""
    host = UpstreamCalls()
    host.config = config_from_dict({
        "llms": [{"name": name, "input_usd_per_1k": price, "output_usd_per_1k": price} for name, price in PRICES.items()],
        "service": {"failover": failover}})
    host.breakers = breakers or CircuitBreakers()
    host.metrics = SimpleNamespace(in_flight=_Gauge(), proxied=_Gauge())
    host.outcomes, host.finished, host.spend = [], [], []
    host.attempts = SimpleNamespace(submit=lambda **call: host.outcomes.append((call["llm"], call["outcome"])))
    host.load = SimpleNamespace(start=lambda *args, **kwargs: None,
                                finish=lambda call_id, latency: host.finished.append((call_id, latency)))
    host._record_call = lambda tenant, llm, cost, estimated, **details: host.spend.append((llm, cost, estimated))
    host.store = SimpleNamespace(complete_decision=lambda *args, **kwargs: None)
    return host


def upstreams(base_url: str, timeout_s: float = 10.0, **elsewhere: str) -> dict[str, SimpleNamespace]:
    return {name: SimpleNamespace(base_url=elsewhere.get(name, base_url), model=f"upstream-{name}", api_key_env=None,
                                  timeout_s=timeout_s) for name in PRICES}


def test_an_upstream_with_nothing_listening_fails_over_to_the_next_llm():
    with UpstreamStub() as stub:
        host = proxy()
        nowhere = f"http://127.0.0.1:{free_port()}/v1"  # a port with nothing listening: connection refused
        response = anyio.run(lambda: host._forward(REQUEST, ["a", "b"], upstreams(stub.base_url, a=nowhere), "d1", 1))
    assert response.status_code == 200 and response.headers["x-mixllm-llm"] == "b"
    assert response.headers["x-mixllm-attempts"] == "2"
    assert host.outcomes == [("a", "unreachable"), ("b", "ok")]
    assert [llm for llm, _, _ in host.spend] == ["b"], "only the LLM that answered is paid"


def test_the_failover_deadline_stops_further_attempts():
    """All three upstreams hang; the deadline (0.5 s) ends the first attempt and allows no other."""
    with UpstreamStub(slow_s=2) as stub:
        stub.behaviour.update({f"upstream-{name}": "slow" for name in PRICES})
        host = proxy(deadline_s=0.5, max_attempts=3)
        response = anyio.run(lambda: host._forward(REQUEST, ["a", "b", "c"], upstreams(stub.base_url), "d1", 1))
        called = len(stub.requests)
    assert response.status_code == 502 and response.headers["x-mixllm-attempts"] == "1"
    assert called <= 1 and host.outcomes == [("a", "unreachable")], "no second attempt"
    assert host.metrics.in_flight.value == 0


def test_an_answer_without_usage_is_paid_at_the_routers_predicted_cost_and_marked_estimated():
    with UpstreamStub() as stub:
        stub.behaviour["upstream-b"] = "no-usage"
        host = proxy()
        response = anyio.run(lambda: host._forward(REQUEST, ["b"], upstreams(stub.base_url), "d1", 1,
                                                   predicted_cost={"b": 0.0123}))
        plain = anyio.run(lambda: host._forward(REQUEST, ["c"], upstreams(stub.base_url), "d2", 1))
    assert response.status_code == 200 and plain.status_code == 200
    assert host.spend[0] == ("b", 0.0123, True), "no usage: the prediction, marked as an estimate"
    assert host.spend[1][0] == "c" and host.spend[1][2] is False, "with usage: priced from it"
    assert host.spend[1][1] == (12 + 5) * PRICES["c"] / 1000


def test_a_call_cancelled_mid_flight_is_accounted_for_and_frees_its_breakers_probe():
    """The server's request timeout (or a caller leaving) cancels an upstream call under way. The
    call must still leave the in-flight count and the attempt log must say what happened; if it was
    a half-open breaker's probe, the probe slot must be free again, or that LLM stays shut out until
    a restart."""
    now = [0.0]
    breakers = CircuitBreakers(failures=1, window_s=10, cooldown_s=30, clock=lambda: now[0])
    breakers.record("a", ok=False)
    now[0] = 31
    claim = breakers.begin("a")
    assert breakers.state("a") == "half_open" and claim == "probe", "this call is the probe"
    host = proxy(breakers)
    with UpstreamStub(slow_s=2) as stub:
        stub.behaviour["upstream-a"] = "slow"

        async def cut_off() -> bool:
            with anyio.move_on_after(0.5) as scope:
                await host._attempt(REQUEST, "a", upstreams(stub.base_url)["a"], "d1", 1, timeout_s=10, attempt=1,
                                    claim=claim)
            return scope.cancelled_caught

        assert anyio.run(cut_off), "the call was still under way when it was cancelled"
    assert host.metrics.in_flight.value == 0 and host.finished == [("d1:1", None)]
    assert host.outcomes == [("a", "cancelled")]
    assert breakers.available("a") and breakers.state("a") == "half_open", "no verdict: the next call probes"


async def _read(response) -> str:
    return "".join([chunk if isinstance(chunk, str) else chunk.decode() async for chunk in response.body_iterator])


STREAMED = ChatRequest(model="mixllm", messages=[{"role": "user", "content": "hello there"}], stream=True)


def test_a_stream_that_sends_no_chunk_in_time_or_ends_empty_fails_over():
    """Before its first chunk nothing has reached the caller: an upstream that only sends keep-alive
    comments past the attempt's time (each read well within httpx's own read timeout), or whose
    stream ends with no data, is failed over like one that refuses."""
    with UpstreamStub(slow_s=3) as stub:
        stub.behaviour.update({"upstream-a": "keepalive", "upstream-b": "empty"})
        host = proxy()

        async def chat() -> tuple[object, str]:
            calls = upstreams(stub.base_url)  # b and c get 10 s: a busy moment must not fail them too
            calls["a"].timeout_s = 1.0  # a's keep-alive comments run 3 s: past its attempt time
            response = await host._forward(STREAMED, ["a", "b", "c"], calls, "d1", 1)
            return response, await _read(response)

        response, body = anyio.run(chat)
    assert response.status_code == 200 and response.headers["x-mixllm-llm"] == "c", body
    assert response.headers["x-mixllm-attempts"] == "3"
    assert '"model": "c"' in body and "data: [DONE]" in body
    assert host.outcomes == [("a", "unreachable"), ("b", "upstream_error"), ("c", "ok")]


def test_a_stream_whose_body_is_never_read_is_settled_when_dropped():
    """The caller left before the body started (or the proxy failed after choosing): relay's own
    accounting never runs, so dropping the response settles the call as cancelled and frees a probe."""
    import gc

    now = [0.0]
    breakers = CircuitBreakers(failures=1, window_s=10, cooldown_s=30, clock=lambda: now[0])
    breakers.record("a", ok=False)
    now[0] = 31
    claim = breakers.begin("a")
    host = proxy(breakers)
    with UpstreamStub() as stub:

        async def never_read() -> None:
            response, retryable = await host._attempt(STREAMED, "a", upstreams(stub.base_url)["a"], "d1", 1,
                                                      timeout_s=10, attempt=1, claim=claim)
            assert response.status_code == 200 and not retryable and host.metrics.in_flight.value == 1
            del response
            gc.collect()
            await anyio.sleep(0.1)  # the settling runs on the event loop

        anyio.run(never_read)
    assert host.metrics.in_flight.value == 0 and host.outcomes == [("a", "cancelled")]
    assert breakers.begin("a") == "probe", "the probe's slot is free again"

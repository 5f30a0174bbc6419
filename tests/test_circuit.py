"""Circuit breakers: open after repeated failures, one probe after the cooldown, closed by success."""

from __future__ import annotations

import pytest

from mixllm.service.circuit import CircuitBreakers


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_breaker_opens_after_failures_in_the_window_and_probes_once_after_the_cooldown():
    clock = Clock()
    breakers = CircuitBreakers(failures=3, window_s=10, cooldown_s=30, clock=clock)
    for _ in range(2):
        breakers.record("a", ok=False)
    assert breakers.state("a") == "closed" and breakers.available("a")
    clock.now = 11  # the first two failures left the window
    breakers.record("a", ok=False)
    assert breakers.state("a") == "closed"
    clock.now = 12
    breakers.record("a", ok=False)
    breakers.record("a", ok=False)
    assert breakers.state("a") == "open" and not breakers.available("a") and not breakers.begin("a")
    assert breakers.open_llms() == ["a"] and breakers.available("b")  # other LLMs are unaffected
    clock.now = 12 + 30
    assert breakers.state("a") == "half_open" and breakers.available("a")
    assert breakers.begin("a") and not breakers.begin("a")  # one probe at a time
    breakers.record("a", ok=False)  # the probe failed: open for another cooldown
    assert breakers.state("a") == "open"
    clock.now = 12 + 60
    assert breakers.begin("a")
    breakers.record("a", ok=True)  # the probe succeeded
    assert breakers.state("a") == "closed" and breakers.open_llms() == []


def test_a_success_resets_the_count_and_bad_settings_are_refused():
    clock = Clock()
    breakers = CircuitBreakers(failures=2, window_s=60, cooldown_s=5, clock=clock)
    breakers.record("a", ok=False)
    breakers.record("a", ok=True)
    breakers.record("a", ok=False)
    assert breakers.state("a") == "closed"
    with pytest.raises(ValueError, match="failures"):
        CircuitBreakers(failures=0)


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


def test_a_call_cancelled_mid_flight_is_accounted_for_and_frees_its_breakers_probe():
    """The server's request timeout (or a caller leaving) cancels an upstream call under way. The
    call must still leave the in-flight count and the attempt log must say what happened; if it was
    a half-open breaker's probe, the probe slot must be free again, or that LLM stays shut out until
    a restart."""
    from types import SimpleNamespace

    import anyio

    from mixllm.service.api_models import ChatRequest
    from mixllm.service.upstream_calls import UpstreamCalls
    from stubs import UpstreamStub

    clock = Clock()
    breakers = CircuitBreakers(failures=1, window_s=10, cooldown_s=30, clock=clock)
    breakers.record("a", ok=False)
    clock.now = 31
    assert breakers.state("a") == "half_open" and breakers.begin("a"), "this call is the probe"
    outcomes, finished = [], []
    host = UpstreamCalls()
    host.breakers, host.metrics = breakers, SimpleNamespace(in_flight=_Gauge(), proxied=_Gauge())
    host.attempts = SimpleNamespace(submit=lambda **call: outcomes.append(call["outcome"]))
    host.load = SimpleNamespace(start=lambda *args, **kwargs: None,
                                finish=lambda call_id, latency: finished.append((call_id, latency)))
    with UpstreamStub(slow_s=2) as stub:
        stub.behaviour["upstream-a"] = "slow"
        upstream = SimpleNamespace(base_url=stub.base_url, model="upstream-a", api_key_env=None, timeout_s=10)
        request = ChatRequest(model="a", messages=[{"role": "user", "content": "hello"}])

        async def cut_off() -> bool:
            with anyio.move_on_after(0.5) as scope:
                await host._attempt(request, "a", upstream, "d1", 1, timeout_s=10, attempt=1)
            return scope.cancelled_caught

        assert anyio.run(cut_off), "the call was still under way when it was cancelled"
    assert host.metrics.in_flight.value == 0 and finished == [("d1:1", None)]
    assert outcomes == ["cancelled"]
    assert breakers.available("a") and breakers.state("a") == "half_open", "no verdict: the next call probes"

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



def test_only_the_probe_frees_its_slot_and_a_lost_probe_is_given_up_after_its_timeout():
    clock = Clock()
    breakers = CircuitBreakers(failures=1, window_s=10, cooldown_s=30, clock=clock, probe_timeout_s=100)
    assert breakers.begin("a") == "call"  # a call claimed while the breaker is closed ...
    breakers.record("a", ok=False)  # ... and another that failed: open
    clock.now = 31
    assert breakers.begin("a") == "probe" and breakers.begin("a") is None
    breakers.release("a", "call")  # the earlier call ends without a verdict (cancelled)
    assert breakers.begin("a") is None, "a plain call's end does not free the probe's slot"
    clock.now = 31 + 99
    assert not breakers.available("a")
    clock.now = 31 + 101  # the probe's outcome never came (a call lost without accounting)
    assert breakers.available("a") and breakers.begin("a") == "probe", "probed again, not shut out for good"
    breakers.release("a", "probe")
    assert breakers.begin("a") == "probe", "a released probe frees its slot at once"


def test_an_operator_closes_breakers_at_once_and_their_counted_failures_are_forgotten():
    clock = Clock()
    breakers = CircuitBreakers(failures=2, window_s=60, cooldown_s=30, clock=clock)
    for llm in ("a", "a", "b", "b", "c"):
        breakers.record(llm, ok=False)
    assert breakers.open_llms() == ["a", "b"]
    assert breakers.close(["a", "a", "c", "unknown"]) == ["a"], "only open breakers are reported closed, once"
    assert breakers.open_llms() == ["b"] and breakers.begin("a") == "call"
    breakers.record("c", ok=False)
    assert breakers.state("c") == "closed", "c's earlier failure was forgotten: one failure is not two"
    assert breakers.close() == ["b"] and breakers.open_llms() == []

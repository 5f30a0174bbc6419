"""Circuit breakers per LLM: an upstream that keeps failing is left alone for a while, then probed.

Closed: calls go through, failures are counted over a sliding window. Open (after `failures`
failures within `window_s`): the LLM is no candidate. Half-open (after `cooldown_s`): one call is let
through as a probe; its success closes the breaker, its failure opens it again for another cooldown.
A probe whose outcome never comes (a call lost without accounting) is given up after
`probe_timeout_s`, so the LLM is probed again rather than left out until a restart.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from mixllm.config.operations import FailoverConfig


@dataclass
class _Breaker:
    failures: deque = field(default_factory=deque)
    opened_at: float | None = None
    probing: bool = False
    probe_started_at: float = 0.0


class CircuitBreakers:
    def __init__(self, failures: int = FailoverConfig.default_for("breaker_failures"),
                 window_s: float = FailoverConfig.default_for("breaker_window_s"),
                 cooldown_s: float = FailoverConfig.default_for("breaker_cooldown_s"),
                 clock: Callable[[], float] = time.monotonic,
                 probe_timeout_s: float = FailoverConfig.default_for("deadline_s")) -> None:
        if failures < 1 or window_s <= 0 or cooldown_s <= 0 or probe_timeout_s <= 0:
            raise ValueError("failures must be >= 1, window_s, cooldown_s and probe_timeout_s > 0")
        self.failures, self.window_s, self.cooldown_s, self.clock = failures, window_s, cooldown_s, clock
        self.probe_timeout_s = probe_timeout_s
        self._breakers: dict[str, _Breaker] = {}
        self._lock = threading.Lock()

    def state(self, llm: str) -> str:
        """closed, open or half_open."""
        with self._lock:
            return self._state(self._breakers.get(llm))

    def _state(self, breaker: _Breaker | None) -> str:
        if breaker is None or breaker.opened_at is None:
            return "closed"
        return "open" if self.clock() - breaker.opened_at < self.cooldown_s else "half_open"

    def _probe_under_way(self, breaker: _Breaker) -> bool:
        return breaker.probing and self.clock() - breaker.probe_started_at < self.probe_timeout_s

    def available(self, llm: str) -> bool:
        """May a call go to `llm` now (closed, or half-open with no probe under way)?"""
        with self._lock:
            breaker = self._breakers.get(llm)
            state = self._state(breaker)
            return state == "closed" or (state == "half_open" and not self._probe_under_way(breaker))

    def begin(self, llm: str) -> str | None:
        """Claim a call to `llm`: "call", or "probe" for a half-open breaker's one call; None if it
        may not be called now. The caller passes a probe's claim back to `release`."""
        with self._lock:
            breaker = self._breakers.get(llm)
            state = self._state(breaker)
            if state == "closed":
                return "call"
            if state == "half_open" and not self._probe_under_way(breaker):
                breaker.probing, breaker.probe_started_at = True, self.clock()
                return "probe"
            return None

    def record(self, llm: str, ok: bool) -> None:
        """The outcome of a call to `llm`."""
        with self._lock:
            breaker = self._breakers.setdefault(llm, _Breaker())
            now = self.clock()
            if ok:
                breaker.failures.clear()
                breaker.opened_at, breaker.probing = None, False
                return
            if breaker.probing or self._state(breaker) == "half_open":  # the probe failed
                breaker.opened_at, breaker.probing = now, False
                return
            breaker.failures.append(now)
            while breaker.failures and now - breaker.failures[0] > self.window_s:
                breaker.failures.popleft()
            if len(breaker.failures) >= self.failures:
                breaker.opened_at = now
                breaker.failures.clear()

    def release(self, llm: str, claim: str | None) -> None:
        """A call to `llm` that ended with no verdict on the upstream (cancelled, or refused as the
        request's own fault): nothing is counted; if it was the probe (`claim`, from `begin`), the
        probe slot is free again (a plain call that ends meanwhile frees nobody's probe)."""
        if claim != "probe":
            return
        with self._lock:
            breaker = self._breakers.get(llm)
            if breaker is not None:
                breaker.probing = False

    def close(self, llms: Iterable[str] | None = None) -> list[str]:
        """Close the breakers of `llms` (every LLM's when None) now, forgetting their counted
        failures: an operator who has fixed an upstream need not wait out the cooldown. Returns the
        LLMs whose breaker was open or half-open."""
        with self._lock:
            names = list(self._breakers) if llms is None else [llm for llm in dict.fromkeys(llms) if llm in self._breakers]
            closed = sorted(llm for llm in names if self._state(self._breakers[llm]) != "closed")
            for llm in names:
                del self._breakers[llm]
            return closed

    def open_llms(self) -> list[str]:
        """LLMs whose breaker is open or half-open (for GET /model and the decision's notes)."""
        with self._lock:
            return sorted(llm for llm, breaker in self._breakers.items() if self._state(breaker) != "closed")

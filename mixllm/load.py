"""The live load the latency penalty sees: calls in flight per LLM and their observed latency.

A call is in flight from the routing decision until its completion is reported (the proxy
reports it when the upstream answers; a client reports it with the latency in /feedback).
Decisions never completed stop counting after `max_age_s`, so lost feedback cannot pin an LLM
as busy forever. Observed latency is an exponentially weighted mean per LLM.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from mixllm.router import LoadSnapshot


class LiveLoad:
    """Thread-safe in-flight counts and latency averages per LLM."""

    def __init__(self, max_age_s: float = 120.0, smoothing: float = 0.2, max_tracked: int = 100_000):
        self.max_age_s = max_age_s
        self.smoothing = smoothing
        self.max_tracked = max_tracked
        self._lock = threading.Lock()
        self._open: OrderedDict[str, tuple[str, float]] = OrderedDict()  # id -> (llm, started)
        self._latency: dict[str, float] = {}

    def start(self, call_id: str, llm: str) -> None:
        with self._lock:
            self._open[call_id] = (llm, time.monotonic())
            while len(self._open) > self.max_tracked:
                self._open.popitem(last=False)

    def finish(self, call_id: str, latency_s: float | None = None, llm: str | None = None) -> None:
        with self._lock:
            started = self._open.pop(call_id, None)
            name = llm or (started[0] if started else None)
            if name is None:
                return
            if latency_s is None and started is not None:
                latency_s = time.monotonic() - started[1]
            if latency_s is not None and latency_s >= 0:
                previous = self._latency.get(name)
                self._latency[name] = latency_s if previous is None else (
                    (1 - self.smoothing) * previous + self.smoothing * latency_s)

    def observe_latency(self, llm: str, latency_s: float) -> None:
        self.finish(call_id="", latency_s=latency_s, llm=llm)

    def snapshot(self) -> LoadSnapshot:
        now = time.monotonic()
        with self._lock:
            while self._open:
                call_id, (_, started) = next(iter(self._open.items()))
                if now - started <= self.max_age_s:
                    break
                self._open.popitem(last=False)
            in_flight: dict[str, int] = {}
            for llm, _ in self._open.values():
                in_flight[llm] = in_flight.get(llm, 0) + 1
            return LoadSnapshot(in_flight=in_flight, observed_latency_s=dict(self._latency))

"""The live load the latency penalty sees: calls in flight per LLM and their observed latency.

Only real upstream calls count as in flight: the proxy's, from the moment it forwards a call until
the upstream answers (or its timeout; at most `max_age_s`). A /route decision is not a call: the
caller may never make it, and counting decisions let one anonymous batch of routes pin an LLM as
busy. Only latencies that were measured (by the proxy, or sent as latency_s with /feedback on a
decision the service made) feed
the estimate.
Observed latency is the median of each LLM's last `window` measurements: a mean would let one
absurd report (latency_s: 1e300) pin an LLM's penalty for thousands of normal ones, while a median
needs half the window to move. Failed calls are not measurements (the proxy does not report them).
Half the window is still within one tenant's reach (pairing /route with /feedback), so a tenant's
reports hold at most `max_client_share` of an LLM's window: its next one replaces its own oldest.
While other sources (the proxy, the admin token's reports, other tenants) fill the rest, one tenant
cannot move the median out of their values.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections import OrderedDict, deque

from mixllm.config.operations import ServiceConfig
from mixllm.core.decision import LoadSnapshot


class LiveTraffic:
    """Thread-safe in-flight counts and robust latency estimates per LLM."""

    def __init__(self, max_age_s: float = ServiceConfig.default_for("in_flight_max_age_s"),
                 window: int = ServiceConfig.default_for("latency_window"), max_tracked: int = 100_000,
                 max_client_share: float = ServiceConfig.default_for("latency_client_share")):
        self.max_age_s = max_age_s
        self.window = window
        self.max_tracked = max_tracked
        self.max_client_share = max_client_share
        self._lock = threading.Lock()
        self._open: OrderedDict[str, tuple[str, float]] = OrderedDict()  # id -> (llm, expires at)
        # Per LLM: (latency, the client that reported it; None for the proxy's own measurements).
        self._latencies: dict[str, deque[tuple[float, str | None]]] = {}

    def start(self, call_id: str, llm: str, expires_after_s: float | None = None) -> None:
        """Count a proxy call as in flight until it is finished, or for at most `expires_after_s`
        (capped by max_age_s): a call whose end the proxy never saw should weigh like a call of its
        upstream's timeout, not like one stuck for minutes."""
        lifetime = self.max_age_s if expires_after_s is None else min(self.max_age_s, max(0.0, expires_after_s))
        with self._lock:
            self._open[call_id] = (llm, time.monotonic() + lifetime)
            while len(self._open) > self.max_tracked:
                self._open.popitem(last=False)

    def finish(self, call_id: str, latency_s: float | None = None, llm: str | None = None,
               client: str | None = None) -> None:
        with self._lock:
            started = self._open.pop(call_id, None)
            name = llm or (started[0] if started else None)
            if name is None:
                return
            # Only a measured latency counts: time since the decision is not one when the
            # feedback comes from a person minutes later.
            if latency_s is None or not math.isfinite(latency_s) or latency_s < 0:
                return
            window = self._latencies.setdefault(name, deque(maxlen=self.window))
            if client is not None:
                own = [i for i, (_, source) in enumerate(window) if source == client]
                if len(own) >= max(1, int(self.max_client_share * self.window)):
                    del window[own[0]]
            window.append((float(latency_s), client))

    def observe_latency(self, llm: str, latency_s: float, client: str | None = None) -> None:
        """A latency reported from outside (with /feedback), by `client` (a tenant or an anonymous
        address: capped; None, the admin token: not)."""
        self.finish(call_id="", latency_s=latency_s, llm=llm, client=client)

    def snapshot(self) -> LoadSnapshot:
        now = time.monotonic()
        with self._lock:
            expired = [call_id for call_id, (_, expires) in self._open.items() if expires <= now]
            for call_id in expired:
                del self._open[call_id]
            in_flight: dict[str, int] = {}
            for llm, _ in self._open.values():
                in_flight[llm] = in_flight.get(llm, 0) + 1
            observed = {llm: statistics.median(value for value, _ in values) for llm, values in self._latencies.items()}
            return LoadSnapshot(in_flight=in_flight, observed_latency_s=observed)

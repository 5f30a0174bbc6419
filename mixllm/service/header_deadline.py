"""A deadline for a request's headers, which the HTTP server BentoML starts (uvicorn) does not have.

uvicorn closes an idle keep-alive connection, and the BodyLimit middleware answers 408 to a body
that stalls, but a client that sends half a request line or half its headers and then waits holds
its connection (and a file descriptor) for as long as it likes: 1,000 such connections were still
held after 66 s. No ASGI middleware can help, since the application only sees a request once its
headers are complete. So the server's protocol class gets the deadline: `install(seconds)` swaps
uvicorn's "auto" HTTP protocol for a subclass that closes a connection whose request has not
finished its headers within `seconds` of its first byte (or of the connection opening). BentoML
builds the uvicorn config after importing the service, so installing from the service module is in
time; an unknown uvicorn layout is left alone with a warning (a reverse proxy's header timeout then
does the job).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

logger = logging.getLogger(__name__)


def with_header_deadline(protocol: type[asyncio.Protocol], seconds: float) -> type[asyncio.Protocol]:
    """`protocol` (uvicorn's h11 or httptools protocol) with the deadline. A request's headers are
    complete when the protocol starts its request/response cycle (`self.cycle`), for both."""

    class HeaderDeadline(protocol):  # type: ignore[misc, valid-type]
        header_read_timeout_s = seconds

        def connection_made(self, transport: Any) -> None:
            self._header_deadline: asyncio.TimerHandle | None = None
            self._cycle_before = None
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            cycle = getattr(self, "cycle", None)
            if self._header_deadline is None and (cycle is None or getattr(cycle, "response_complete", True)):
                self._arm()  # the first bytes of the next request on a kept-alive connection
            super().data_received(data)
            if self._header_deadline is not None and getattr(self, "cycle", None) is not self._cycle_before:
                self._disarm()  # the headers are in: the application (and BodyLimit) take over

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._cycle_before = getattr(self, "cycle", None)
            self._header_deadline = self.loop.call_later(self.header_read_timeout_s, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_deadline is not None:
                self._header_deadline.cancel()
                self._header_deadline = None

        def _headers_too_slow(self) -> None:
            self._header_deadline = None
            if not self.transport.is_closing():
                logger.warning("closed a connection from %s: its request headers did not arrive within %g s "
                               "(service.header_read_timeout_s)", getattr(self, "client", None),
                               self.header_read_timeout_s)
                self.transport.close()

    HeaderDeadline.__name__ = HeaderDeadline.__qualname__ = f"HeaderDeadline{protocol.__name__}"
    return HeaderDeadline


def install(seconds: float) -> bool:
    """Make uvicorn's "auto" HTTP protocol (the one BentoML's server uses) enforce the deadline.
    Idempotent; returns whether it is in place."""
    try:
        from uvicorn.protocols.http import auto
    except ImportError:  # pragma: no cover - uvicorn comes with BentoML
        return False
    current = getattr(auto, "AutoHTTPProtocol", None)
    if current is None or not all(hasattr(current, name) for name in ("connection_made", "data_received",
                                                                      "connection_lost")):
        logger.warning("uvicorn's HTTP protocol has an unknown layout: no header read timeout; put a reverse "
                       "proxy with one in front of the service")
        return False
    if getattr(current, "header_read_timeout_s", None) is not None:
        current.header_read_timeout_s = seconds
        return True
    auto.AutoHTTPProtocol = with_header_deadline(current, seconds)
    return True

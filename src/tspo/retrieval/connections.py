"""Connection hygiene for the retrieval server: idle and header-read timeouts, a connection cap.

uvicorn closes a keep-alive connection only after a response, and cancels that timer on the first byte
of the next request, so a connection that never sends anything, or sends half a request head and
stops, stays open for ever (a slow-loris). The protocol class built here, a subclass of the one uvicorn
would use, adds:

* the idle timeout from the moment a connection opens, not only between requests;
* a header timeout: once the first byte of a request arrives, its head must be complete within
  ``header_timeout`` seconds or the connection is closed (the body has its own timeout in the app);
* a cap on open connections: one over the cap gets ``503`` JSON with ``Retry-After`` and is closed.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["guarded_protocol"]

logger = logging.getLogger("tspo.retrieval.server")


def _base_protocol() -> type:
    try:
        import httptools  # noqa: F401
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        return HttpToolsProtocol
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol

        return H11Protocol


def _over_capacity_response(limit: int) -> bytes:
    body = f'{{"error":"server is at its limit of {limit} open connections; retry shortly"}}'.encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
        f"connection: close\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def guarded_protocol(header_timeout: float, max_connections: int) -> type:
    """uvicorn's HTTP protocol class with the guards in the module docstring."""
    base: Any = _base_protocol()
    rejection = _over_capacity_response(max_connections)

    class GuardedProtocol(base):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._head_timer: Any = None
            self._head_cycle: Any = None
            if len(self.connections) > max_connections:
                logger.warning(
                    "refusing a connection: %d open (limit %d)", len(self.connections), max_connections
                )
                transport.write(rejection)
                transport.close()
                return
            # uvicorn arms the idle timer only after a response; arm it for a connection that never speaks.
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

        def data_received(self, data: bytes) -> None:
            if not self._in_request() and (self._head_timer is None or self._head_cycle is not self.cycle):
                if self._head_timer is not None:
                    self._head_timer.cancel()
                self._head_cycle = self.cycle
                self._head_timer = self.loop.call_later(header_timeout, self._head_timed_out)
            super().data_received(data)

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            super().connection_lost(exc)

        def _in_request(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def _head_timed_out(self) -> None:
            self._head_timer = None
            # A new cycle since the timer was armed means the head arrived in time.
            if self.cycle is self._head_cycle and not self._in_request() and not self.transport.is_closing():
                logger.info("closing a connection whose request head took over %.0fs", header_timeout)
                self.transport.close()

    return GuardedProtocol

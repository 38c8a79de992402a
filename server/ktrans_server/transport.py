"""The HTTP connection layer under the app: uvicorn's h11 protocol with the two limits it lacks.

- A header deadline: a connection must deliver a request's complete headers within
  `header_timeout` seconds of opening (or of its previous response), or it gets 408 and is
  closed. uvicorn only times out idle keep-alive connections, so a client sending headers a byte
  at a time, or nothing at all, held its connection (a file descriptor) forever.
- A connection cap: beyond `max_connections` open connections, a new one gets an immediate 503
  and is closed, so a flood cannot exhaust file descriptors (after which the server could not
  accept anyone, /health included, and asyncio logs a traceback per failed accept).

`serve()` runs an app with these limits and reports the bound address once the socket listens.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from dataclasses import dataclass

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("ktrans.server")

_408 = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\ncontent-length: 33\r\n" \
       b"connection: close\r\n\r\nRequest headers did not arrive.\r\n"
_503 = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: 38\r\n" \
       b"retry-after: 1\r\nconnection: close\r\n\r\nToo many open connections; retry later.\n"


_RESERVED_FDS = 256          # file descriptors kept for everything but connections


@dataclass
class ConnectionLimits:
    header_timeout: float = 30.0
    max_connections: int = 1024


def guarded_protocol(limits: ConnectionLimits) -> type[H11Protocol]:
    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._header_timer: asyncio.TimerHandle | None = None
            self._seen_cycle = None
            if len(self.connections) > limits.max_connections:
                transport.write(_503)
                transport.close()
                return
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(limits.header_timeout, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self.transport.write(_408)
                self.transport.close()

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and self.cycle is not self._seen_cycle:
                self._seen_cycle = self.cycle      # a request's headers are complete
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # NOTE: super() may already have started a pipelined request's cycle.
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11Protocol


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's open-file limit towards `wanted` (within the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def uvicorn_config(app, host: str, port: int, limits: ConnectionLimits, log_level: str = "info",
                   **kwargs) -> uvicorn.Config:
    # Room for the connections plus the model's own files (GGUF shards, the engine's pipes).
    soft = raise_fd_limit(limits.max_connections + _RESERVED_FDS)
    if soft < limits.max_connections + _RESERVED_FDS:
        limits.max_connections = max(16, soft - _RESERVED_FDS)
        log.warning("the open-file limit is %d (ulimit -n); serving at most %d connections", soft,
                    limits.max_connections)
    return uvicorn.Config(app, host=host, port=port, http=guarded_protocol(limits), log_level=log_level,
                          access_log=False, **kwargs)


def bound_address(server: uvicorn.Server) -> tuple[str, int]:
    sock = server.servers[0].sockets[0]
    host, port = sock.getsockname()[:2]
    return host, port

"""uvicorn, configured for the limits in ServerOptions, and a shutdown with a deadline.

uvicorn closes idle keep-alive connections, but a connection that never finishes sending its
request headers stays open forever (slowloris), and httptools takes headers of any size;
`HeaderTimeout` closes the first after `header_read_timeout_s` and answers the second with a 431
past `MAX_HEADER_BYTES`. `max_connections` is uvicorn's own cap (beyond it: its plain 503).

At shutdown, uvicorn stops accepting and waits for open responses, then cancels what is left,
which cuts streams without a word (and logs a traceback per request). `ServingServer` ends them
itself first, at `shutdown_timeout_s`: every unfinished request fails with a 503 error, which a
stream sends as its last event before `[DONE]`, and one line is logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Optional

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from rtpllm.engine.async_engine import AsyncEngineBase, EngineDeadError
from rtpllm.serving.server_options import ServerOptions

logger = logging.getLogger(__name__)

# uvicorn's own deadline comes this long after ours, so the error events we send can flush first.
_SHUTDOWN_MARGIN_S = 5.0
# A request line and headers beyond this get a 431 (nginx allows 32 KiB, h11 16 KiB).
MAX_HEADER_BYTES = 64 * 1024


def _refusal(status: int, reason: str, message: str, code: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n\r\n").encode() + body


class HeaderTimeout:
    """Mixin for uvicorn's HTTP protocols: a connection that has not completed a request's headers
    `header_read_timeout_s` after it opened (or after its first byte of a next request) is closed,
    and one whose request line and headers pass MAX_HEADER_BYTES gets a 431 and is closed.
    uvicorn's keep-alive timer covers idle time between requests; this covers the headers."""

    header_read_timeout_s = 20.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_timer: Optional[asyncio.TimerHandle] = None
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
            self._arm_header_timer()  # the first bytes of a next request on a kept-alive connection
        if self._header_timer is not None and not self._within_header_limit(data):
            self._disarm_header_timer()
            self.transport.write(_refusal(431, "Request Header Fields Too Large",
                                          f"the request line and headers exceed {MAX_HEADER_BYTES} bytes",
                                          "request_header_too_large"))
            self.transport.close()
            return
        super().data_received(data)
        if self._header_timer is not None and self.cycle is not self._cycle_when_armed:
            self._disarm_header_timer()  # a new request's headers are complete

    def _within_header_limit(self, data: bytes) -> bool:
        """Whether the headers still fit MAX_HEADER_BYTES with `data`: they end within the bytes
        allowed (a body may follow in the same read), or all of `data` fits."""
        allowed = MAX_HEADER_BYTES - self._header_bytes
        if len(data) > allowed and b"\r\n\r\n" not in self._header_tail + data[:max(allowed, 0)]:
            return False
        self._header_bytes += len(data)
        self._header_tail = data[-3:]
        return True

    def connection_lost(self, exc) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._cycle_when_armed = self.cycle
        self._header_bytes = 0
        self._header_tail = b""
        self._header_timer = self.loop.call_later(self.header_read_timeout_s, self._on_header_timeout)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        logger.debug("closing a connection that sent no complete request headers within %.0fs",
                     self.header_read_timeout_s)
        self.transport.close()


def _protocol_class(http: str, header_read_timeout_s: float) -> type:
    if http == "h11":
        base: type = H11Protocol
    else:
        try:
            from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
        except ImportError:
            if http == "httptools":
                raise
            base = H11Protocol
        else:
            base = HttpToolsProtocol
    return type(f"{base.__name__}WithHeaderTimeout", (HeaderTimeout, base),
                {"header_read_timeout_s": header_read_timeout_s})


def uvicorn_config(app: Any, options: ServerOptions, **overrides: Any) -> uvicorn.Config:
    """The uvicorn configuration for `options`; `overrides` are further uvicorn.Config arguments."""
    settings = dict(
        host=options.host, port=options.port, log_level=options.log_level, access_log=options.access_log,
        timeout_graceful_shutdown=options.shutdown_timeout_s + _SHUTDOWN_MARGIN_S,
        timeout_keep_alive=options.keep_alive_timeout_s, limit_concurrency=options.max_connections,
        http=_protocol_class(options.http, options.header_read_timeout_s), loop=options.loop)
    settings.update(overrides)
    return uvicorn.Config(app, **settings)


class ServingServer(uvicorn.Server):
    """uvicorn's server, ending unfinished requests with an error at `shutdown_timeout_s`."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngineBase, shutdown_timeout_s: float):
        super().__init__(config)
        self.engine = engine
        self.shutdown_timeout_s = shutdown_timeout_s

    async def shutdown(self, sockets: Optional[list] = None) -> None:
        timer = asyncio.get_running_loop().call_later(self.shutdown_timeout_s, self._end_in_flight)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()

    def _end_in_flight(self) -> None:
        error = EngineDeadError(f"the server shut down before the request finished "
                                f"(--shutdown-timeout {self.shutdown_timeout_s:g}s)")
        ended = self.engine.end_in_flight(error)
        if ended:
            logger.warning("shutdown: ended %d unfinished requests with an error after %.1fs", ended,
                           self.shutdown_timeout_s)

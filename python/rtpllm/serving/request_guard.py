"""The server's gate: what a request must satisfy before any handler sees it.

In order: the `Host` header names this server (against DNS rebinding: a web page whose name the
attacker points at 127.0.0.1 sends its own name), the API key when one is set, `application/json`
on request bodies (a browser cannot send that cross-origin without a CORS preflight, which this
server never grants), and a body of at most `max_request_body_bytes` that arrives within
`body_read_timeout_s`. The body is read here, counted as it arrives, and handed on whole, so
handlers never wait on a slow client. A client that hangs up mid-upload is a debug line, not an
error. Every refusal is an OpenAI-style JSON error.

`rtpllm serve` and `rtpllm router` both put this guard in front of everything: each maps its own
options (ServerOptions, RouterConfig) onto `AccessRules`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
from dataclasses import dataclass
from typing import Optional

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rtpllm.serving.errors import OpenAIError
from rtpllm.serving.server_options import DEFAULT_MAX_REQUEST_BODY_BYTES, ServerOptions

logger = logging.getLogger(__name__)

_WILDCARD_BINDS = {"", "0.0.0.0", "::"}
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_BODY_METHODS = {"POST", "PUT", "PATCH"}


@dataclass(frozen=True)
class AccessRules:
    """What the guard enforces (see the module docstring)."""

    bind_host: str = "127.0.0.1"  # with `allowed_hosts`, which Host headers name this server (HostPolicy)
    allowed_hosts: tuple[str, ...] = ()
    api_key: Optional[str] = None
    public_paths: tuple[str, ...] = ("/health", "/metrics")  # served without the key
    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES
    body_read_timeout_s: float = 60.0

    @classmethod
    def of_server(cls, options: ServerOptions) -> "AccessRules":
        return cls(bind_host=options.host, allowed_hosts=options.allowed_hosts, api_key=options.api_key,
                   public_paths=options.public_paths, max_request_body_bytes=options.max_request_body_bytes,
                   body_read_timeout_s=options.body_read_timeout_s)


class _Refusal(Exception):
    def __init__(self, error: OpenAIError, close: bool = False):
        super().__init__(error.message)
        self.error = error
        self.close = close  # the unread rest of the body makes the connection unusable


def host_name(host_header: str) -> str:
    """The name part of a Host header: no port, no IPv6 brackets, no trailing dot, lower case."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    name, _, port = host.rpartition(":")
    if name and port.isdigit():
        host = name
    return host.rstrip(".")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HostPolicy:
    """Which Host headers name this server: the bind address, the loopback names when bound to
    loopback, and `allowed_hosts` (exact, `*.suffix`, or `*`). Bound to every interface with no
    list, any Host: the operator then reaches the server by names it cannot know (a proxy, a
    Kubernetes service), as vLLM users expect."""

    def __init__(self, bind_host: str, allowed_hosts: tuple[str, ...] = ()):
        bind = host_name(bind_host)
        self.any_host = "*" in allowed_hosts or (bind in _WILDCARD_BINDS and not allowed_hosts)
        self.names = {host_name(h) for h in allowed_hosts if not h.startswith("*")}
        self.suffixes = tuple(h[1:].lower() for h in allowed_hosts if h.startswith("*."))
        if bind not in _WILDCARD_BINDS:
            self.names.add(bind)
        if _is_loopback(bind):
            self.names.update(_LOOPBACK_NAMES)

    def allows(self, host_header: Optional[str]) -> bool:
        if self.any_host or host_header is None:  # no Host at all: not a browser (they always send one)
            return True
        name = host_name(host_header)
        return name in self.names or name.endswith(self.suffixes)


class _BodyDeadlines:
    """One timer for every body being read, instead of one per request (a timer per request cost
    more than the rest of the guard): each tick cancels the reads past their deadline."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._reads: dict[asyncio.Task, float] = {}
        self._expired: set[asyncio.Task] = set()
        self._ticking = False
        self._tick_s = min(1.0, timeout_s / 4)

    def start(self, task: asyncio.Task) -> None:
        loop = asyncio.get_running_loop()
        self._reads[task] = loop.time() + self.timeout_s
        if not self._ticking:
            self._ticking = True
            loop.call_later(self._tick_s, self._tick, loop)

    def stop(self, task: asyncio.Task) -> None:
        self._reads.pop(task, None)

    def expired(self, task: asyncio.Task) -> bool:
        """Whether `task` was cancelled here (once: the answer is consumed)."""
        if task in self._expired:
            self._expired.discard(task)
            return True
        return False

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        for task, deadline in list(self._reads.items()):
            if deadline <= now:
                del self._reads[task]
                self._expired.add(task)
                task.cancel()
        if self._reads:
            loop.call_later(self._tick_s, self._tick, loop)
        else:
            self._ticking = False


class RequestGuard:
    """ASGI middleware; add it outermost (after every other `add_middleware`), with the server's
    `options` or explicit `rules`."""

    def __init__(self, app: ASGIApp, options: Optional[ServerOptions] = None, rules: Optional[AccessRules] = None):
        if (options is None) == (rules is None):
            raise TypeError("RequestGuard: give either options or rules")
        rules = rules if rules is not None else AccessRules.of_server(options)
        self.app = app
        self.hosts = HostPolicy(rules.bind_host, rules.allowed_hosts)
        self.api_key = rules.api_key.encode() if rules.api_key else None
        self.public_paths = frozenset(rules.public_paths)
        self.max_body = rules.max_request_body_bytes
        self.body_timeout_s = rules.body_read_timeout_s
        self._deadlines = _BodyDeadlines(rules.body_read_timeout_s)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            headers = _Headers(scope)
            self._check_headers(scope, headers)
            if scope["method"] in _BODY_METHODS:
                body = await self._read_body(headers, receive)
                if body is None:
                    logger.debug("client %s disconnected while sending its request body", _client(scope))
                    return
                receive = _replay(body, receive)
        except _Refusal as refusal:
            response = refusal.error.response()
            if refusal.close:
                response.headers["connection"] = "close"
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _check_headers(self, scope: Scope, headers: "_Headers") -> None:
        if headers.hosts > 1 or not self.hosts.allows(headers.host):
            raise _Refusal(OpenAIError("Host: this server does not answer to that host name (see --allowed-hosts)",
                                       status=400, param="Host", code="invalid_host"))
        if self.api_key is not None and scope["path"] not in self.public_paths:
            scheme, _, key = headers.authorization.partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(key.strip(), self.api_key):
                error = OpenAIError("invalid or missing API key: send `Authorization: Bearer <key>`", status=401,
                                    code="invalid_api_key")
                error.headers["WWW-Authenticate"] = "Bearer"
                raise _Refusal(error)
        if scope["method"] in _BODY_METHODS:
            content_type = headers.content_type.decode("latin-1").lower()
            if content_type != "application/json":  # the common case, without parsing
                media_type, _, parameters = content_type.partition(";")
                charset = parameters.replace(" ", "").partition("charset=")[2].strip('"')
                if media_type.strip() != "application/json" or charset not in ("", "utf-8", "utf8"):
                    raise _Refusal(OpenAIError(
                        f"Content-Type: request bodies must be application/json (UTF-8), got {content_type!r}"[:300],
                        status=415, param="Content-Type", code="unsupported_media_type"))

    async def _read_body(self, headers: "_Headers", receive: Receive) -> Optional[bytes]:
        """The whole body, or None when the client hung up first."""
        if headers.content_length is not None:
            try:
                declared = int(headers.content_length)
            except ValueError:
                raise _Refusal(OpenAIError("Content-Length: not a number", status=400, param="Content-Length"),
                               close=True) from None
            if declared > self.max_body:
                raise _Refusal(self._too_large(), close=True)
        task = asyncio.current_task()
        self._deadlines.start(task)
        chunks, size = [], 0
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_body:
                    raise _Refusal(self._too_large(), close=True)
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        except asyncio.CancelledError:
            if not self._deadlines.expired(task):
                raise
            if hasattr(task, "uncancel"):  # Python 3.11+: the cancel was ours, not the server's
                task.uncancel()
            raise _Refusal(OpenAIError(f"the request body did not arrive within {self.body_timeout_s:g}s",
                                       status=408, code="request_timeout"), close=True) from None
        finally:
            self._deadlines.stop(task)

    def _too_large(self) -> OpenAIError:
        return OpenAIError(f"the request body is larger than this server's limit of {self.max_body} bytes "
                           "(--max-request-body-bytes)", status=413, code="request_too_large")


class _Headers:
    """The request headers the guard reads, in one pass over the scope's list."""

    __slots__ = ("host", "hosts", "authorization", "content_type", "content_length")

    def __init__(self, scope: Scope):
        self.host: Optional[str] = None
        self.hosts = 0
        self.authorization = self.content_type = b""
        self.content_length: Optional[bytes] = None
        for name, value in scope["headers"]:
            if name == b"host":
                self.host = value.decode("latin-1")
                self.hosts += 1
            elif name == b"authorization":
                self.authorization = value
            elif name == b"content-type":
                self.content_type = value
            elif name == b"content-length":
                self.content_length = value


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the body already read, then the connection's own messages (disconnect)."""
    pending = True

    async def replay() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "?"

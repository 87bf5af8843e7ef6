"""The router's access checks, in one ASGI middleware in front of everything: host header, API key,
request size. The same three checks `rtpllm serve` is getting (serving/); once both exist they
should share one implementation.

- Host: with `allowed_hosts` other than "*", a request whose Host header (port stripped) is not
  listed gets 400 (DNS-rebinding protection for a router on a private address).
- Key: with an `api_key`, every path except `open_paths` needs `Authorization: Bearer <key>`,
  else 401 with OpenAI's error body.
- Size: a body declared larger than `max_request_bytes` gets 413 before it is read; a body that
  turns out larger while it is read gets 413 from `read_body_limited`.
"""

from __future__ import annotations

import hmac
from typing import Iterable, Optional

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from rtpllm.serving.errors import OpenAIError

OPEN_PATHS = ("/health",)


class RequestTooLarge(OpenAIError):
    def __init__(self, limit: int):
        super().__init__(f"request body exceeds the limit of {limit} bytes", status=413,
                         code="request_too_large")


async def read_body_limited(request: Request, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _header(scope: Scope, name: bytes) -> Optional[str]:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


class AccessControl:
    def __init__(self, app: ASGIApp, api_key: Optional[str], max_request_bytes: int,
                 allowed_hosts: Iterable[str] = ("*",), open_paths: Iterable[str] = OPEN_PATHS):
        self.app = app
        self._expected = f"Bearer {api_key}".encode() if api_key else None
        self.max_request_bytes = max_request_bytes
        hosts = {h.lower() for h in allowed_hosts}
        self.allowed_hosts = None if "*" in hosts else hosts
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        error = self._check(scope)
        if error is not None:
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _check(self, scope: Scope) -> Optional[OpenAIError]:
        if self.allowed_hosts is not None:
            host = (_header(scope, b"host") or "").lower()
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name not in self.allowed_hosts and host not in self.allowed_hosts:
                return OpenAIError(f"host: {host!r} is not an allowed host", status=400, code="invalid_host")
        if self._expected is not None and scope["path"] not in self.open_paths:
            given = (_header(scope, b"authorization") or "").encode("latin-1")
            if not hmac.compare_digest(given, self._expected):
                return OpenAIError("invalid or missing API key (Authorization: Bearer <key>)", status=401,
                                   type="authentication_error", code="invalid_api_key")
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_request_bytes:
            return RequestTooLarge(self.max_request_bytes)
        return None

"""Forwarding one generation request: route, send, retry, stream back.

The body goes to the chosen instance unchanged. Nothing reaches the client before the instance's
first output (for a stream: its first SSE chunk), so until then a 503 or a connection failure is
retried on another instance (`max_retries`), and the client never sees the failed attempt. After
that the instance's bytes pass through as they come. When the client goes away, the upstream
connection is closed, which the instance treats as a disconnect: it aborts the request and frees
its KV blocks.
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Optional

import aiohttp
from starlette.requests import Request
from starlette.responses import Response

from rtpllm.router.backend import BackendPool, Ticket
from rtpllm.router.metrics import RouterMetrics
from rtpllm.router.policy import RoutingInput, RoutingPolicy
from rtpllm.serving.errors import OpenAIError
from rtpllm.serving.sse_response import SSEResponse
from rtpllm.serving.streaming import ClientDisconnected, cancel_on_disconnect

logger = logging.getLogger(__name__)
_CONNECTION_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError, OSError)


class _Retry(Exception):
    def __init__(self, reason: str, status: int = 503, body: bytes = b""):
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.body = body


class Proxy:
    def __init__(self, pool: BackendPool, policy: RoutingPolicy, metrics: RouterMetrics):
        self.pool = pool
        self.policy = policy
        self.metrics = metrics
        self.config = pool.config

    async def forward(self, request: Request, path: str, body: bytes, routing: RoutingInput,
                      stream: bool) -> Response:
        tried = []
        last: Optional[_Retry] = None
        for _ in range(self.config.max_retries + 1):
            # A long prompt may wait here for a slot: a client that leaves meanwhile ends the wait.
            choice = await cancel_on_disconnect(request, self.policy.route(routing, exclude=tried))
            if choice is None:
                break
            backend = choice.backend
            long = self.policy.lanes.is_long(routing)
            ticket = self.policy.dispatch(choice, routing)
            self.metrics.routed.labels(backend.url, "long" if long else "short").inc()
            self.metrics.prompt_tokens.labels(backend.url).inc(routing.num_prompt_tokens)
            self.metrics.expected_hit_tokens.labels(backend.url).inc(choice.hit_tokens)
            try:
                response = await cancel_on_disconnect(request, self._attempt(backend.url + path, body, ticket, stream))
                if not isinstance(response, _PassThrough):
                    ticket.close()
                return response
            except _Retry as retry:
                ticket.close()
                tried.append(backend)
                last = retry
                self.metrics.retries.labels(retry.reason).inc()
                logger.info("retrying on another instance: %s answered %s", backend.url, retry.reason)
            except BaseException:
                ticket.close()
                raise
        if last is not None and last.body:
            self.metrics.failures.labels("upstream_" + str(last.status)).inc()
            return Response(last.body, status_code=last.status, media_type="application/json")
        self.metrics.failures.labels("no_instance").inc()
        raise OpenAIError("no instance is available to serve the request", status=503, type="service_unavailable")

    async def _attempt(self, url: str, body: bytes, ticket: Ticket, stream: bool) -> Response:
        try:
            upstream = await self.pool.session.post(url, data=body, headers={"Content-Type": "application/json"})
        except _CONNECTION_ERRORS as exc:
            ticket.backend.mark_down(f"connection failed ({type(exc).__name__}: {exc})")
            raise _Retry("connection") from exc
        handed_over = False
        try:
            if upstream.status == 503:
                raise _Retry("503", 503, await _read_or_empty(upstream))
            content_type = upstream.headers.get("Content-Type", "application/json")
            if stream and upstream.status == 200 and content_type.startswith("text/event-stream"):
                try:
                    first = await upstream.content.readany()
                except _CONNECTION_ERRORS as exc:
                    ticket.backend.mark_down(f"stream broke before its first token ({exc!r})")
                    raise _Retry("connection") from exc
                if not first:
                    raise _Retry("connection")  # closed without a byte: nothing was sent yet
                ticket.first_output()
                handed_over = True
                return _PassThrough(_relay(first, upstream), upstream, ticket)
            try:
                payload = await upstream.read()
            except _CONNECTION_ERRORS as exc:
                ticket.backend.mark_down(f"reply broke off ({exc!r})")
                raise _Retry("connection") from exc
            ticket.first_output()
            return Response(payload, status_code=upstream.status, media_type=content_type.split(";")[0])
        finally:
            if not handed_over:
                upstream.close()  # an abandoned request (cancelled, retried) is aborted on the instance


async def _read_or_empty(upstream: aiohttp.ClientResponse) -> bytes:
    try:
        return await upstream.read()
    except _CONNECTION_ERRORS:
        return b""


async def _relay(first: bytes, upstream: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    yield first
    try:
        async for chunk in upstream.content.iter_any():
            yield chunk
    except _CONNECTION_ERRORS as exc:
        # The status line went out long ago: the error can only travel in the stream.
        error = OpenAIError(f"the instance's stream broke off: {exc!r}", status=502, type="upstream_error")
        yield b"data: " + error.body().model_dump_json().encode() + b"\n\n"


class _PassThrough(SSEResponse):
    """The instance's SSE stream, relayed; closing it (however it ends) closes the upstream
    connection and releases the request's place in the router's load accounting."""

    def __init__(self, content: AsyncIterator[bytes], upstream: aiohttp.ClientResponse, ticket: Ticket):
        def close() -> None:
            # A stream read to its end leaves a reusable connection; one cut short must be closed
            # (that is what aborts the request on the instance).
            if upstream.content.at_eof():
                upstream.release()
            else:
                upstream.close()
            ticket.close()

        super().__init__(content, on_close=close)


__all__ = ["Proxy", "ClientDisconnected"]

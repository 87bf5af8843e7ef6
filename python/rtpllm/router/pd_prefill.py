"""The PD router's prefill leg (pd_proxy.py drives the whole hand-off): pick a prefill instance
with the routing policy, send it the request, and, when the reservation is not known yet (overlap:
the prefill starts together with the decode request), send the destination as soon as it is.

A prefill that fails (5xx, connection, timeout) is replaced once by another instance with
`pd_retry`, into the same reservation; that one gets the destination in its request when it is
known by then.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Optional, Protocol

import aiohttp

from rtpllm.pd.protocol import KVDestination, PrefillDestination, PrefillRequest, PrefillResult
from rtpllm.router.backend import Backend, BackendPool
from rtpllm.router.metrics import RouterMetrics
from rtpllm.router.pd_errors import upstream_error
from rtpllm.router.policy import RoutingInput, RoutingPolicy
from rtpllm.serving.errors import OpenAIError

logger = logging.getLogger(__name__)

PREFILL_PATH = "/internal/pd/prefill"
DESTINATION_PATH = "/internal/pd/prefill/destination"
# TimeoutError is an OSError: aiohttp's own connect and read timeouts count as connection failures.
CONNECTION_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError)


class PrefillFailed(OpenAIError):
    """The prefill side failed; the client's answer unless `pd_retry` finds another instance."""

    def __init__(self, reason: str, message: str, status: int, type: str, retryable: bool):
        super().__init__(message, status=status, type=type)
        self.reason = reason
        self.retryable = retryable


class _NoPrefillInstance(Exception):
    pass


class PrefillFlow(Protocol):
    """What the prefill leg reads and sets of one attempt (pd_proxy._Flow)."""

    pd_request_id: str
    failed_prefills: list[Backend]  # instances that failed this client request: not asked again
    pending_prefill: Optional[Backend]  # the instance computing the prefill now, if any
    destination: "asyncio.Future[KVDestination]"  # the reservation, once decode made it

    def known_destination(self) -> Optional[KVDestination]: ...


class PrefillDispatcher:
    def __init__(self, prefill_pool: BackendPool, policy: RoutingPolicy, metrics: RouterMetrics):
        self.prefill_pool = prefill_pool
        self.policy = policy
        self.metrics = metrics
        self.config = prefill_pool.config

    async def prefill(self, flow: PrefillFlow, message: PrefillRequest, routing: RoutingInput) -> PrefillResult:
        """Into the flow's reservation (`message.destination`, or `flow.destination` once known);
        the client request's prefill instances that failed it (`flow.failed_prefills`, shared with
        later flows) are not asked again, and gain the ones that fail here."""
        failed_prefills = flow.failed_prefills
        timeout = self.config.pd_prefill_timeout_s
        attempts = 2 if self.config.pd_retry else 1
        tried: list[Backend] = list(failed_prefills)
        failure: Optional[PrefillFailed] = None
        for attempt in range(attempts):
            try:
                return await asyncio.wait_for(self._prefill_once(flow, message, routing, tried), timeout)
            except _NoPrefillInstance:
                if failure is not None:
                    raise failure from None  # nobody else to ask: the first failure is the answer
                raise PrefillFailed("no_instance", "no prefill instance is available to serve the request", 503,
                                    "service_unavailable", retryable=False) from None
            except asyncio.TimeoutError:
                failure = PrefillFailed("timeout", f"the prefill instance did not answer within {timeout:g} s", 504,
                                        "timeout", retryable=True)
            except PrefillFailed as failed:
                failure = failed
            self.metrics.pd_prefill_failures.labels(failure.reason).inc()
            if failure.retryable and tried:
                failed_prefills.append(tried[-1])
            if tried:
                logger.info("prefill of %s on %s failed: %s", message.pd_request_id, tried[-1].url, failure.message)
            if not failure.retryable or attempt + 1 == attempts:
                raise failure
            self.metrics.retries.labels("pd_prefill_" + failure.reason).inc()
        raise AssertionError("unreachable")

    async def _prefill_once(self, flow: PrefillFlow, message: PrefillRequest, routing: RoutingInput,
                            tried: list[Backend]) -> PrefillResult:
        choice = await self.policy.route(routing, exclude=tried)
        if choice is None:
            raise _NoPrefillInstance()
        backend = choice.backend
        tried.append(backend)
        long = self.policy.lanes.is_long(routing)
        ticket = self.policy.dispatch(choice, routing)
        self.metrics.routed.labels(backend.url, "long" if long else "short").inc()
        self.metrics.prompt_tokens.labels(backend.url).inc(routing.num_prompt_tokens)
        self.metrics.expected_hit_tokens.labels(backend.url).inc(choice.hit_tokens)
        payload = message.to_json()
        sender: Optional[asyncio.Task] = None
        if message.destination is None:
            known = flow.known_destination()
            if known is not None:  # a retry after the reservation came: it goes with the request
                payload["destination"] = known.to_json()
            else:
                sender = asyncio.ensure_future(self._send_destination(flow, backend))
        started = time.monotonic()
        flow.pending_prefill = backend
        try:
            async with self.prefill_pool.session.post(backend.url + PREFILL_PATH, json=payload) as reply:
                status, body = reply.status, await reply.read()
            flow.pending_prefill = None
        except CONNECTION_ERRORS as exc:
            flow.pending_prefill = None
            backend.mark_down(f"prefill connection failed ({type(exc).__name__}: {exc})")
            raise PrefillFailed("connection", "the prefill instance could not be reached", 503,
                                "service_unavailable", retryable=True) from exc
        finally:
            ticket.close()
            if sender is not None and not sender.done():
                sender.cancel()
        if status == 200:
            try:
                result = PrefillResult.from_json(json.loads(body))
            except ValueError as exc:
                raise PrefillFailed("bad_reply", f"the prefill instance's reply is invalid: {exc}", 502,
                                    "upstream_error", retryable=True) from exc
            self.metrics.pd_prefill_seconds.observe(time.monotonic() - started)
            self.metrics.pd_transferred_bytes.inc(result.transferred_bytes)
            return result
        error = upstream_error(status, body, "prefill")
        raise PrefillFailed(f"status_{status}", f"prefill failed: {error.message}", error.status, error.type,
                            retryable=error.status >= 500)

    async def _send_destination(self, flow: PrefillFlow, backend: Backend) -> None:
        """Once the reservation is known, tells the prefill instance computing it. A failure here
        shows in the prefill's own answer (400 for a refused destination, 504 for none)."""
        destination: KVDestination = await asyncio.shield(flow.destination)
        message = PrefillDestination(flow.pd_request_id, destination)
        try:
            async with self.prefill_pool.session.post(backend.url + DESTINATION_PATH, json=message.to_json()) as reply:
                if reply.status != 200:
                    logger.info("prefill %s on %s refused its destination: %s %s", flow.pd_request_id, backend.url,
                                reply.status, (await reply.read())[:200])
        except CONNECTION_ERRORS as exc:
            logger.info("sending the destination of %s to %s failed: %r", flow.pd_request_id, backend.url, exc)

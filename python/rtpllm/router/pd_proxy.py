"""Prefill-decode disaggregation, the router's side of the hand-off (rtpllm/pd/protocol.py).

One client request (completions or chat, streamed or not) becomes one reservation and one prefill:

    1. decode instance (`least_loaded_decode`) <- POST /internal/pd/decode (DecodeRequest);
       its stream's first event is the reservation (KVDestination), within `pd_reserve_timeout_s`
    2. prefill instance (the routing policy: cache-aware, lanes; pd_prefill.py) <- POST
       /internal/pd/prefill (PrefillRequest: the body and the reservation); answers PrefillResult
       within `pd_prefill_timeout_s`. With `pd_overlap` (the default) it is sent at the same time
       as 1., without the reservation, which follows in POST /internal/pd/prefill/destination as
       soon as decode's event brings it: the reservation leaves the critical path. Meanwhile:
    3. decode's stream goes to the client as it asked: SSE chunks as they come (the reservation
       event dropped), or the one response JSON.

Failure policy (each outcome counted: rtpllm_router:pd_requests{outcome} and the failure counters):
- decode fails before anything reached the client (connection, 503, reservation timeout, stream
  cut before its first output): the attempt is dropped (its connection closed, which frees the
  reservation; the prefill, if sent, cancelled: with overlap, its computing is lost) and the
  request tried on another decode instance, up to `max_retries` times, as colocated requests are;
- prefill fails (error status, connection, timeout): the client gets an OpenAI error and the decode
  connection is closed (decode frees the blocks); with `pd_retry`, a 5xx, connection failure or
  timeout is first retried once on another prefill instance, into the same reservation (which
  works while decode still waits: nothing was written yet);
- the reservation is lost before any output (decode's error event of type pd_transfer_failed: the
  prefill writing it died, or its KV did not come in time; or a prefill answering 409: the
  reservation already ended): with `pd_retry`, the request starts over once, with a new
  reservation (the same decode instance may take it) and a prefill instance that did not fail;
- an error event from decode before output (a bad request, decode's own KV wait timing out) is
  the client's answer, with its status;
- after output began, a broken decode stream ends with an error event and [DONE];
- a client that leaves closes both upstream connections: both instances abort and free blocks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import deque
from typing import AsyncIterator, Optional, Sequence

import aiohttp
from starlette.requests import Request
from starlette.responses import Response

from rtpllm.pd.protocol import DecodeRequest, KVDestination, PrefillRequest
from rtpllm.router.backend import Backend, BackendPool, Ticket
from rtpllm.router.metrics import RouterMetrics
from rtpllm.router.pd_errors import event_error, upstream_error
from rtpllm.router.pd_prefill import CONNECTION_ERRORS, PrefillDispatcher, PrefillFailed
from rtpllm.router.policy import RoutingInput, RoutingPolicy, least_loaded_decode
from rtpllm.router.sse import DONE, EventSplitter, event_data, event_json, is_done
from rtpllm.serving.errors import OpenAIError
from rtpllm.serving.sse_response import SSEResponse
from rtpllm.serving.streaming import ClientDisconnected, cancel_on_disconnect

logger = logging.getLogger(__name__)

DECODE_PATH = "/internal/pd/decode"
_DRAIN_S = 1.0  # how long a finished non-streamed reply's `[DONE]` is waited for (keeps the connection)


class _DecodeFailed(Exception):
    """Decode failed before any output reached the client: another decode instance may serve it."""

    def __init__(self, reason: str, error: Optional[OpenAIError] = None):
        super().__init__(reason)
        self.reason = reason
        self.error = error


class _ReservationLost(Exception):
    """The reservation ended before its KV arrived: with `pd_retry`, the request starts over once."""

    def __init__(self, error: OpenAIError):
        super().__init__(error.message)
        self.error = error


def _consume_result(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.debug("prefill after decode's output began: %r", task.exception())


class _Flow:
    """One attempt: a decode instance's reservation (its event stream) and the prefill task
    filling it. Owns both connections; `close()` ends them."""

    def __init__(self, decode: Backend, ticket: Ticket, failed_prefills: list[Backend], may_start_over: bool):
        self.decode = decode
        self.ticket = ticket
        self.failed_prefills = failed_prefills  # prefill instances that failed this client request (shared by its flows)
        self.may_start_over = may_start_over  # a lost reservation raises _ReservationLost (pd_retry, once)
        self.pending_prefill: Optional[Backend] = None  # the prefill instance writing it now, if any
        self.pd_request_id = f"pd-{uuid.uuid4().hex}"
        self.upstream: Optional[aiohttp.ClientResponse] = None
        self.splitter = EventSplitter()
        self.events: deque[bytes] = deque()
        self.prefill: Optional[asyncio.Task] = None
        # The reservation, for a prefill sent before it was known (overlap): set once it is.
        self.destination: "asyncio.Future[KVDestination]" = asyncio.get_running_loop().create_future()

    def known_destination(self) -> Optional[KVDestination]:
        done = self.destination.done() and not self.destination.cancelled()
        return self.destination.result() if done and self.destination.exception() is None else None

    async def next_event(self) -> Optional[bytes]:
        """Decode's next whole event; None when its stream ended. Raises on a broken connection."""
        while not self.events:
            data = await self.upstream.content.readany()
            if not data:
                return None
            self.events.extend(self.splitter.feed(data))
        return self.events.popleft()

    def take_buffered(self) -> list[bytes]:
        events = list(self.events)
        self.events.clear()
        return events

    def close(self, abort_prefill: bool = True) -> None:
        if self.prefill is not None and not self.prefill.done() and abort_prefill:
            self.prefill.cancel()  # closes its connection: the prefill instance aborts
        if self.upstream is not None:
            if self.upstream.content.at_eof():
                self.upstream.release()
            else:
                self.upstream.close()  # decode aborts the request and frees its blocks
            self.upstream = None
        self.ticket.close()
        if not self.destination.done():
            self.destination.cancel()


class PDProxy:
    def __init__(self, prefill_pool: BackendPool, decode_pool: BackendPool, policy: RoutingPolicy,
                 metrics: RouterMetrics):
        self.prefill_pool = prefill_pool
        self.decode_pool = decode_pool
        self.policy = policy
        self.metrics = metrics
        self.config = prefill_pool.config
        self.prefills = PrefillDispatcher(prefill_pool, policy, metrics)

    def outcome(self, name: str) -> None:
        self.metrics.pd_requests.labels(name).inc()

    async def forward(self, request: Request, path: str, body: bytes, routing: RoutingInput,
                      stream: bool) -> Response:
        endpoint = "chat" if path.endswith("/chat/completions") else "completions"
        try:
            client_body = json.loads(body)
        except ValueError:
            client_body = None
        if not isinstance(client_body, dict):
            self.outcome("bad_request")
            raise OpenAIError("request body must be a JSON object", status=400, code="invalid_json")
        tried: list[Backend] = []
        failed_prefills: list[Backend] = []
        started_over = False
        last: Optional[_DecodeFailed] = None
        attempts = 0
        while attempts <= self.config.max_retries:
            decode = least_loaded_decode([b for b in self.decode_pool.healthy() if b not in tried])
            if decode is None:
                break
            if last is not None:
                self.metrics.retries.labels("pd_decode_" + last.reason).inc()
                last = None
            flow = _Flow(decode, decode.admit(routing.num_prompt_tokens, long=False), failed_prefills,
                         may_start_over=self.config.pd_retry and not started_over)
            self.metrics.routed.labels(decode.url, "decode").inc()
            handed_over = False
            try:
                response = await cancel_on_disconnect(request, self._attempt(flow, endpoint, client_body, routing,
                                                                             stream))
                handed_over = isinstance(response, _PDStream)
                return response
            except _DecodeFailed as failed:
                logger.info("decode attempt on %s failed before output (%s)", decode.url, failed.reason)
                self.metrics.pd_decode_failures.labels(failed.reason).inc()
                tried.append(decode)
                last = failed
                attempts += 1
            except _ReservationLost as lost:  # not the decode instance's fault: it may take the new one
                logger.info("reservation %s lost before output (%s): starting over", flow.pd_request_id,
                            lost.error.message)
                if flow.pending_prefill is not None:  # still "writing" a reservation decode gave up on
                    failed_prefills.append(flow.pending_prefill)
                self.metrics.retries.labels("pd_reservation_lost").inc()
                started_over = True
            except ClientDisconnected:
                self.outcome("client_disconnected")
                raise
            except OpenAIError:
                raise  # its outcome was counted where it was raised
            except Exception:
                self.outcome("internal_error")
                raise
            finally:
                if not handed_over:
                    flow.close()
        self.outcome("decode_failed" if last is not None else "no_decode_instance")
        if last is not None and last.error is not None:
            raise last.error
        if last is not None:
            raise OpenAIError(f"the decode instances failed to take the request ({last.reason})", status=503,
                              type="service_unavailable")
        raise OpenAIError("no decode instance is available to serve the request", status=503,
                          type="service_unavailable")

    async def _attempt(self, flow: _Flow, endpoint: str, client_body: dict, routing: RoutingInput,
                       stream: bool) -> Response:
        started = time.monotonic()
        if self.config.pd_overlap:  # the prefill computes while decode reserves; the destination follows
            self._start_prefill(flow, PrefillRequest(flow.pd_request_id, endpoint, client_body), routing)
        destination = await self._reserve(flow, DecodeRequest(flow.pd_request_id, endpoint, client_body))
        self.metrics.pd_reserve_seconds.observe(time.monotonic() - started)
        flow.destination.set_result(destination)
        if not self.config.pd_overlap:
            self._start_prefill(flow, PrefillRequest(flow.pd_request_id, endpoint, client_body, destination), routing)
        first = await self._first_output(flow)
        flow.ticket.first_output()
        if stream:
            return _PDStream(self, flow, first)
        return await self._whole_response(flow, first)

    def _start_prefill(self, flow: _Flow, message: PrefillRequest, routing: RoutingInput) -> None:
        flow.prefill = asyncio.ensure_future(self.prefills.prefill(flow, message, routing))
        flow.prefill.add_done_callback(_consume_result)

    # -- 1. the reservation ------------------------------------------------------------------

    async def _reserve(self, flow: _Flow, message: DecodeRequest) -> KVDestination:
        try:
            return await asyncio.wait_for(self._reserve_unbounded(flow, message), self.config.pd_reserve_timeout_s)
        except asyncio.TimeoutError:
            raise _DecodeFailed("reserve_timeout") from None

    async def _reserve_unbounded(self, flow: _Flow, message: DecodeRequest) -> KVDestination:
        decode = flow.decode
        try:
            flow.upstream = await self.decode_pool.session.post(decode.url + DECODE_PATH, json=message.to_json())
        except CONNECTION_ERRORS as exc:
            decode.mark_down(f"connection failed ({type(exc).__name__}: {exc})")
            raise _DecodeFailed("connection") from exc
        upstream = flow.upstream
        if upstream.status != 200 or not upstream.headers.get("Content-Type", "").startswith("text/event-stream"):
            error = upstream_error(upstream.status if upstream.status != 200 else 502, await _read_or_empty(upstream),
                                    "decode")
            if upstream.status == 503:
                raise _DecodeFailed("503", error)
            self.outcome("decode_error")
            raise error
        try:
            event = await flow.next_event()
        except CONNECTION_ERRORS as exc:
            raise _DecodeFailed("connection") from exc
        if event is None:
            raise _DecodeFailed("connection")  # closed before reserving
        data = event_json(event)
        if isinstance(data, dict) and isinstance(data.get("error"), dict):
            error = event_error(data["error"])
            if error.status == 503:
                raise _DecodeFailed("503", error)
            self.outcome("decode_error")
            raise error
        try:
            if not isinstance(data, dict) or "pd_reserved" not in data:
                raise ValueError("the first event is not a reservation")
            destination = KVDestination.from_json(data["pd_reserved"], "pd_reserved")
            if destination.pd_request_id != flow.pd_request_id:
                raise ValueError("pd_reserved.pd_request_id: not this request's")
        except ValueError as exc:
            logger.warning("decode instance %s broke the protocol: %s", decode.url, exc)
            raise _DecodeFailed("bad_reply", OpenAIError(f"the decode instance's reply is invalid: {exc}",
                                                         status=502, type="upstream_error")) from exc
        return destination

    # -- 2. decode's output (the prefill: pd_prefill.py) -------------------------------------------------------------------

    async def _first_output(self, flow: _Flow) -> list[bytes]:
        """Decode's first output event and any read with it, watching the prefill meanwhile. Bounded:
        the prefill by its own timeout, then the first output by `pd_prefill_timeout_s` more."""
        loop = asyncio.get_running_loop()
        deadline: Optional[float] = None
        reading = asyncio.ensure_future(flow.next_event())
        try:
            while True:
                # A prefill that ended (overlapped, it may have failed before the reservation came):
                # its failure is the answer; its success starts the bound on decode's first output.
                if flow.prefill.done() and deadline is None:
                    failure = flow.prefill.exception()
                    if failure is not None:
                        self._raise_prefill_failure(flow, failure)
                    deadline = loop.time() + self.config.pd_prefill_timeout_s
                waits = {reading} if flow.prefill.done() else {reading, flow.prefill}
                timeout = None if deadline is None else max(0.0, deadline - loop.time())
                done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    raise _DecodeFailed("first_output_timeout")
                if reading not in done:
                    continue
                try:
                    event = reading.result()
                except CONNECTION_ERRORS as exc:
                    raise _DecodeFailed("stream_broken") from exc
                if event is None:
                    raise _DecodeFailed("stream_broken")
                data = event_json(event)
                if isinstance(data, dict) and isinstance(data.get("error"), dict):
                    # Decode ended the request (e.g. its wait for the KV timed out): a prefill error
                    # that arrived meanwhile says more about why.
                    failure = flow.prefill.exception() if flow.prefill.done() else None
                    if failure is not None:
                        self._raise_prefill_failure(flow, failure)
                    error = event_error(data["error"])
                    if flow.may_start_over and error.type == "pd_transfer_failed":
                        raise _ReservationLost(error)
                    self.outcome("decode_error")
                    raise error
                if is_done(event):
                    raise _DecodeFailed("bad_reply", OpenAIError("the decode instance ended without output",
                                                                 status=502, type="upstream_error"))
                if data is None or (isinstance(data, dict) and "pd_reserved" in data):
                    reading = asyncio.ensure_future(flow.next_event())  # a comment or a repeated reservation
                    continue
                return [event] + flow.take_buffered()
        finally:
            if not reading.done():
                reading.cancel()

    def _raise_prefill_failure(self, flow: _Flow, failure: BaseException) -> None:
        # 409: the prefill found the reservation gone (decode ended it: the KV it waited for failed).
        if flow.may_start_over and isinstance(failure, PrefillFailed) and failure.status == 409:
            raise _ReservationLost(failure)
        self.outcome("prefill_failed")
        raise failure

    async def _whole_response(self, flow: _Flow, first: list[bytes]) -> Response:
        payload = event_data(first[0])
        try:
            await asyncio.wait_for(_drain(flow), _DRAIN_S)  # to [DONE]: the connection is reused
        except (asyncio.TimeoutError, *CONNECTION_ERRORS):
            pass  # the reply is whole; close() closes the connection
        flow.close(abort_prefill=False)
        self.outcome("ok")
        return Response(payload, status_code=200, media_type="application/json")


async def _drain(flow: _Flow) -> None:
    while await flow.next_event() is not None:
        pass


async def _read_or_empty(upstream: aiohttp.ClientResponse) -> bytes:
    try:
        return await upstream.read()
    except CONNECTION_ERRORS:
        return b""


class _PDStream(SSEResponse):
    """Decode's stream after its first output, relayed event by event; closing it (however it
    ends) closes the decode connection and, unless the stream finished, the prefill's too."""

    def __init__(self, proxy: PDProxy, flow: _Flow, first: Sequence[bytes]):
        self.proxy = proxy
        self.flow = flow
        self.result = "client_disconnected"  # until the relay reaches an end
        self.errored = False  # decode sent an error event
        super().__init__(self._relay(list(first)), on_close=self._close)

    def _batch(self, events: list[bytes]) -> tuple[bytes, bool]:
        """The events up to and including [DONE], joined; whether [DONE] was among them. Sets the
        result before the chunk goes out: the response stops iterating after a [DONE] chunk."""
        for i, event in enumerate(events):
            if event.startswith(b'data: {"error"'):
                self.errored = True
            if is_done(event):
                self.result = "decode_error" if self.errored else "ok"
                return b"".join(events[:i + 1]), True
        return b"".join(events), False

    async def _relay(self, first: list[bytes]) -> AsyncIterator[bytes]:
        chunk, finished = self._batch(first)
        yield chunk
        if finished:
            return
        upstream = self.flow.upstream
        try:
            while True:
                data = await upstream.content.readany()
                if not data:
                    break
                events = self.flow.splitter.feed(data)
                if events:
                    chunk, finished = self._batch(events)
                    yield chunk
                    if finished:
                        return
        except CONNECTION_ERRORS as exc:
            logger.info("decode stream of %s broke off: %r", self.flow.pd_request_id, exc)
        # The status line went out long ago: the error can only travel in the stream.
        self.result = "stream_broken"
        error = OpenAIError("the decode instance's stream broke off", status=502, type="upstream_error")
        yield b"data: " + error.body().model_dump_json().encode() + b"\n\n" + DONE

    def _close(self) -> None:
        self.flow.close(abort_prefill=self.result != "ok")
        if self.result == "stream_broken":
            self.proxy.metrics.pd_decode_failures.labels("stream_broken_after_output").inc()
        self.proxy.outcome(self.result)

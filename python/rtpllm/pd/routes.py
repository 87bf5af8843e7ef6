"""The instance side of the PD hand-off (protocol.py): POST /internal/pd/decode, /internal/pd/prefill
and /internal/pd/prefill/destination.

Both endpoints reuse the OpenAI handlers (completions.py, chat.py) unchanged, so that a PD request
is tokenized, validated and answered exactly as `/v1/<endpoint>` would: they see the engine through
`_PDEngineView`, which adds the PD parameters (`SamplingParams.kv_transfer_params`) to the one
request the handler submits.

    decode:  the handler runs as a task; its request's reservation (KVDestination) is read from
             the engine once it accepted the request and sent as the first event; the handler's
             own events (stream) or its JSON (stream: false, as one event) follow. A request whose
             KV never arrives ends with an error event (from the engine's reason), not a finish
             reason.
    prefill: the handler runs with max_tokens 1 and stream off; once the engine reports every
             write final, the answer is a PrefillResult, or 503/504 with the reason. Sent without a
             destination, it computes at once; the destination comes in its own call.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import functools
import json
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Optional

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response

from rtpllm.pd.decode_side import QUEUED
from rtpllm.pd.engine_side import (pd_decode_failure, pd_prefill_destination, pd_prefill_outcome, pd_reservation,
                                   pd_role)
from rtpllm.pd.kv_params import DecodeKV, PrefillKV
from rtpllm.pd.protocol import DecodeRequest, PrefillDestination, PrefillRequest, PrefillResult
from rtpllm.serving.chat import create_chat_completion
from rtpllm.serving.completions import create_completion
from rtpllm.serving.errors import OpenAIError, bad_request, from_validation_error, to_openai_error
from rtpllm.serving.protocol import ChatCompletionRequest, CompletionRequest
from rtpllm.serving.sse_response import SSEResponse
from rtpllm.serving.streaming import SSE_DONE, error_event

if TYPE_CHECKING:
    from rtpllm.engine.async_engine import AsyncEngineBase
    from rtpllm.serving.context import ServingContext

_HANDLERS = {"completions": (CompletionRequest, create_completion), "chat": (ChatCompletionRequest, create_chat_completion)}
_OUTCOME_POLL_S = 0.002
_RESERVATION_POLL_S = 0.005


class PDTransferError(OpenAIError):
    def __init__(self, message: str, status: int = 503):
        super().__init__(message, status=status, type="pd_transfer_failed", code="pd_transfer_failed")


class _PDEngineView:
    """The engine as the OpenAI handlers see it, adding `kv` to the one request they submit."""

    def __init__(self, engine: "AsyncEngineBase", kv: Any, prefill: bool):
        self._engine = engine
        self._kv = kv
        self.client_pd_request_id = kv.pd_request_id
        self._prefill = prefill
        self.request_id: Optional[str] = None
        self.accepted: Optional[asyncio.Future] = None
        self.reserved: Optional[asyncio.Future] = None  # decode: pd_reservation, read right after the add
        self.added = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def add_request(self, request_id, prompt, params, arrival_time=None, stream=True):
        if self.request_id is not None:
            raise bad_request("prompt: prefill-decode serves one prompt per request", param="prompt")
        if params.prompt_logprobs is not None:  # every prompt position's: they would stay on the prefill side
            raise bad_request("prompt_logprobs: not supported with prefill-decode disaggregation",
                              param="prompt_logprobs")
        changes: dict = {"kv_transfer_params": self._kv}
        if self._prefill:  # one token, sampled as the request asks; stops are decode's business
            # n > 1: the prompt is computed once, for sample 0; decode starts the others from its KV.
            changes.update(max_tokens=1, min_tokens=min(params.min_tokens, 1), stop=None, n=1)
        params = dataclasses.replace(params, **changes)
        self.request_id = request_id
        # Decode: the reservation is read by a call that reaches the engine with the add and runs
        # right after it, answered before the engine steps on (no second round trip, no step).
        with self._engine.commands_together():
            self.accepted = self._engine.add_request(request_id, prompt, params, arrival_time, stream)
            if not self._prefill:
                self.reserved = self._engine.submit_call(functools.partial(pd_reservation, request_id))
                self.reserved.add_done_callback(_retrieved)  # read only while the handler lives
        self.added.set()
        return self.accepted


def _retrieved(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()  # marks an error as seen: the add's own answer reports it


async def _parse(request: Request, kind) -> Any:
    raw = await request.body()
    try:
        return kind.from_json(json.loads(raw))
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(str(exc)) from exc


def _client_body(endpoint: str, body: dict, **changes) -> Any:
    model, _ = _HANDLERS[endpoint]
    try:
        return model.model_validate({**body, **changes})
    except ValidationError as exc:
        raise from_validation_error(exc) from exc


async def _check_role(engine: "AsyncEngineBase", state, wanted: str) -> None:
    if getattr(state, "pd_role", None) is None:
        state.pd_role = await engine.call_in_engine_thread(pd_role)
    if state.pd_role != wanted:
        raise OpenAIError(f"role: this instance's role is {state.pd_role!r}; /internal/pd/{wanted} needs a "
                          f"{wanted} instance (rtpllm serve --role {wanted})", status=400, param="role")


def add_pd_routes(app: FastAPI, ctx: "ServingContext") -> None:
    engine = ctx.engine

    @app.post("/internal/pd/decode")
    async def pd_decode(request: Request) -> Response:
        arrival_time = time.monotonic()
        try:
            body = await _parse(request, DecodeRequest)
            await _check_role(engine, app.state, "decode")
            client = _client_body(body.endpoint, body.request)
        except Exception as exc:  # noqa: BLE001 - answered as an error body
            return to_openai_error(exc).response()
        view = _PDEngineView(engine, DecodeKV(body.pd_request_id), prefill=False)
        sub = copy.copy(ctx)
        sub.engine = view
        handler = _HANDLERS[body.endpoint][1]
        task = asyncio.ensure_future(handler(sub, request, client, arrival_time))
        try:
            destination = await _reservation(engine, view, task)
        except BaseException as exc:  # noqa: BLE001 - no reservation: the error, with its status, as one event
            _abort(engine, view, task)
            if not isinstance(exc, Exception):
                raise
            error = to_openai_error(exc)
            return Response(error_event(error) + SSE_DONE, status_code=error.status, media_type="text/event-stream",
                            headers=error.headers or None)
        events = _decode_events(engine, task, destination, body.pd_request_id, bool(client.stream))
        return SSEResponse(events, on_close=functools.partial(_abort, engine, view, task))

    @app.post("/internal/pd/prefill")
    async def pd_prefill(request: Request) -> Response:
        arrival_time = time.monotonic()
        try:
            body = await _parse(request, PrefillRequest)
            await _check_role(engine, app.state, "prefill")
            client = _client_body(body.endpoint, body.request, stream=False)
            view = _PDEngineView(engine, PrefillKV(body.pd_request_id, body.destination), prefill=True)
            sub = copy.copy(ctx)
            sub.engine = view
            response = await _HANDLERS[body.endpoint][1](sub, request, client, arrival_time)
            if response.status_code >= 400 or view.request_id is None:
                return response
            outcome = await _prefill_outcome(engine, body.pd_request_id)
            if not outcome.ok and outcome.status == 400:  # the destination, checked once connected
                raise bad_request(outcome.error, param="destination")
            if not outcome.ok:
                raise PDTransferError(outcome.error, outcome.status)
            result = PrefillResult(pd_request_id=body.pd_request_id, prompt_tokens=outcome.prompt_tokens,
                                   first_token=outcome.first_token, transferred_blocks=outcome.transferred_blocks,
                                   transferred_bytes=outcome.transferred_bytes, prefill_s=outcome.prefill_s,
                                   transfer_s=outcome.transfer_s, last_write_s=outcome.last_write_s)
            return JSONResponse(result.to_json())
        except Exception as exc:  # noqa: BLE001 - answered as an error body
            return to_openai_error(exc).response()


    @app.post("/internal/pd/prefill/destination")
    async def pd_destination(request: Request) -> Response:
        try:
            body = await _parse(request, PrefillDestination)
            await _check_role(engine, app.state, "prefill")
            found = await engine.call_in_engine_thread(
                functools.partial(pd_prefill_destination, body.pd_request_id, body.destination.to_json()))
            if not found:
                raise OpenAIError(f"pd_request_id: no prefill {body.pd_request_id!r} in flight on this instance",
                                  status=404, type="not_found_error", param="pd_request_id")
            return JSONResponse({})
        except ValueError as exc:
            return bad_request(str(exc), param="destination").response()
        except Exception as exc:  # noqa: BLE001 - answered as an error body
            return to_openai_error(exc).response()


async def _prefill_outcome(engine: "AsyncEngineBase", pd_request_id: str):
    # The engine bounds every write (pd_timeout_s each) and ends the request on its own: this only
    # waits for its verdict.
    while True:
        outcome = await engine.call_in_engine_thread(functools.partial(pd_prefill_outcome, pd_request_id))
        if outcome is not None:
            return outcome
        await asyncio.sleep(_OUTCOME_POLL_S)


def _abort(engine: "AsyncEngineBase", view: _PDEngineView, task: asyncio.Future) -> None:
    task.cancel()
    if view.request_id is not None:
        engine.abort(view.request_id)


def _sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def _decode_events(engine: "AsyncEngineBase", task: asyncio.Future, destination: dict, pd_request_id: str,
                         stream: bool) -> AsyncIterator[bytes]:
    yield _sse({"pd_reserved": destination})
    try:
        response = await task
    except Exception as exc:  # noqa: BLE001
        yield error_event(await _decode_error(engine, pd_request_id, exc)) + SSE_DONE
        return
    if not stream:
        if response.status_code >= 400 or b'"finish_reason":"error"' in response.body:
            yield error_event(await _decode_error(engine, pd_request_id, None, response)) + SSE_DONE
        else:
            yield b"data: " + response.body + b"\n\n" + SSE_DONE
        return
    async for chunk in response.body_iterator:
        if b'"finish_reason":"error"' in chunk:  # the KV never came: an error event, not a finish reason
            yield error_event(await _decode_error(engine, pd_request_id, None)) + SSE_DONE
            return
        yield chunk


async def _reservation(engine: "AsyncEngineBase", view: _PDEngineView, task: asyncio.Future) -> dict:
    added = asyncio.ensure_future(view.added.wait())  # the handler validates and tokenizes first
    try:
        await asyncio.wait({added, task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        added.cancel()
    if view.accepted is None:
        raise _error_from_response(task.result())
    try:
        destination = await view.reserved
    except Exception:  # noqa: BLE001 - the engine died or refused: accepted says why, below
        destination = None
    if isinstance(destination, dict):
        return destination  # NOTE: the usual case: reserved as the engine took the request
    # Queued for room, refused, or not taken yet (an add the engine holds while its tokenizer loads
    # runs after the call): the add's answer, then the reservation once there is one.
    await asyncio.wait({view.accepted, task}, return_when=asyncio.FIRST_COMPLETED)
    if not view.accepted.done():
        response = task.result()  # a streaming handler returns at once; others only on an error
        if response.status_code >= 400:
            raise _error_from_response(response)
        await asyncio.wait({view.accepted})
    view.accepted.result()  # the engine's refusal (no room: 503; bad input: 400)
    while True:  # queued while the pool has no room for the prompt (bounded by pd_timeout_s)
        destination = await engine.call_in_engine_thread(functools.partial(pd_reservation, view.request_id))
        if destination != QUEUED:
            break
        if task.done() and task.result().status_code >= 400:
            raise _error_from_response(task.result())
        await asyncio.sleep(_RESERVATION_POLL_S)
    if destination is None:
        why = await engine.call_in_engine_thread(functools.partial(pd_decode_failure, view.client_pd_request_id))
        raise PDTransferError(why or "the request ended before its reservation could be read")
    return destination


def _error_from_response(response: Response) -> OpenAIError:
    try:
        error = json.loads(response.body)["error"]
        return OpenAIError(error["message"], status=response.status_code, type=error.get("type", "invalid_request_error"),
                           param=error.get("param"), code=error.get("code"))
    except (ValueError, KeyError, TypeError, AttributeError):
        return OpenAIError("the request failed", status=getattr(response, "status_code", 500))


async def _decode_error(engine: "AsyncEngineBase", pd_request_id: str, exc: Optional[BaseException],
                        response: Optional[Response] = None) -> BaseException:
    if response is not None and response.status_code >= 400:
        return _error_from_response(response)
    why = await engine.call_in_engine_thread(functools.partial(pd_decode_failure, pd_request_id))
    if why is not None:
        return PDTransferError(why, 504 if "within" in why else 503)
    return exc if exc is not None else PDTransferError("the request ended with an error")

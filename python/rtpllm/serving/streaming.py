"""What streaming and non-streaming handlers share: SSE framing, fan-in of several request
streams, and abort-on-disconnect.

Disconnects: for a streaming reply, SSEResponse watches the connection (ASGI spec < 2.4, as uvicorn
speaks) and stops when the client goes away; AbortingStreamingResponse then aborts the requests,
which frees their KV blocks at the next step. A non-streaming reply has nobody
watching, so `cancel_on_disconnect` races the work against the connection's `http.disconnect`.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Awaitable, Optional, TypeVar

from pydantic import BaseModel
from starlette.requests import Request

from rtpllm.engine.async_engine import AsyncEngine, RequestStream
from rtpllm.outputs import RequestOutput
from rtpllm.serving.errors import from_value_error, to_openai_error
from rtpllm.serving.sse_response import SSE_DONE, SSEResponse  # noqa: F401 - SSE_DONE re-exported for the handlers

T = TypeVar("T")


def sse_event(payload: BaseModel) -> bytes:
    return b"data: " + payload.model_dump_json(exclude_none=True).encode() + b"\n\n"


def error_event(error: BaseException) -> bytes:
    """An error after the 200 status line went out can only be reported inside the stream."""
    return b"data: " + to_openai_error(error).body().model_dump_json().encode() + b"\n\n"


class ClientDisconnected(Exception):
    """The client closed the connection before the reply was ready."""


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Runs `work`, cancelling it (its cleanup aborts the requests) if the client disconnects first.

    Call after the body has been read: the watcher consumes the connection's ASGI messages.
    """
    work_task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait((work_task, watcher), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work_task.cancel()
        raise
    finally:
        watcher.cancel()
    if work_task.done():
        return work_task.result()
    work_task.cancel()
    try:
        await work_task
    except asyncio.CancelledError:
        pass
    raise ClientDisconnected()


def submit_all(engine: AsyncEngine, request_ids: list[str], prompts: list[list[int]], params_list: list,
               arrival_time: float, stream: bool) -> list[asyncio.Future]:
    """Queues every prompt of a request, or none: admission errors (a full queue, a stopped engine)
    raise here, at once, after aborting the prompts already queued. Returns the futures of their
    streams. Without `stream` the engine reports each request only once, finished."""
    futures: list[asyncio.Future] = []
    try:
        for request_id, prompt, params in zip(request_ids, prompts, params_list):
            futures.append(engine.add_request(request_id, prompt, params, arrival_time, stream))
    except BaseException:
        for future in futures:
            future.cancel()  # which aborts its request
        raise
    return futures


async def accepted_streams(futures: list[asyncio.Future]) -> list[RequestStream]:
    """The streams once the engine accepted every request; an engine-side rejection is a 400 naming
    the field, and cancels the rest."""
    try:
        return [await future for future in futures]
    except BaseException as exc:
        for future in futures:
            future.cancel()
        if isinstance(exc, ValueError):
            raise from_value_error(exc, default_param="prompt") from exc
        raise


class AbortingStreamingResponse(SSEResponse):
    """A server-sent-events response that aborts its requests whenever it ends: finished (a no-op),
    failed, or cut short by the client, even before the body iterator ever started."""

    def __init__(self, content: AsyncIterator[bytes], engine: AsyncEngine, request_ids: list[str]):
        super().__init__(content, on_close=lambda: _abort_all(engine, request_ids))


def _abort_all(engine: AsyncEngine, request_ids: list[str]) -> None:
    for request_id in request_ids:
        engine.abort(request_id)


async def iterate_all(engine: AsyncEngine, streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Yields (prompt index, output) from all streams as outputs arrive; aborts the unfinished ones
    if the consumer stops early (a disconnect) or a stream fails."""
    unfinished = {stream.request_id for stream in streams}
    try:
        if len(streams) == 1:  # the common case, without the fan-in tasks
            async for output in streams[0]:
                if output.finished:
                    unfinished.discard(output.request_id)
                yield 0, output
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, stream: RequestStream) -> None:
            try:
                async for output in stream:
                    queue.put_nowait((index, output, None))
            except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer
                queue.put_nowait((index, None, exc))

        pumps = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
        try:
            while unfinished:
                index, output, error = await queue.get()
                if error is not None:
                    raise error
                if output.finished:
                    unfinished.discard(output.request_id)
                yield index, output
        finally:
            for task in pumps:
                task.cancel()
    finally:
        for request_id in unfinished:
            engine.abort(request_id)


async def final_outputs(engine: AsyncEngine, futures: list[asyncio.Future]) -> list[RequestOutput]:
    """Waits for every request to finish; the last output of each, in prompt order."""
    streams = await accepted_streams(futures)
    finals: list[Optional[RequestOutput]] = [None] * len(streams)
    async for index, output in iterate_all(engine, streams):
        finals[index] = output
    return finals


class ChoiceDelta:
    __slots__ = ("text", "token_ids", "logprobs", "text_offset", "finish_reason", "stop_reason")

    def __init__(self, text, token_ids, logprobs, text_offset, finish_reason, stop_reason):
        self.text = text
        self.token_ids = token_ids
        self.logprobs = logprobs
        self.text_offset = text_offset  # where `text` starts in the choice's full text
        self.finish_reason = finish_reason
        self.stop_reason = stop_reason


class DeltaTracker:
    """Turns cumulative outputs into what each choice gained since its last chunk.

    A request's output lists all `n` of its sequences every time, including those that finished
    earlier, so a choice is reported finished exactly once.
    """

    def __init__(self, num_choices: int, with_logprobs: bool):
        self._text_sent = [0] * num_choices
        self._tokens_sent = [0] * num_choices
        self._done = [False] * num_choices
        self._with_logprobs = with_logprobs

    def delta(self, choice_index: int, completion) -> Optional[ChoiceDelta]:
        if self._done[choice_index]:
            return None
        text_start, token_start = self._text_sent[choice_index], self._tokens_sent[choice_index]
        text = completion.text[text_start:]
        token_ids = completion.token_ids[token_start:]
        finished = completion.finish_reason is not None
        # A token whose text is held back (a partial UTF-8 character or a possible stop string) still
        # makes a chunk, with empty text, so clients see every step and time the first token truly.
        if not text and not token_ids and not finished:
            return None
        logprobs = None
        if self._with_logprobs and completion.logprobs is not None:
            logprobs = completion.logprobs[token_start:token_start + len(token_ids)]
        self._text_sent[choice_index] = len(completion.text)
        self._tokens_sent[choice_index] = len(completion.token_ids)
        self._done[choice_index] = finished
        return ChoiceDelta(text, token_ids, logprobs, text_start, completion.finish_reason,
                           completion.stop_reason)

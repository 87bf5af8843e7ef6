"""POST /v1/chat/completions: the conversation goes through the model's chat template; `n`
choices, streamed (content deltas, the first of each choice carrying its role) or not."""

from __future__ import annotations

import time
import uuid
from typing import AsyncIterator, Optional

from fastapi.responses import JSONResponse
from starlette.requests import Request
from starlette.responses import Response

from rtpllm.outputs import RequestOutput
from rtpllm.serving import request_params as rp
from rtpllm.serving.context import ServingContext
from rtpllm.serving.logprobs import chat_logprobs
from rtpllm.serving.protocol import (ChatChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
                                     ChatDelta, ChatResponseMessage, ChatStreamChoice, UsageInfo)
from rtpllm.serving.sse_chunks import ChatChunks
from rtpllm.serving.streaming import (SSE_DONE, AbortingStreamingResponse, DeltaTracker, accepted_streams,
                                      cancel_on_disconnect, error_event, final_outputs, iterate_all, sse_event,
                                      submit_all)


async def create_chat_completion(ctx: ServingContext, http_request: Request, body: ChatCompletionRequest,
                                 arrival_time: float) -> Response:
    rp.check_model(body.model, ctx.model_name)
    num_top = rp.chat_logprobs_count(body)
    rp.check_stops(body, ctx.vocab_size)
    prompt = await rp.chat_prompt(body, ctx.renderer)
    requested, param = rp.chat_max_tokens(body)
    max_new = rp.max_new_tokens(requested, len(prompt), ctx.max_model_len, param, prompt_param="messages")
    rp.check_request_size(body, 1, [max_new], ctx.limits)
    params = rp.sampling_params(body, max_new, num_top)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    futures = submit_all(ctx.engine, [completion_id], [prompt], [params], arrival_time, body.stream)
    if body.stream:
        # Returned before the engine has even accepted the request: the status line and headers go
        # out while the first step runs.
        return AbortingStreamingResponse(_stream(ctx, body, completion_id, futures, len(prompt), num_top),
                                         ctx.engine, [completion_id])
    (final,) = await cancel_on_disconnect(http_request, final_outputs(ctx.engine, futures))
    choices = []
    for completion in final.outputs:
        logprobs = None
        if num_top is not None and completion.logprobs is not None:
            logprobs = chat_logprobs(ctx.token_texts, completion.token_ids, completion.logprobs, num_top)
        choices.append(ChatChoice(index=completion.index, message=ChatResponseMessage(content=completion.text),
                                  logprobs=logprobs, finish_reason=completion.finish_reason,
                                  stop_reason=completion.stop_reason))
    response = ChatCompletionResponse(id=completion_id, model=ctx.model_name, choices=choices,
                                      usage=_usage(len(prompt), final))
    return JSONResponse(response.model_dump(exclude_none=True))


def _usage(prompt_tokens: int, output: Optional[RequestOutput]) -> UsageInfo:
    completion_tokens = sum(len(c.token_ids) for c in output.outputs) if output is not None else 0
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)


async def _stream(ctx: ServingContext, body: ChatCompletionRequest, completion_id: str, futures,
                  prompt_tokens: int, num_top: Optional[int]) -> AsyncIterator[bytes]:
    created = int(time.time())
    chunks = ChatChunks(completion_id, created, ctx.model_name)

    def chunk(choices: list[ChatStreamChoice], usage: Optional[UsageInfo] = None) -> bytes:
        return sse_event(ChatCompletionChunk(id=completion_id, created=created, model=ctx.model_name,
                                             choices=choices, usage=usage))

    tracker = DeltaTracker(body.n, with_logprobs=num_top is not None)
    latest: Optional[RequestOutput] = None
    # The role rides on each choice's first delta, sent with its first token, so that the first
    # chunk a client sees marks the first token (as benchmark clients time it).
    role_pending = set(range(body.n))
    # One chunk (one write) per engine output; the last output's events go out with the usage and
    # [DONE], so that a finished reply costs one write.
    tail = b""
    try:
        streams = await accepted_streams(futures)
        async for _, output in iterate_all(ctx.engine, streams):
            latest = output
            events = []
            for completion in output.outputs:
                delta = tracker.delta(completion.index, completion)
                if delta is None:
                    continue
                role = None
                if completion.index in role_pending:
                    role_pending.discard(completion.index)
                    role = "assistant"
                if delta.logprobs is None:
                    events.append(chunks.event(completion.index, role, delta.text, delta.finish_reason,
                                               delta.stop_reason))
                    continue
                logprobs = chat_logprobs(ctx.token_texts, delta.token_ids, delta.logprobs, num_top)
                events.append(chunk([ChatStreamChoice(index=completion.index,
                                                      delta=ChatDelta(role=role, content=delta.text),
                                                      logprobs=logprobs, finish_reason=delta.finish_reason,
                                                      stop_reason=delta.stop_reason)]))
            if output.finished:
                tail = b"".join(events)
            elif events:
                yield b"".join(events)
        if body.include_usage_in_stream:
            usage = _usage(prompt_tokens, latest)
            tail += chunks.usage_event(usage.prompt_tokens, usage.completion_tokens)
    except Exception as exc:  # noqa: BLE001 - the status line is sent; the error goes in the stream
        tail += error_event(exc)
    yield tail + SSE_DONE

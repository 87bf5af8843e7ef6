"""POST /v1/completions: one prompt or a batch, `n` choices each, streamed or not.

Choice `i` of prompt `p` is reported as index `p * n + i`, as OpenAI does for batched prompts.
"""

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
from rtpllm.serving.logprobs import completion_logprobs
from rtpllm.serving.protocol import CompletionChoice, CompletionRequest, CompletionResponse, UsageInfo
from rtpllm.serving.sse_chunks import CompletionChunks
from rtpllm.serving.streaming import (SSE_DONE, AbortingStreamingResponse, DeltaTracker, accepted_streams,
                                      cancel_on_disconnect, error_event, final_outputs, iterate_all, sse_event,
                                      submit_all)


async def create_completion(ctx: ServingContext, http_request: Request, body: CompletionRequest,
                            arrival_time: float) -> Response:
    rp.check_model(body.model, ctx.model_name)
    num_top = rp.completion_logprobs_count(body)
    rp.check_stops(body, ctx.vocab_size)
    prompts = await rp.completion_prompts(body, ctx.renderer, ctx.vocab_size, ctx.max_model_len, ctx.limits)
    max_new = [rp.max_new_tokens(body.max_tokens, len(p), ctx.max_model_len) for p in prompts]
    rp.check_request_size(body, len(prompts), max_new, ctx.limits)
    params_list = [rp.sampling_params(body, tokens, num_top) for tokens in max_new]
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    request_ids = [f"{completion_id}-{i}" for i in range(len(prompts))]
    echo_texts = [await ctx.renderer.decode(p, skip_special_tokens=True) if body.echo else "" for p in prompts]
    futures = submit_all(ctx.engine, request_ids, prompts, params_list, arrival_time, body.stream)
    if body.stream:
        # Returned before the engine has even accepted the requests: the status line and headers
        # go out while the first step runs.
        events = _stream(ctx, body, completion_id, futures, prompts, echo_texts, num_top)
        return AbortingStreamingResponse(events, ctx.engine, request_ids)
    finals = await cancel_on_disconnect(http_request, final_outputs(ctx.engine, futures))
    response = CompletionResponse(
        id=completion_id, model=ctx.model_name,
        choices=[_full_choice(ctx, body.n * p + c.index, c, echo_texts[p], num_top)
                 for p, output in enumerate(finals) for c in output.outputs],
        usage=_usage(prompts, finals))
    return JSONResponse(response.model_dump(exclude_none=True))


def _full_choice(ctx: ServingContext, index: int, completion, echo_text: str,
                 num_top: Optional[int]) -> CompletionChoice:
    logprobs = None
    if num_top is not None and completion.logprobs is not None:
        logprobs = completion_logprobs(ctx.token_texts, completion.token_ids, completion.logprobs, num_top, 0)
    return CompletionChoice(index=index, text=echo_text + completion.text, logprobs=logprobs,
                            finish_reason=completion.finish_reason, stop_reason=completion.stop_reason)


def _usage(prompts: list[list[int]], outputs: list[Optional[RequestOutput]]) -> UsageInfo:
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(len(c.token_ids) for output in outputs if output is not None for c in output.outputs)
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)


async def _stream(ctx: ServingContext, body: CompletionRequest, completion_id: str, futures,
                  prompts: list[list[int]], echo_texts: list[str], num_top: Optional[int]) -> AsyncIterator[bytes]:
    created = int(time.time())
    chunks = CompletionChunks(completion_id, created, ctx.model_name)
    tracker = DeltaTracker(len(prompts) * body.n, with_logprobs=num_top is not None)
    latest: list[Optional[RequestOutput]] = [None] * len(prompts)
    echo_pending = {p * body.n + i for p in range(len(prompts)) for i in range(body.n)} if body.echo else set()
    unfinished = len(prompts)
    # One chunk (one write) per engine output; the last output's events go out with the usage and
    # [DONE], so that a finished reply costs one write.
    tail = b""
    try:
        streams = await accepted_streams(futures)
        async for prompt_index, output in iterate_all(ctx.engine, streams):
            latest[prompt_index] = output
            events = []
            for completion in output.outputs:
                index = body.n * prompt_index + completion.index
                delta = tracker.delta(index, completion)
                if delta is None:
                    continue
                text = delta.text
                if index in echo_pending:
                    echo_pending.discard(index)
                    text = echo_texts[prompt_index] + text
                if delta.logprobs is None:
                    events.append(chunks.event(index, text, delta.finish_reason, delta.stop_reason))
                    continue
                logprobs = completion_logprobs(ctx.token_texts, delta.token_ids, delta.logprobs, num_top,
                                               delta.text_offset)
                events.append(sse_event(CompletionResponse(
                    id=completion_id, created=created, model=ctx.model_name,
                    choices=[CompletionChoice(index=index, text=text, logprobs=logprobs,
                                              finish_reason=delta.finish_reason, stop_reason=delta.stop_reason)])))
            unfinished -= output.finished
            if unfinished == 0:
                tail = b"".join(events)
            elif events:
                yield b"".join(events)
        if body.include_usage_in_stream:
            usage = _usage(prompts, latest)
            tail += chunks.usage_event(usage.prompt_tokens, usage.completion_tokens)
    except Exception as exc:  # noqa: BLE001 - the status line is sent; the error goes in the stream
        tail += error_event(exc)
    yield tail + SSE_DONE

"""One request's outputs on their way from the engine to the task serving the request, and the
token timings (time to first token, inter-token latency) the server's metrics take from them."""

from __future__ import annotations

import asyncio
from typing import Optional

from rtpllm.outputs import RequestOutput


class RequestStream:
    """One request's outputs, handed from the engine's step loop to the task serving the request.

    Outputs are cumulative (full text and token ids so far), so when the consumer falls behind only
    the newest one matters: a slow client gets fewer, larger deltas instead of a growing backlog.
    With `stream_interval` N > 1 the consumer is woken for the first token, then once per N new
    tokens, and at the end, trading streaming granularity for less per-token work in the server.
    Iteration ends after the output whose `finished` is True.
    """

    def __init__(self, request_id: str, stream_interval: int = 1):
        self.request_id = request_id
        self.stream_interval = stream_interval
        self._latest: Optional[RequestOutput] = None
        self._error: Optional[BaseException] = None
        # One consumer, so one waiter: a bare future is cheaper than an asyncio.Event, whose set()
        # and wait() ran for every token of every stream.
        self._ready = False
        self._waiter: Optional[asyncio.Future] = None
        self._done = False
        self._tokens_at_wake = 0
        # What the step observer needs to turn cumulative outputs into inter-token latencies.
        self.tokens_seen: list[int] = []  # per sequence index
        self.last_token_time: Optional[float] = None

    def put(self, output: RequestOutput, num_tokens: int) -> None:
        """Stores the newest output; `num_tokens` is its token count over all sequences."""
        self._latest = output
        if (output.finished or self._tokens_at_wake == 0
                or num_tokens - self._tokens_at_wake >= self.stream_interval):
            self._tokens_at_wake = num_tokens
            self._wake()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._wake()

    def _wake(self) -> None:
        self._ready = True
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():  # done: its consumer was cancelled
                waiter.set_result(None)

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        if not self._ready:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        self._ready = False
        if self._latest is None:  # only an error wakes us without an output
            self._done = True
            raise self._error
        output, self._latest = self._latest, None
        if output.finished:
            self._done = True
        elif self._error is not None:
            # It failed with this output still unread: the error is next, with no further wake-up.
            self._ready = True
        return output


def record_token_timing(stream: RequestStream, output: RequestOutput, first_token_latencies: list[float],
                         inter_token_latencies: list[float]) -> int:
    """Appends the request's time to first token when its first token arrives, and one inter-token
    latency per token that each of its sequences gained after their first. Returns the output's
    token count over all sequences."""
    metrics = output.metrics
    token_time = metrics.last_token_time if metrics is not None else None
    if token_time is None:
        return sum(len(c.token_ids) for c in output.outputs)
    if stream.last_token_time is None:
        first_token_latencies.append(metrics.first_token_time - metrics.arrival_time)
    seen = stream.tokens_seen
    if len(seen) < len(output.outputs):
        seen.extend([0] * (len(output.outputs) - len(seen)))
    for completion in output.outputs:
        count = len(completion.token_ids)
        new_tokens = count - seen[completion.index]
        if new_tokens > 0 and seen[completion.index] > 0 and stream.last_token_time is not None:
            inter_token_latencies.extend([(token_time - stream.last_token_time) / new_tokens] * new_tokens)
        elif new_tokens > 1 and seen[completion.index] == 0 and metrics.first_token_time is not None:
            # A whole answer at once (not streamed): its decode time spread over its later tokens.
            gap = (token_time - metrics.first_token_time) / (new_tokens - 1)
            inter_token_latencies.extend([gap] * (new_tokens - 1))
        seen[completion.index] = count
    stream.last_token_time = token_time
    return sum(seen)

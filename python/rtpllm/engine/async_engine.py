"""The server's engine: the synchronous `Engine` stepped in its own thread, with an asyncio front.

Threads and ownership:
- The step thread is the only one that touches the `Engine`. It drains a command list (add, abort,
  call), runs `Engine.step()` while requests are unfinished, and sleeps on a condition when idle.
- The event loop owns the per-request `RequestStream`s. The step thread hands each step's outputs
  over in one `loop.call_soon_threadsafe` call, so a slow HTTP client never blocks a step and a
  long step never blocks HTTP handling beyond the GIL they share.

Admission control: with `max_queued_requests` set, a request that would make the scheduler's
waiting queue longer than that is refused at once with `EngineOverloadedError` (the server's 503)
instead of piling up behind the running ones.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Optional, Protocol, Sequence, TypeVar, Union

from rtpllm.outputs import RequestOutput
from rtpllm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from rtpllm.config import EngineConfig
    from rtpllm.engine.engine import Engine
    from rtpllm.engine.stats import EngineStats

logger = logging.getLogger(__name__)

Prompt = Union[str, list[int]]
T = TypeVar("T")


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full; the caller should retry later (HTTP 503)."""


class EngineDeadError(RuntimeError):
    """The engine is shutting down or its step loop has failed; no request can be served."""


class StepObserver(Protocol):
    """Receives what metrics need from every step, on the event loop thread."""

    def on_step(self, time_to_first_tokens: list[float], inter_token_latencies: list[float],
                finished: list[RequestOutput]) -> None: ...


class RequestStream:
    """One request's outputs, handed from the step thread to the task serving the request.

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
        return output


@dataclass
class _Add:
    request_id: str
    prompt: Prompt
    params: SamplingParams
    arrival_time: float
    stream: bool
    accepted: asyncio.Future


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Call:
    fn: Callable[["Engine"], Any]
    result: concurrent.futures.Future


class AsyncEngine:
    """Serves concurrent requests from one `Engine`.

    Use from a running event loop: `start()`, then `add_request(...)` (or `generate(...)`) per
    request, `abort(request_id)` when its client goes away, and `shutdown()` at the end.
    """

    def __init__(self, engine: "Engine", max_queued_requests: Optional[int] = None,
                 observer: Optional[StepObserver] = None, stream_interval: int = 1):
        if max_queued_requests is not None and max_queued_requests < 1:
            raise ValueError(f"max_queued_requests: must be >= 1, got {max_queued_requests}")
        if stream_interval < 1:
            raise ValueError(f"stream_interval: must be >= 1, got {stream_interval}")
        self.engine = engine
        self.max_queued_requests = max_queued_requests
        self.stream_interval = stream_interval
        self.observer = observer
        self._streams: dict[str, RequestStream] = {}
        self._commands: list[Union[_Add, _Abort, _Call]] = []
        self._wakeup = threading.Condition()
        self._stop_requested = False
        self._accepting = False
        self._dead_error: Optional[EngineDeadError] = None
        self._pending_adds = 0  # adds sent to the step thread and not yet answered
        self._stats: "EngineStats" = engine.stats()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._idle = asyncio.Event()

    @classmethod
    def from_config(cls, config: "EngineConfig", observer: Optional[StepObserver] = None,
                    stream_interval: int = 1) -> "AsyncEngine":
        from rtpllm.engine.engine import Engine

        return cls(Engine(config), config.max_queued_requests, observer, stream_interval)

    # ------------------------------------------------------------------ what the server reads
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def loop(self) -> Optional[asyncio.AbstractEventLoop]:
        """The event loop the engine serves (set by `start()`); other threads submit work through it."""
        return self._loop

    @property
    def is_running(self) -> bool:
        return self._accepting and self._dead_error is None

    def stats(self) -> "EngineStats":
        """The counters as of the end of the last step (the step thread refreshes them)."""
        return self._stats

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Starts the step thread; call from the event loop that will serve requests."""
        if self._thread is not None:
            raise RuntimeError("AsyncEngine.start: already started")
        self._loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._idle.set()
        self._accepting = True
        self._thread = threading.Thread(target=self._step_loop, name="rtpllm-step-loop", daemon=True)
        self._thread.start()

    async def shutdown(self, grace_period_s: float = 0.0) -> None:
        """Stops taking requests, lets in-flight ones finish for up to `grace_period_s`, aborts the
        rest (their streams end with finish_reason "abort") and stops the step thread."""
        if self._thread is None:
            return
        self._accepting = False
        if grace_period_s > 0 and self._streams:
            try:
                await asyncio.wait_for(self._idle.wait(), grace_period_s)
            except asyncio.TimeoutError:
                logger.warning("shutdown: %d requests still running after %.1fs; aborting them",
                               len(self._streams), grace_period_s)
        with self._wakeup:
            self._commands.extend(_Abort(request_id) for request_id in self._streams)
            self._wakeup.notify()
        if self._streams and self._dead_error is None:
            # The aborts come back as finished outputs through the normal path; wait for them briefly.
            try:
                await asyncio.wait_for(self._idle.wait(), 5.0)
            except asyncio.TimeoutError:
                logger.warning("shutdown: %d aborted requests did not report back", len(self._streams))
        with self._wakeup:
            self._stop_requested = True
            self._wakeup.notify()
        await asyncio.to_thread(self._thread.join)
        if self._dead_error is None:
            self._mark_dead(EngineDeadError("the engine has shut down"))

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams,
                    arrival_time: Optional[float] = None, stream: bool = True) -> "asyncio.Future[RequestStream]":
        """Queues a request now; the returned future gives its stream once the engine accepted it.

        Admission is decided here, synchronously, so a caller can answer at once:
        `EngineOverloadedError` when the waiting queue is full, `EngineDeadError` when stopped,
        ValueError for a request id already running. The future raises ValueError naming the
        problem when the engine rejects the request; cancelling the future aborts the request.
        With `stream=False` the stream yields only the finished output (the engine then skips the
        per-step outputs and decodes the text once, at the end).
        """
        self._check_serving()
        if request_id in self._streams:
            raise ValueError(f"request_id: {request_id!r} is already running")
        if self.max_queued_requests is not None:
            queued = self._stats.num_waiting + self._pending_adds
            if queued >= self.max_queued_requests:
                raise EngineOverloadedError(
                    f"server overloaded: {queued} requests already waiting "
                    f"(max_queued_requests={self.max_queued_requests}); retry later")
        self._streams[request_id] = RequestStream(request_id, self.stream_interval)
        self._idle.clear()
        self._pending_adds += 1
        accepted = self._loop.create_future()
        accepted.add_done_callback(functools.partial(self._abort_if_cancelled, request_id))
        self._submit(_Add(request_id, prompt, params, arrival_time or time.monotonic(), stream, accepted))
        return accepted

    async def generate(self, prompt: Prompt, params: SamplingParams, request_id: str,
                       arrival_time: Optional[float] = None) -> AsyncIterator[RequestOutput]:
        """Yields the request's cumulative outputs; aborts it if the caller stops iterating early."""
        stream = await self.add_request(request_id, prompt, params, arrival_time)
        finished = False
        try:
            async for output in stream:
                finished = output.finished
                yield output
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Ends a request and frees its KV blocks; safe for unknown or finished ids. Its stream ends
        without a further output, so call this only when nobody is reading the stream."""
        if self._forget(request_id) is not None and self._thread is not None:
            self._submit(_Abort(request_id))

    async def call_in_engine_thread(self, fn: Callable[["Engine"], T]) -> T:
        """Runs `fn(engine)` on the step thread between two steps (the engine is not thread-safe)."""
        self._check_alive()
        result: concurrent.futures.Future = concurrent.futures.Future()
        self._submit(_Call(fn, result))
        return await asyncio.wrap_future(result)

    # ------------------------------------------------------------------ event-loop side
    def _check_alive(self) -> None:
        if self._dead_error is not None:
            raise self._dead_error
        if self._thread is None:
            raise EngineDeadError("AsyncEngine.start() has not been called")

    def _check_serving(self) -> None:
        self._check_alive()
        if not self._accepting:
            raise EngineDeadError("the server is shutting down")

    def _submit(self, command: Union[_Add, _Abort, _Call]) -> None:
        with self._wakeup:
            self._commands.append(command)
            self._wakeup.notify()

    def _forget(self, request_id: str) -> Optional[RequestStream]:
        stream = self._streams.pop(request_id, None)
        if not self._streams:
            self._idle.set()
        return stream

    def _abort_if_cancelled(self, request_id: str, accepted: asyncio.Future) -> None:
        if accepted.cancelled():
            self.abort(request_id)  # the add may be in the engine already; the abort queued behind it undoes it

    def _on_added(self, command: _Add, error: Optional[BaseException]) -> None:
        self._pending_adds -= 1
        if command.accepted.done():
            return  # cancelled by its caller
        request_stream = self._streams.get(command.request_id)
        if error is not None:
            self._forget(command.request_id)
            command.accepted.set_exception(error)
        elif request_stream is None:
            command.accepted.cancel()  # aborted before the engine took it
        else:
            command.accepted.set_result(request_stream)

    def _hand_over(self, answers: list[tuple[_Add, Optional[BaseException]]], outputs: list[RequestOutput]) -> None:
        for command, error in answers:
            self._on_added(command, error)
        if outputs:
            self._deliver(outputs)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        first_token_latencies: list[float] = []
        inter_token_latencies: list[float] = []
        finished: list[RequestOutput] = []
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue  # aborted by its consumer; nobody is listening
            num_tokens = _record_token_timing(stream, output, first_token_latencies, inter_token_latencies)
            stream.put(output, num_tokens)
            if output.finished:
                finished.append(output)
                self._forget(output.request_id)
        if self.observer is not None:
            # After the streams' consumers (already woken above): the metrics need not delay a token.
            self._loop.call_soon(self.observer.on_step, first_token_latencies, inter_token_latencies, finished)

    def _fail_all(self, error: BaseException) -> None:
        for request_id in list(self._streams):
            self._forget(request_id).fail(error)

    def _mark_dead(self, error: EngineDeadError, unanswered: Sequence[_Add] = ()) -> None:
        """Fails every waiting caller: `unanswered` adds the step thread took, and every command it
        did not take. Runs on the loop after the step thread has exited, so the command list has no
        other reader and `add_request` (also on the loop) sees `_dead_error`."""
        self._dead_error = error
        for command in unanswered:
            self._on_added(command, error)
        with self._wakeup:
            commands, self._commands = self._commands, []
        for command in commands:
            if isinstance(command, _Add):
                self._on_added(command, error)
            elif isinstance(command, _Call):
                command.result.set_exception(error)
        self._fail_all(error)

    # ------------------------------------------------------------------ step thread
    def _step_loop(self) -> None:
        engine, loop = self.engine, self._loop
        busy = False
        answers: list[tuple[_Add, Optional[BaseException]]] = []
        try:
            while True:
                with self._wakeup:
                    while not self._commands and not busy and not self._stop_requested:
                        self._wakeup.wait()
                    if self._stop_requested and not self._commands:
                        return
                    commands, self._commands = self._commands, []
                answers = [a for a in (self._apply(engine, command) for command in commands) if a is not None]
                outputs = engine.step() if engine.has_unfinished_requests() else []
                # Counters first: admission control must already count what the hand-over reveals.
                self._stats = engine.stats()
                if answers or outputs:
                    # One hand-over per step, after it: woken earlier, the event loop would compete
                    # for the GIL with the very step its callers wait for.
                    loop.call_soon_threadsafe(self._hand_over, answers, outputs)
                answers = []
                busy = engine.has_unfinished_requests()
        except BaseException as exc:  # noqa: BLE001 - every failure must reach the waiting requests
            logger.exception("engine step loop failed")
            if not loop.is_closed():
                error = EngineDeadError(f"the engine step loop failed: {exc!r}")
                loop.call_soon_threadsafe(self._mark_dead, error, [command for command, _ in answers])

    def _apply(self, engine: "Engine", command) -> Optional[tuple[_Add, Optional[BaseException]]]:
        """Runs one command; an add returns (itself, the error or None) to answer its caller with."""
        if isinstance(command, _Add):
            try:
                engine.add_request(command.request_id, command.prompt, command.params, command.arrival_time,
                                   stream=command.stream)
            except Exception as exc:  # noqa: BLE001 - a bad request fails alone, the loop keeps serving
                return command, exc
            return command, None
        if isinstance(command, _Abort):
            engine.abort_request(command.request_id)
        else:
            try:
                command.result.set_result(command.fn(engine))
            except Exception as exc:  # noqa: BLE001 - handed to the caller
                command.result.set_exception(exc)
        return None


def _record_token_timing(stream: RequestStream, output: RequestOutput, first_token_latencies: list[float],
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

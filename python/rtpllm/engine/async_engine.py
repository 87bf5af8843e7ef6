"""The server's engine: the synchronous `Engine` stepped beside an asyncio front.

- The event loop owns the per-request `RequestStream`s (`AsyncEngineBase`). Each engine step's
  outputs are handed over in one batch, so a slow HTTP client never blocks a step.
- `AsyncEngine` steps the `Engine` in a thread of this process; `ProcessEngine`
  (process_engine.py) in a process of its own, so that HTTP handling and the step loop do not
  share one GIL.

Admission control: with `max_queued_requests` set, a request that would have to wait behind more
than that many sequences is refused at once with `EngineOverloadedError` (the server's 503)
instead of piling up behind the running ones. What counts is what really waits: the scheduler's
waiting queue as of the last step, plus the requests on their way to the engine that the free
batch slots (`max_num_seqs` minus the running and waiting sequences) cannot take at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import threading
import time
from dataclasses import dataclass
from typing import (TYPE_CHECKING, Any, AsyncIterator, Callable, Iterator, Optional, Protocol, Sequence, TypeVar,
                    Union)

from rtpllm.engine.request_stream import RequestStream, record_token_timing
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
    """The waiting queue is full; the caller should retry later (HTTP 503 with Retry-After)."""


@dataclass(frozen=True)
class EngineLimits:
    """What one request may ask of the engine: the sequences of one batch and the KV pool's tokens."""

    max_num_seqs: int
    kv_cache_tokens: int


class EngineDeadError(RuntimeError):
    """The engine is shutting down or its step loop has failed; no request can be served."""


class StepObserver(Protocol):
    """Receives what metrics need from every step, on the event loop thread."""

    def on_step(self, time_to_first_tokens: list[float], inter_token_latencies: list[float],
                finished: list[RequestOutput]) -> None: ...


# What the event loop asks of the engine, in order: each backend carries these to where it steps.
@dataclass
class AddCommand:
    request_id: str
    prompt: Prompt
    params: SamplingParams
    arrival_time: float
    stream: bool
    accepted: asyncio.Future


@dataclass
class AbortCommand:
    request_id: str


@dataclass
class CallCommand:
    fn: Callable[["Engine"], Any]
    result: concurrent.futures.Future


class AsyncEngineBase:
    """The event-loop side of a served engine: per-request streams, admission control, aborts,
    shutdown and metrics hand-over. Where the `Engine` runs is the subclass's business: in a thread
    of this process (`AsyncEngine`) or in a process of its own (`ProcessEngine`). Subclasses provide
    the served model's facts and four hooks: `_launch()`, `_submit(command)`, `_stop()` and
    `_take_unsent()`; they call `_hand_over` with what each engine step produced.

    Use from a running event loop: `start()`, then `add_request(...)` (or `generate(...)`) per
    request, `abort(request_id)` when its client goes away, and `shutdown()` at the end.
    """

    def __init__(self, stats: "EngineStats", max_queued_requests: Optional[int] = None,
                 observer: Optional[StepObserver] = None, stream_interval: int = 1,
                 limits: Optional[EngineLimits] = None):
        if max_queued_requests is not None and max_queued_requests < 1:
            raise ValueError(f"max_queued_requests: must be >= 1, got {max_queued_requests}")
        if stream_interval < 1:
            raise ValueError(f"stream_interval: must be >= 1, got {stream_interval}")
        self.max_queued_requests = max_queued_requests
        self.stream_interval = stream_interval
        self.limits = limits
        self.observer = observer
        self._streams: dict[str, RequestStream] = {}
        self._started = False
        self._accepting = False
        self._dead_error: Optional[EngineDeadError] = None
        self._pending_seqs = 0  # sequences of the adds sent to the engine and not yet answered
        self._end_error: Optional[BaseException] = None  # set by end_in_flight
        self._stats = stats
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._idle = asyncio.Event()
        # Called on the event loop with each step's KVEventBatch (serving/kv_events.py sets it).
        self.kv_event_sink: Optional[Callable[[Any], None]] = None

    # ------------------------------------------------------------------ what the server reads
    @property
    def tokenizer(self):
        raise NotImplementedError

    @property
    def max_model_len(self) -> int:
        raise NotImplementedError

    @property
    def model_name(self) -> str:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def loop(self) -> Optional[asyncio.AbstractEventLoop]:
        """The event loop the engine serves (set by `start()`); other threads submit work through it."""
        return self._loop

    @property
    def is_running(self) -> bool:
        return self._accepting and self._dead_error is None

    def stats(self) -> "EngineStats":
        """The counters as of the end of the last step."""
        return self._stats

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Starts serving; call from the event loop that will serve requests."""
        if self._started:
            raise RuntimeError(f"{type(self).__name__}.start: already started")
        self._loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._idle.set()
        self._launch()
        self._started = True
        self._accepting = True

    async def shutdown(self, grace_period_s: float = 0.0) -> None:
        """Stops taking requests, lets in-flight ones finish for up to `grace_period_s`, aborts the
        rest (their streams end with finish_reason "abort") and stops the engine."""
        if not self._started:
            return
        self._accepting = False
        if grace_period_s > 0 and self._streams:
            try:
                await asyncio.wait_for(self._idle.wait(), grace_period_s)
            except asyncio.TimeoutError:
                logger.warning("shutdown: %d requests still running after %.1fs; aborting them",
                               len(self._streams), grace_period_s)
        if self._dead_error is None:
            for request_id in list(self._streams):
                self._submit(AbortCommand(request_id))
        if self._streams and self._dead_error is None:
            # The aborts come back as finished outputs through the normal path; wait for them briefly.
            try:
                await asyncio.wait_for(self._idle.wait(), 5.0)
            except asyncio.TimeoutError:
                logger.warning("shutdown: %d aborted requests did not report back", len(self._streams))
        await self._stop()
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
            queued = self._queued_sequences(params.n)
            if queued > self.max_queued_requests:
                raise EngineOverloadedError(
                    f"server overloaded: {queued} sequences would wait for a batch slot, more than "
                    f"max_queued_requests={self.max_queued_requests}; retry later")
        self._streams[request_id] = RequestStream(request_id, self.stream_interval)
        self._idle.clear()
        self._pending_seqs += params.n
        accepted = self._loop.create_future()
        accepted.add_done_callback(functools.partial(self._abort_if_cancelled, request_id))
        self._submit(AddCommand(request_id, prompt, params, arrival_time or time.monotonic(), stream, accepted))
        return accepted

    def _queued_sequences(self, new_seqs: int) -> int:
        """The sequences that would wait for a batch slot with `new_seqs` more on their way: those
        waiting at the last step, plus those on their way that the free slots cannot take."""
        stats = self._stats
        max_num_seqs = self.limits.max_num_seqs if self.limits is not None else 0
        free_slots = max(0, max_num_seqs - stats.num_running - stats.num_waiting)
        return stats.num_waiting + max(0, self._pending_seqs + new_seqs - free_slots)

    def end_in_flight(self, error: BaseException) -> int:
        """Ends every unfinished request now with `error` (its consumer raises it) and aborts it in
        the engine, which frees its KV blocks; refuses new requests from then on. For a shutdown
        deadline. Returns the number of requests ended."""
        self._accepting = False
        self._end_error = error
        ended = list(self._streams)
        for request_id in ended:
            stream = self._forget(request_id)
            if self._started and self._dead_error is None:
                self._submit(AbortCommand(request_id))
            stream.fail(error)
        return len(ended)

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
        if self._forget(request_id) is not None and self._started and self._dead_error is None:
            self._submit(AbortCommand(request_id))

    async def call_in_engine_thread(self, fn: Callable[["Engine"], T]) -> T:
        """Runs `fn(engine)` where the engine runs, between two steps (the engine is not
        thread-safe). With an engine in another process, `fn` and its result must pickle
        (a module-level function or `operator.methodcaller`, not a lambda)."""
        return await self.submit_call(fn)

    def submit_call(self, fn: Callable[["Engine"], T]) -> "asyncio.Future[T]":
        """`call_in_engine_thread`, submitted now rather than when the caller first awaits: the
        engine runs commands in the order they were submitted, so a call submitted right after
        `add_request` (inside `commands_together()`) runs right after that add, before any step.
        The engine answers calls before it steps on."""
        self._check_alive()
        result: concurrent.futures.Future = concurrent.futures.Future()
        self._submit(CallCommand(fn, result))
        return asyncio.wrap_future(result)

    @contextlib.contextmanager
    def commands_together(self) -> Iterator[None]:
        """Commands submitted inside reach the engine as one batch: it runs them one after the
        other, with no step in between (e.g. a request and the call that reads what its admission
        decided, answered without waiting for a step)."""
        yield

    # ------------------------------------------------------------------ backend hooks
    def _launch(self) -> None:
        """Starts stepping the engine (called once, from `start()`, on the event loop)."""
        raise NotImplementedError

    def _submit(self, command: Union[AddCommand, AbortCommand, CallCommand]) -> None:
        """Hands a command to the engine, which answers adds and calls through `_hand_over` /
        `_call_done`."""
        raise NotImplementedError

    async def _stop(self) -> None:
        """Stops the engine once the shutdown's aborts are answered; returns when it has stopped."""
        raise NotImplementedError

    def _take_unsent(self) -> list:
        """After the engine died: the commands it never answered (adds and calls), for `_mark_dead`."""
        raise NotImplementedError

    # ------------------------------------------------------------------ event-loop side
    def _check_alive(self) -> None:
        if self._dead_error is not None:
            raise self._dead_error
        if not self._started:
            raise EngineDeadError(f"{type(self).__name__}.start() has not been called")

    def _check_serving(self) -> None:
        self._check_alive()
        if not self._accepting:
            raise EngineDeadError("the server is shutting down")

    def _forget(self, request_id: str) -> Optional[RequestStream]:
        stream = self._streams.pop(request_id, None)
        if not self._streams:
            self._idle.set()
        return stream

    def _abort_if_cancelled(self, request_id: str, accepted: asyncio.Future) -> None:
        if accepted.cancelled():
            self.abort(request_id)  # the add may be in the engine already; the abort queued behind it undoes it

    def _on_added(self, command: AddCommand, error: Optional[BaseException]) -> None:
        self._pending_seqs -= command.params.n
        if command.accepted.done():
            return  # cancelled by its caller
        request_stream = self._streams.get(command.request_id)
        if error is not None:
            self._forget(command.request_id)
            command.accepted.set_exception(error)
        elif request_stream is None and self._end_error is not None:
            command.accepted.set_exception(self._end_error)  # ended by end_in_flight before the engine took it
        elif request_stream is None:
            command.accepted.cancel()  # aborted before the engine took it
        else:
            command.accepted.set_result(request_stream)

    def _hand_over(self, answers: list[tuple[AddCommand, Optional[BaseException]]],
                   outputs: list[RequestOutput]) -> None:
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
            num_tokens = record_token_timing(stream, output, first_token_latencies, inter_token_latencies)
            stream.put(output, num_tokens)
            if output.finished:
                finished.append(output)
                self._forget(output.request_id)
        if self.observer is not None:
            # After the streams' consumers (already woken above): the metrics need not delay a token.
            self._loop.call_soon(self.observer.on_step, first_token_latencies, inter_token_latencies, finished)

    def _publish_kv_events(self, batch) -> None:
        if batch is not None and self.kv_event_sink is not None:
            self.kv_event_sink(batch)

    def _fail_all(self, error: BaseException) -> None:
        for request_id in list(self._streams):
            self._forget(request_id).fail(error)

    def _mark_dead(self, error: EngineDeadError, unanswered: Sequence[Union[AddCommand, CallCommand]] = ()) -> None:
        """Fails every waiting caller: `unanswered` commands the engine took, and every command it
        did not take. Runs on the loop once the engine has stopped, so `add_request` (also on the
        loop) sees `_dead_error` from now on."""
        self._dead_error = error
        for command in [*unanswered, *self._take_unsent()]:
            if isinstance(command, AddCommand):
                self._on_added(command, error)
            elif isinstance(command, CallCommand) and not command.result.done():
                command.result.set_exception(error)
        self._fail_all(error)


class AsyncEngine(AsyncEngineBase):
    """Serves concurrent requests from one `Engine` stepped by a thread of this process.

    The step thread is the only one that touches the `Engine`. It drains a command list (add, abort,
    call), runs `Engine.step()` while requests are unfinished, and sleeps on a condition when idle.
    It shares the GIL with the event loop: `ProcessEngine` gives the engine a process of its own.
    """

    def __init__(self, engine: "Engine", max_queued_requests: Optional[int] = None,
                 observer: Optional[StepObserver] = None, stream_interval: int = 1):
        stats = engine.stats()
        limits = EngineLimits(max_num_seqs=engine.config.scheduler.max_num_seqs,
                              kv_cache_tokens=stats.kv_blocks_total * engine.config.cache.block_size)
        super().__init__(stats, max_queued_requests, observer, stream_interval, limits)
        self.engine = engine
        self._commands: list[Union[AddCommand, AbortCommand, CallCommand]] = []
        self._wakeup = threading.Condition(threading.RLock())  # commands_together holds it around submits
        self._stop_requested = False
        self._thread: Optional[threading.Thread] = None

    @classmethod
    def from_config(cls, config: "EngineConfig", observer: Optional[StepObserver] = None,
                    stream_interval: int = 1) -> "AsyncEngine":
        from rtpllm.engine.engine import Engine

        return cls(Engine(config), config.max_queued_requests, observer, stream_interval)

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
    def vocab_size(self) -> int:
        return self.engine.vocab_size

    # ------------------------------------------------------------------ backend hooks
    def _launch(self) -> None:
        self._thread = threading.Thread(target=self._step_loop, name="rtpllm-step-loop", daemon=True)
        self._thread.start()

    def _submit(self, command: Union[AddCommand, AbortCommand, CallCommand]) -> None:
        with self._wakeup:
            self._commands.append(command)
            self._wakeup.notify()

    @contextlib.contextmanager
    def commands_together(self) -> Iterator[None]:
        with self._wakeup:  # re-entrant (an RLock): the step thread takes the commands once all are in
            yield

    async def _stop(self) -> None:
        with self._wakeup:
            self._stop_requested = True
            self._wakeup.notify()
        await asyncio.to_thread(self._thread.join)

    def _take_unsent(self) -> list:
        # Runs after the step thread has exited: the command list has no other reader.
        with self._wakeup:
            commands, self._commands = self._commands, []
        return commands

    # ------------------------------------------------------------------ step thread
    def _step_loop(self) -> None:
        engine, loop = self.engine, self._loop
        busy = False
        answers: list[tuple[AddCommand, Optional[BaseException]]] = []
        try:
            while True:
                with self._wakeup:
                    while not self._commands and not busy and not self._stop_requested:
                        self._wakeup.wait()
                    if self._stop_requested and not self._commands:
                        break
                    commands, self._commands = self._commands, []
                answers = [a for a in (self._apply(engine, command) for command in commands) if a is not None]
                work = engine.has_unfinished_requests() or engine.has_pending_kv_transfers()
                outputs = engine.step() if work else []
                # Counters first: admission control must already count what the hand-over reveals.
                self._stats = engine.stats()
                kv_events = engine.reporter.drain_kv_events()
                if kv_events is not None:
                    loop.call_soon_threadsafe(self._publish_kv_events, kv_events)
                if answers or outputs:
                    # One hand-over per step, after it: woken earlier, the event loop would compete
                    # for the GIL with the very step its callers wait for.
                    loop.call_soon_threadsafe(self._hand_over, answers, outputs)
                answers = []
                busy = engine.has_unfinished_requests() or engine.has_pending_kv_transfers()
            engine.close()  # stopped: the KV tiers' last saves and disk writes land
        except BaseException as exc:  # noqa: BLE001 - every failure must reach the waiting requests
            logger.exception("engine step loop failed")
            if not loop.is_closed():
                error = EngineDeadError(f"the engine step loop failed: {exc!r}")
                loop.call_soon_threadsafe(self._mark_dead, error, [command for command, _ in answers])

    def _apply(self, engine: "Engine", command) -> Optional[tuple[AddCommand, Optional[BaseException]]]:
        """Runs one command; an add returns (itself, the error or None) to answer its caller with."""
        if isinstance(command, AddCommand):
            try:
                engine.add_request(command.request_id, command.prompt, command.params, command.arrival_time,
                                   stream=command.stream)
            except Exception as exc:  # noqa: BLE001 - a bad request fails alone, the loop keeps serving
                return command, exc
            return command, None
        if isinstance(command, AbortCommand):
            engine.abort_request(command.request_id)
        else:
            try:
                command.result.set_result(command.fn(engine))
            except Exception as exc:  # noqa: BLE001 - handed to the caller
                command.result.set_exception(exc)
        return None

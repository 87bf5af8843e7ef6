"""`ProcessEngine`: the server's engine in a process of its own (engine_core.py).

The event-loop side (streams, admission control, aborts, shutdown) is `AsyncEngineBase`'s, as for
the in-process `AsyncEngine`; only the transport differs. Commands go out as frames on a socket
pair; each engine step comes back as one frame, read by the event loop when the socket is readable
(no thread in between), with outputs as deltas that `OutputDeltaDecoder` turns back into the
cumulative outputs the handlers read.

If the engine process dies, every waiting request fails with `EngineDeadError` (the server answers
503 from then on); if the server dies, the engine process sees its socket close and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import subprocess
import sys
from typing import TYPE_CHECKING, Iterator, Optional, Union

from rtpllm.distributed.env import DISTRIBUTED_ENV
from rtpllm.engine.default_model import resolve_model_path
from rtpllm.engine.async_engine import (AbortCommand, AddCommand, AsyncEngineBase, CallCommand, EngineDeadError,
                                       EngineLimits, StepObserver)
from rtpllm.engine.link.frames import FrameReader, FrameWriter, encode_frame, recv_blocking, send_blocking
from rtpllm.engine.link.messages import (AbortRequest, AddRequest, CallInEngine, EngineDead, EngineFailed, EngineInfo,
                                         EngineReady, InitEngine, LinkMessage, MalformedMessage, StepOutputs,
                                         StopEngine)
from rtpllm.engine.link.output_deltas import OutputDeltaDecoder
from rtpllm.engine.link.stats_wire import STATS_WIRE_LEN, stats_from_wire
from rtpllm.engine.startup_phases import StartupPhases
from rtpllm.loader.lazy_tokenizer import LazyTokenizer

if TYPE_CHECKING:
    from rtpllm.config import EngineConfig
    from rtpllm.engine.stats import EngineStats

logger = logging.getLogger(__name__)
_STOP_TIMEOUT_S = 30.0


class EngineProcessError(RuntimeError):
    """The engine process could not start (its own error, when it had one, is the cause)."""


class ProcessEngine(AsyncEngineBase):
    def __init__(self, process: subprocess.Popen, sock: socket.socket, info: EngineInfo, tokenizer,
                 max_queued_requests: Optional[int] = None, observer: Optional[StepObserver] = None,
                 stream_interval: int = 1, limits: Optional[EngineLimits] = None):
        super().__init__(info.stats, max_queued_requests, observer, stream_interval, limits)
        self._process = process
        self._sock = sock
        self._info = info
        self._tokenizer = tokenizer  # this process's own copy (the engine loads one only for stop strings)
        self._reader = FrameReader()
        self._writer = FrameWriter(sock)
        self._watching_write = False
        self._decoder = OutputDeltaDecoder(tokenizer)
        self._tags = itertools.count()
        self._unanswered: dict[int, Union[AddCommand, CallCommand]] = {}
        self._stopping = False
        self._corked: Optional[list[bytes]] = None  # frames held back by commands_together

    @classmethod
    def from_config(cls, config: "EngineConfig", observer: Optional[StepObserver] = None,
                    stream_interval: int = 1) -> "ProcessEngine":
        """Starts the engine process and waits until it has loaded the model. Raises what the
        engine raised (e.g. FileNotFoundError for a missing model), or EngineProcessError."""
        return cls.launch(config).wait(observer, stream_interval)

    @staticmethod
    def launch(config: "EngineConfig") -> "EngineLaunch":
        """Starts the engine process and returns at once: the caller does its own start-up (the
        server imports its HTTP stack) while the engine loads the model, then calls `wait`."""
        tokenizer = LazyTokenizer(config.model.tokenizer or resolve_model_path(config.model.model))
        server_end, engine_end = socket.socketpair()
        try:
            process = subprocess.Popen([sys.executable, "-m", "rtpllm.engine.link.engine_core", "--fd",
                                        str(engine_end.fileno())], pass_fds=(engine_end.fileno(),),
                                       env={**os.environ, **DISTRIBUTED_ENV})  # NVLink multicast off
        finally:
            engine_end.close()
        # The server loads its own tokenizer meanwhile: it tokenizes and detokenizes, the engine
        # process loads one only when a request first needs it (stop strings). Started after the
        # engine process, whose launch the load's imports (holding the GIL) would delay.
        tokenizer.start()
        try:
            send_blocking(server_end, InitEngine(config, logging.getLogger().getEffectiveLevel()))
        except OSError:
            pass  # the process died at once: `wait` reports it
        return EngineLaunch(process, server_end, config, tokenizer)

    @property
    def tokenizer(self):
        return self._tokenizer

    # NOTE: the step's stats arrive in wire form after every step; the EngineStats is built when
    # something reads it (admission control, metrics), at most once per step.
    @property
    def _stats(self) -> "EngineStats":
        if self._stats_wire is not None:
            self._stats_object = stats_from_wire(self._stats_wire)
            self._stats_wire = None
        return self._stats_object

    @_stats.setter
    def _stats(self, stats: "EngineStats") -> None:
        self._stats_object = stats
        self._stats_wire: Optional[tuple] = None  # the last step's stats as sent, until something reads them

    @property
    def startup_report(self) -> Optional[dict]:
        """The engine process's start-up phases (StartupPhases.as_dict)."""
        return getattr(self._info, "startup", None)

    @property
    def max_model_len(self) -> int:
        return self._info.max_model_len

    @property
    def model_name(self) -> str:
        return self._info.model_name

    @property
    def vocab_size(self) -> int:
        return self._info.vocab_size

    @property
    def pid(self) -> int:
        return self._process.pid

    def close(self) -> None:
        """Ends the engine process at once (for a server that never started or failed to stop)."""
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._detach()

    # ------------------------------------------------------------------ backend hooks
    def _launch(self) -> None:
        if self._process.poll() is not None:
            raise EngineDeadError(f"the engine process has exited (code {self._process.returncode})")
        self._sock.setblocking(False)
        self._loop.add_reader(self._sock.fileno(), self._on_readable)

    def _submit(self, command: Union[AddCommand, AbortCommand, CallCommand]) -> None:
        if isinstance(command, AddCommand):
            tag = next(self._tags)
            # A request without stop strings is decoded into text here, off the engine's step loop
            # (stop strings must end the sequence in the engine, which then decodes it itself).
            decode_here = not command.params.stop_strings
            if decode_here:
                self._decoder.decode_text_of(command.request_id, command.params.skip_special_tokens)
            message = AddRequest(tag, command.request_id, command.prompt, command.params, command.arrival_time,
                                 command.stream, not decode_here)
        elif isinstance(command, AbortCommand):
            tag, message = None, AbortRequest(command.request_id)
        else:
            tag = next(self._tags)
            message = CallInEngine(tag, command.fn)
        try:
            frame = encode_frame(message)
        except Exception as exc:  # noqa: BLE001 - e.g. a lambda given to call_in_engine_thread
            if isinstance(command, CallCommand):
                command.result.set_exception(TypeError(f"fn: must pickle to reach the engine process: {exc}"))
                return
            raise
        if tag is not None:
            self._unanswered[tag] = command
        if self._corked is not None:
            self._corked.append(frame)
        else:
            self._send(frame)

    @contextlib.contextmanager
    def commands_together(self) -> Iterator[None]:
        # One write for all of them: the engine reads them in one go (engine_core finishes a frame
        # it has begun to receive before it steps).
        if self._corked is not None:  # nested: the outer one sends
            yield
            return
        self._corked = []
        try:
            yield
        finally:
            frames, self._corked = self._corked, None
            if frames:
                self._send(b"".join(frames))

    async def _stop(self) -> None:
        self._stopping = True
        if self._process.poll() is None and self._sock.fileno() >= 0:
            self._send(encode_frame(StopEngine()))
            try:
                await asyncio.wait_for(asyncio.to_thread(self._process.wait), _STOP_TIMEOUT_S)
            except asyncio.TimeoutError:
                logger.warning("the engine process did not stop within %.0fs; killing it", _STOP_TIMEOUT_S)
                self._process.kill()
                await asyncio.to_thread(self._process.wait)
        self._detach()

    def _take_unsent(self) -> list:
        commands = list(self._unanswered.values())
        self._unanswered.clear()
        return commands

    # ------------------------------------------------------------------ socket
    def _send(self, frame: bytes) -> None:
        try:
            sent = self._writer.write(frame)
        except OSError:  # the engine process is gone (its exit is handled here or already was)
            self._on_engine_exit()
            return
        if not sent and not self._watching_write:
            self._loop.add_writer(self._sock.fileno(), self._on_writable)
            self._watching_write = True

    def _on_writable(self) -> None:
        try:
            sent = self._writer.flush()
        except OSError:
            self._on_engine_exit()
            return
        if sent:
            self._loop.remove_writer(self._sock.fileno())
            self._watching_write = False

    def _on_readable(self) -> None:
        # A reset means the engine process is gone as surely as a clean close does.
        try:
            messages, closed = self._reader.receive(self._sock, error_closes=True)
            for message in messages:
                self._handle(message)
        except MalformedMessage as exc:  # a peer that speaks another protocol: nothing more it sends can be trusted
            self._give_up(exc)
            return
        if closed:
            self._on_engine_exit()

    def _give_up(self, exc: MalformedMessage) -> None:
        logger.error("the engine process sent a malformed message: %s", exc)
        self._stopping = True
        self._process.kill()
        self._mark_dead(EngineDeadError(f"the engine process sent a malformed message: {exc}"))
        self._detach()

    def _handle(self, message: LinkMessage) -> None:
        if type(message) is StepOutputs:
            # First: admission control must count what the hand-over reveals. Checked here, read later.
            if type(message.stats) is not tuple or len(message.stats) != STATS_WIRE_LEN:
                raise MalformedMessage(f"StepOutputs.stats: expected {STATS_WIRE_LEN} fields in a tuple")
            self._stats_wire = message.stats
            self._publish_kv_events(message.kv_events)
            for result in message.call_results:
                call = self._unanswered.pop(result.tag)
                if result.ok:
                    call.result.set_result(result.value)
                else:
                    call.result.set_exception(result.value)
            added = [(self._unanswered.pop(answer.tag), answer.error) for answer in message.answers]
            for command, error in added:
                if error is not None:
                    self._decoder.forget(command.request_id)
            self._hand_over(added, self._decoder.decode(message.deltas))
        elif type(message) is EngineDead:
            self._stopping = True
            self._mark_dead(EngineDeadError(message.reason))
        else:
            logger.error("the engine process sent %s after it was ready: ignored", type(message).__name__)

    def _on_engine_exit(self) -> None:
        self._detach()
        if not self._stopping and self._dead_error is None:
            try:
                code = self._process.wait(timeout=1.0)  # its socket closed as it exited: a moment at most
            except subprocess.TimeoutExpired:
                code = None
            logger.error("the engine process exited unexpectedly (exit code %s)", code)
            self._mark_dead(EngineDeadError(f"the engine process exited unexpectedly (exit code {code})"))

    def _detach(self) -> None:
        if self._sock.fileno() < 0:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._sock.fileno())
            if self._watching_write:
                self._loop.remove_writer(self._sock.fileno())
                self._watching_write = False
        self._sock.close()


class EngineLaunch:
    """An engine process that is loading its model (`ProcessEngine.launch`)."""

    def __init__(self, process: subprocess.Popen, sock: socket.socket, config: "EngineConfig",
                 tokenizer: LazyTokenizer):
        self._process = process
        self._sock = sock
        self._config = config
        self._tokenizer = tokenizer  # the server's own copy, loading

    def wait(self, observer: Optional[StepObserver] = None, stream_interval: int = 1,
             startup: Optional[StartupPhases] = None) -> ProcessEngine:
        """Blocks until the engine is ready, then until this process's tokenizer is (`startup`
        gets both waits as phases). Raises what the engine raised (e.g. FileNotFoundError for a
        missing model), or EngineProcessError."""
        startup = startup or StartupPhases("server")
        with startup.phase("waiting for the engine"):
            reply = self._receive_ready()
        info, config = reply.info, self._config
        try:
            with startup.phase("waiting for the tokenizer"):
                tokenizer = self._tokenizer.get()
        except BaseException:
            self.kill()
            raise
        startup.add_parallel("tokenizer", self._tokenizer.seconds, self._tokenizer.parts)
        limits = EngineLimits(max_num_seqs=config.scheduler.max_num_seqs,
                              kv_cache_tokens=info.stats.kv_blocks_total * config.cache.block_size)
        return ProcessEngine(self._process, self._sock, info, tokenizer, config.max_queued_requests, observer,
                             stream_interval, limits)

    def _receive_ready(self) -> EngineReady:
        process, server_end = self._process, self._sock
        try:
            reply = recv_blocking(server_end)
        except (EOFError, OSError) as exc:
            server_end.close()
            code = process.wait()
            raise EngineProcessError(f"the engine process exited with code {code} while loading the model "
                                     "(its log is above)") from exc
        except MalformedMessage as exc:
            reply = exc
        if isinstance(reply, EngineFailed):
            server_end.close()
            process.wait()
            logger.debug("engine process failed to start:\n%s", reply.traceback)
            raise reply.error
        if not isinstance(reply, EngineReady):  # a peer that speaks another protocol
            self.kill()
            raise EngineProcessError(f"the engine process answered its start with {reply!r}, not EngineReady")
        return reply

    def kill(self) -> None:
        """Stops a launch the caller gave up on (its own start-up failed)."""
        self._sock.close()
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()

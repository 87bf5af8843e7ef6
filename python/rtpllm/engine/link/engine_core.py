"""The engine process: steps one `Engine` and talks to the server over a socket (`ProcessEngine`
starts it as `python -m rtpllm.engine.link.engine_core --fd N`).

Why a process: in the server's process the step loop and the HTTP event loop share one GIL, so
every microsecond of HTTP, SSE and client bookkeeping is a microsecond the step waits for. Here
the engine has an interpreter of its own, as vLLM's engine core and SGLang's scheduler do.

Protocol: the typed messages of link/messages.py (InitEngine first, then AddRequest, AbortRequest,
CallInEngine, StopEngine; answered by EngineReady or EngineFailed once, then StepOutputs after
every step or batch of commands, EngineDead if the step loop fails), in frames (frames.py, both
ends non-blocking); StepOutputs.deltas: output_deltas.py.
The engine exits after StopEngine, and when the server's end of the socket closes (the server died).
It ignores SIGINT: Ctrl-C in a terminal reaches the whole process group, and the server decides
how requests end.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import select
import selectors
import signal
import socket
import sys
import time
import traceback
from typing import Optional

from rtpllm.engine.link.frames import FrameReader, FrameWriter, encode_frame, recv_blocking, send_blocking
from rtpllm.engine.gc_heap import freeze_startup_heap
from rtpllm.engine.link.messages import (AbortRequest, AddAnswer, AddRequest, CallInEngine, CallResult, EngineDead,
                                         EngineFailed, EngineInfo, EngineReady, InitEngine, OutputDeltas, StepOutputs,
                                         StopEngine)
from rtpllm.engine.link.output_deltas import OutputDeltaEncoder
from rtpllm.engine.link.stats_wire import stats_to_wire

logger = logging.getLogger(__name__)
_TOKENIZER_POLL_S = 0.005
_PARTIAL_FRAME_WAIT_S = 0.001


def picklable_error(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling, else a RuntimeError carrying its description."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any failure to round-trip means "send a description"
        return RuntimeError(repr(exc))


class EngineCoreLoop:
    """The engine process's loop: take every command that arrived, run one engine step while any
    request is unfinished, send one StepOutputs frame with what both produced; sleep in select when idle."""

    def __init__(self, engine, sock: socket.socket):
        self.engine = engine
        self.sock = sock
        self.reader = FrameReader()
        self.writer = FrameWriter(sock)
        self.encoder = OutputDeltaEncoder()
        self.selector = selectors.DefaultSelector()
        self.selector.register(sock, selectors.EVENT_READ)
        self._watching_write = False
        self._held: list = []  # commands waiting for the tokenizer to load (`_hold`)

    def run(self) -> int:
        engine = self.engine
        busy = False
        while True:
            # Commands held for the tokenizer (`_hold`) go first, in order, once it has loaded.
            commands = self._receive(block=not busy and not self._held)
            if commands is None:
                return 0  # the server is gone
            commands = self._hold(commands)
            answers, call_results, stop = [], [], False
            for command in commands:
                kind = type(command)
                if kind is AddRequest:
                    try:
                        engine.add_request(command.request_id, command.prompt, command.params, command.arrival_time,
                                           stream=command.stream, detokenize=command.detokenize)
                        answers.append(AddAnswer(command.tag, None))
                    except Exception as exc:  # noqa: BLE001 - a bad request fails alone
                        answers.append(AddAnswer(command.tag, picklable_error(exc)))
                elif kind is AbortRequest:
                    engine.abort_request(command.request_id)
                elif kind is CallInEngine:
                    call_results.append(self._call(command.tag, command.fn))
                elif kind is StopEngine:
                    stop = True
                else:
                    raise TypeError(f"engine process: {kind.__name__} is not a command")
            transfers = engine.has_pending_kv_transfers()
            work = engine.has_unfinished_requests() or transfers
            if call_results and work:
                # A caller waits for each call (e.g. a PD decode reservation, read right after its
                # add): answered now, with the adds before it, not after a whole step.
                self.writer.write(encode_frame(StepOutputs(answers, OutputDeltas.empty(),
                                                           stats_to_wire(engine.stats()), call_results, None)))
                answers, call_results = [], []
            moved = engine.step_groups() if work else []
            # The last KV tier transfers ending frees the blocks they held: the server's counters
            # (KV usage, admission) must hear of it although no request moved.
            transfers_ended = transfers and not engine.has_pending_kv_transfers()
            if commands or moved or transfers_ended:
                self.writer.write(encode_frame(StepOutputs(answers, self.encoder.encode(moved),
                                                           stats_to_wire(engine.stats()), call_results,
                                                           engine.reporter.drain_kv_events())))
            if stop:
                self._flush_blocking()
                engine.close()  # the KV tiers' last saves and disk writes
                return 0
            busy = engine.has_unfinished_requests() or engine.has_pending_kv_transfers()

    def _hold(self, commands: list) -> list:
        """The commands to run now. An add whose request needs the engine's tokenizer (stop
        strings, a text prompt) waits while the tokenizer loads on its thread, and so do aborts of
        held requests and a stop, in the order they came; other requests keep coming and stepping."""
        held, engine = self._held, self.engine
        if held and engine.tokenizer_loaded:
            commands, held[:] = held + commands, []  # loaded (or failed: those adds fail alone)
        if not held and not any(type(c) is AddRequest for c in commands):
            return commands  # NOTE: the usual case, every step
        now = []
        held_ids = {c.request_id for c in held if type(c) is AddRequest}
        for command in commands:
            kind = type(command)
            if kind is AddRequest and engine.needs_tokenizer(command.prompt, command.detokenize):
                held_ids.add(command.request_id)
                held.append(command)
            elif (kind is AbortRequest and command.request_id in held_ids) or (kind is StopEngine and held):
                held.append(command)
            else:
                now.append(command)
        return now

    def _call(self, tag: int, fn) -> CallResult:
        try:
            result = fn(self.engine)
            pickle.dumps(result)
            return CallResult(tag, True, result)
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            return CallResult(tag, False, picklable_error(exc))

    def _receive(self, block: bool) -> Optional[list]:
        """The commands that arrived (waiting for one when `block`); None when the server closed.
        Meanwhile sends what an earlier step could not."""
        while True:
            want_write = self.writer.pending
            if want_write != self._watching_write:
                self.selector.modify(self.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if want_write else 0))
                self._watching_write = want_write
            readable = False
            # While commands wait for the tokenizer, look back every few ms to see if it has loaded.
            timeout = None if block else (_TOKENIZER_POLL_S if self._held else 0)
            for _, events in self.selector.select(timeout):
                if events & selectors.EVENT_WRITE:
                    self.writer.flush()
                readable = readable or bool(events & selectors.EVENT_READ)
            if readable:
                commands, closed = self.reader.receive(self.sock)
                if closed:
                    return None
                if commands and self.reader.partial:
                    # Commands sent in one write (commands_together) are taken in one batch: the
                    # rest of a frame already under way comes within microseconds.
                    more = self._finish_partial_frame()
                    if more is None:
                        return None
                    commands += more
                if commands or not block:
                    return commands  # else only part of a frame came: wait for the rest
            elif not block:
                return []

    def _finish_partial_frame(self) -> Optional[list]:
        """The commands that complete a frame begun in the last read, waiting at most
        _PARTIAL_FRAME_WAIT_S for them (then [] and the rest is read after the step); None when the
        server closed."""
        deadline = time.monotonic() + _PARTIAL_FRAME_WAIT_S
        commands: list = []
        while self.reader.partial:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                break
            more, closed = self.reader.receive(self.sock)
            if closed:
                return None
            commands += more
        return commands

    def _flush_blocking(self) -> None:
        self.sock.setblocking(True)
        self.writer.flush()


def serve(sock: socket.socket) -> int:
    init = recv_blocking(sock)
    if not isinstance(init, InitEngine):
        raise TypeError(f"engine process: expected InitEngine first, got {type(init).__name__}")
    config, log_level = init.config, init.log_level
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s [engine]: %(message)s")
    try:
        from rtpllm.engine.engine import Engine
        from rtpllm.engine.startup_phases import StartupPhases, since_process_start

        startup = StartupPhases("engine", level=logging.DEBUG)  # the server logs it in its own line
        startup.add("python start and imports", since_process_start() or 0.0)
        engine = Engine(config, startup, tokenizer_on_demand=True)  # the server tokenizes and detokenizes
    except BaseException as exc:  # noqa: BLE001 - reported to the server, which raises it
        send_blocking(sock, EngineFailed(picklable_error(exc), traceback.format_exc()))
        return 1
    freeze_startup_heap()
    send_blocking(sock, EngineReady(EngineInfo(engine.model_name, engine.max_model_len, engine.vocab_size,
                                               engine.stats(), engine.startup.as_dict())))
    sock.setblocking(False)
    if getattr(engine, "pd", None) is not None:
        engine.pd.wake_on(sock.fileno())  # a PD engine's naps end when a command arrives
    loop = EngineCoreLoop(engine, sock)
    try:
        return loop.run()
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the waiting requests
        logger.exception("engine step loop failed")
        try:
            loop.writer.write(encode_frame(EngineDead(f"the engine step loop failed: {exc!r}")))
            loop._flush_blocking()
        except OSError:
            pass  # the server is gone too
        return 1
    finally:
        engine.shutdown()  # its tensor-parallel workers, if any


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fd", type=int, required=True, help="the inherited socket to the server")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with socket.socket(fileno=args.fd) as sock:
        sock.setblocking(True)
        return serve(sock)


if __name__ == "__main__":
    # Run the module under its import name, so that anything it defines names
    # rtpllm.engine.link.engine_core rather than __main__ (e.g. in a pickled traceback).
    from rtpllm.engine.link import engine_core

    sys.exit(engine_core.main())

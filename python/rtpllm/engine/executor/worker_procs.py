"""The engine's side of the worker processes: starting and stopping them, and watching them.

Each worker is `python -m rtpllm.engine.executor.worker_main --fd N`, talking to the engine over
an inherited socket in frames (engine/link/frames.py) of the messages in engine/link/messages.py:
    engine -> worker: InitWorker first, then InitRunner, WorkerStep per step, StopWorker
    worker -> engine: WorkerLoaded once its shard is loaded (it then joins the group),
        WorkerReady after InitRunner; WorkerError before it exits on a failure.
Steps are not answered: the ranks meet in the model's collectives, and rank 0 samples.

`WorkerMonitor` is the only reader of the workers' sockets: a thread that queues replies and turns
an error report or a closed socket (a worker that died, even by SIGKILL) into a WorkerFailedError
naming the rank, at once.
"""

from __future__ import annotations

import logging
import queue
import selectors
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Optional, TypeVar

from rtpllm.distributed.env import worker_env
from rtpllm.engine.executor.base import WorkerFailedError
from rtpllm.engine.executor.worker import WorkerSpec
from rtpllm.engine.link.frames import FrameReader, send_blocking
from rtpllm.engine.link.messages import (InitWorker, LinkMessage, MalformedMessage, WorkerError, WorkerKVDone,
                                         WorkerPDAck, WorkerPDPushed)

Reply = TypeVar("Reply", bound=LinkMessage)

logger = logging.getLogger(__name__)


class WorkerProcess:
    def __init__(self, rank: int, process: subprocess.Popen, sock: socket.socket):
        self.rank = rank
        self.process = process
        self.sock = sock

    @classmethod
    def start(cls, spec: WorkerSpec, num_threads: int) -> "WorkerProcess":
        engine_end, worker_end = socket.socketpair()
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "rtpllm.engine.executor.worker_main", "--fd", str(worker_end.fileno())],
                pass_fds=(worker_end.fileno(),), env=worker_env(num_threads))
        finally:
            worker_end.close()
        handle = cls(spec.rank, process, engine_end)
        send_blocking(engine_end, InitWorker(spec))
        return handle

    def send(self, frame: bytes) -> None:
        self.sock.sendall(frame)

    def exit_code(self, wait_s: float = 0.0) -> Optional[int]:
        try:
            return self.process.wait(timeout=wait_s) if wait_s > 0 else self.process.poll()
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()


def stop_workers(workers: list[WorkerProcess], frame: bytes, timeout_s: float) -> None:
    """Asks every worker to stop, waits up to `timeout_s` in all, kills the ones still running."""
    for worker in workers:
        try:
            worker.send(frame)
        except OSError:
            pass  # already gone
    deadline = time.monotonic() + timeout_s
    for worker in workers:
        if worker.exit_code(max(0.01, deadline - time.monotonic())) is None:
            logger.warning("tensor-parallel worker rank %d did not stop within %.0f s: killed", worker.rank, timeout_s)
            worker.kill()
            worker.process.wait()
        worker.sock.close()


class WorkerMonitor:
    def __init__(self, workers: list[WorkerProcess], on_failure: Callable[[WorkerFailedError], None]):
        self.workers = workers
        self.failure: Optional[WorkerFailedError] = None
        self.replies: "queue.Queue[Optional[LinkMessage]]" = queue.Queue()  # None: a failure was seen
        self.pd_replies: "queue.Queue[LinkMessage]" = queue.Queue()  # WorkerPDAck, WorkerPDPushed (any time)
        self.kv_replies: "queue.Queue[WorkerKVDone]" = queue.Queue()  # the KV tiers' answers (any time)
        self._on_failure = on_failure
        self._stopping = False
        self._wake_recv, self._wake_send = socket.socketpair()
        self._thread = threading.Thread(target=self._run, name="tp-worker-monitor", daemon=True)
        self._thread.start()

    def wait_for(self, kind: type[Reply], timeout_s: float) -> list[Reply]:
        """One `kind` reply from every worker (in any order). Raises the failure if a worker
        fails first, TimeoutError if one stays silent past `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        replies: list[Reply] = []
        while len(replies) < len(self.workers):
            if self.failure is not None:
                raise self.failure
            try:
                reply = self.replies.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                silent = sorted({w.rank for w in self.workers} - {r.rank for r in replies})
                raise TimeoutError(f"tensor-parallel workers: rank(s) {silent} sent no {kind.__name__} within "
                                   f"{timeout_s:.0f} s") from None
            if type(reply) is kind:
                replies.append(reply)
        if self.failure is not None:
            raise self.failure
        return replies

    def wait_for_failure(self, timeout_s: float) -> Optional[WorkerFailedError]:
        """The failure, waiting up to `timeout_s` for one to be seen (after a collective failed)."""
        deadline = time.monotonic() + timeout_s
        while self.failure is None and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.failure

    def stop(self) -> None:
        """Stops watching: sockets that close from now on are expected to."""
        self._stopping = True
        try:
            self._wake_send.send(b"x")
        except OSError:
            pass
        self._thread.join(timeout=5.0)
        self._wake_recv.close()
        self._wake_send.close()

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._wake_recv, selectors.EVENT_READ, None)
        readers = {}
        for worker in self.workers:
            selector.register(worker.sock, selectors.EVENT_READ, worker)
            readers[worker.rank] = FrameReader()
        watching = len(self.workers)
        while watching:
            for key, _ in selector.select():
                worker = key.data
                if worker is None or self._stopping:
                    return
                try:
                    data = worker.sock.recv(1 << 20)
                except OSError:
                    data = b""
                if not data:
                    selector.unregister(worker.sock)
                    watching -= 1
                    self._fail(WorkerFailedError(worker.rank, "exited unexpectedly "
                                                              f"(exit code {worker.exit_code(wait_s=2.0)})"))
                    continue
                try:
                    messages = readers[worker.rank].feed(data)
                except MalformedMessage as exc:
                    self._fail(WorkerFailedError(worker.rank, f"sent a malformed message: {exc}"))
                    continue
                for message in messages:
                    if type(message) is WorkerError:
                        logger.error("tensor-parallel worker rank %d failed:\n%s", worker.rank, message.traceback)
                        self._fail(WorkerFailedError(worker.rank, f"failed: {message.description}"))
                    elif type(message) in (WorkerPDAck, WorkerPDPushed):
                        self.pd_replies.put(message)
                    elif type(message) is WorkerKVDone:
                        self.kv_replies.put(message)
                    else:
                        self.replies.put(message)

    def _fail(self, error: WorkerFailedError) -> None:
        if self._stopping or self.failure is not None:
            return
        logger.error("%s", error)
        self.failure = error
        self.replies.put(None)
        self._on_failure(error)

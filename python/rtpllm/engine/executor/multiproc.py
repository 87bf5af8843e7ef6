"""Tensor parallelism on one host: rank 0 in the engine's process, ranks 1..N-1 in worker processes.

Each step: rank 0 sends the step's batch (plain arrays, `StepArrays`) to every worker, then runs its
own shard; the ranks meet in the model's all-reduces and the logits' all-gather, rank 0 samples
and broadcasts the sampled tokens (the next step's placeholders on every rank read them).

Failure: a worker that dies or raises is seen at once by the monitor thread, which kills the other
workers (so no rank stays blocked in a collective) and aborts rank 0's communicator (NCCL; gloo
fails on a closed peer by itself). The step in progress and every later one raise
WorkerFailedError naming the rank; `shutdown()` stops (or, after a timeout, kills) the workers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import time
import weakref
from typing import Optional

import torch

from rtpllm.distributed.env import apply_distributed_env
from rtpllm.distributed.tp_group import TPGroup
from rtpllm.engine.executor.base import Executor, WorkerFailedError
from rtpllm.engine.executor.step_arrays import StepArrays
from rtpllm.engine.executor.worker import Worker, WorkerSpec, rank_device
from rtpllm.engine.executor.worker_procs import WorkerMonitor, WorkerProcess, stop_workers
from rtpllm.engine.link.frames import encode_frame
from rtpllm.engine.link.messages import (InitRunner, StopWorker, WorkerKVOps, WorkerLoaded, WorkerPDAck,
                                         WorkerPDGrant, WorkerPDPush, WorkerPDPushed, WorkerPDRevoke, WorkerReady,
                                         WorkerStep)
from rtpllm.engine.in_flight import PendingInputs
from rtpllm.engine.model_runner import StepResult
from rtpllm.loader import LoadedModel

# Joining the group, loading a shard, profiling and capturing graphs: generous, but bounded.
STARTUP_TIMEOUT_S = 900.0
STOP_TIMEOUT_S = 10.0
# After a collective failed, how long to wait for the monitor to name the rank that died.
FAILURE_REPORT_S = 5.0
_STOP_FRAME = encode_frame(StopWorker())


class MultiprocExecutor(Executor):
    def __init__(self, spec: WorkerSpec):
        apply_distributed_env()
        world = spec.world_size
        self._closed = False
        self._threads_before: Optional[int] = None
        threads = 0
        if spec.device.type == "cpu":
            # N ranks share the host's cores: one thread pool each of cores / N, no oversubscription.
            threads = max(1, (os.cpu_count() or 1) // world)
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(threads)
        self.pd_transfer_ports: list[int] = []  # ranks 1..: their PD transfer engines' ports (0: none)
        self._pd_pushed: list = []  # WorkerPDPushed read while waiting for grant acknowledgements
        self._kv_mirror = None  # _C.MirroredKVConnector: rank 0's KV tiers, repeated by the workers
        self._store = TPGroup.create_store(0, world)
        spec = dataclasses.replace(spec, store_port=self._store.port)
        self.worker = Worker(spec)
        self._procs: list[WorkerProcess] = []
        try:
            for rank in range(1, world):
                rank_spec = dataclasses.replace(spec, rank=rank, device=rank_device(spec.device, rank))
                self._procs.append(WorkerProcess.start(rank_spec, threads or 1))
        except BaseException:
            stop_workers(self._procs, _STOP_FRAME, STOP_TIMEOUT_S)
            raise
        on_failure = weakref.WeakMethod(self._on_failure)  # the monitor thread must not keep us alive
        self._monitor = WorkerMonitor(self._procs, lambda error: (on_failure() or _ignore)(error))
        # Workers never outlive an executor that is dropped without shutdown() (or the interpreter).
        self._finalizer = weakref.finalize(self, _release, self._monitor, self._procs)

    def load_model(self) -> LoadedModel:
        """Every rank loads its shard at once; the group forms once all have (a rank that fails
        to load is reported by the monitor, not waited for inside the group)."""
        with self._shutdown_on_error():
            loaded = self.worker.load_model()
            self._monitor.wait_for(WorkerLoaded, STARTUP_TIMEOUT_S)
            self.worker.join_group(self._store)
        return loaded

    def init_runner(self, max_model_len: int, extra_kv_bytes_per_block: int = 0, kv_root_hash: int = 0) -> None:
        """extra_kv_bytes_per_block: a draft model's KV per block, which rank 0 alone holds (the draft
        runs there, unsharded); every rank sizes its pool as if it held it too, so that the ranks
        agree on the block count (the others leave that share unused)."""
        with self._shutdown_on_error():
            self._init_runner(max_model_len, extra_kv_bytes_per_block, kv_root_hash)

    def _init_runner(self, max_model_len: int, extra_kv_bytes_per_block: int, kv_root_hash: int) -> None:
        self._send(encode_frame(InitRunner(max_model_len, extra_kv_bytes_per_block, kv_root_hash)))
        try:
            num_blocks = self.worker.init_runner(max_model_len, extra_kv_bytes_per_block)
        except RuntimeError as exc:
            raise self._failure_behind(exc) from exc
        replies = self._monitor.wait_for(WorkerReady, STARTUP_TIMEOUT_S)
        disagree = {reply.rank: reply.num_blocks for reply in replies if reply.num_blocks != num_blocks}
        if disagree:
            raise RuntimeError(f"tensor-parallel ranks disagree on the KV block count: rank 0 has {num_blocks}, "
                               f"others {disagree}")
        self.pd_transfer_ports = [reply.transfer_port for reply in sorted(replies, key=lambda r: r.rank)]
        self.runner = self.worker.runner

    # ------------------------------------------------------------------ PD (pd/worker_side.py)
    # Rank 0 keeps the PD logic; these tell the other ranks what to do with their own KV heads.
    def pd_grant(self, transfer_id: int, blocks: list[int], timeout_s: float) -> None:
        """Every worker grants `blocks` to `transfer_id` (acknowledged: a prefill may write at once)."""
        self._send(encode_frame(WorkerPDGrant(transfer_id, list(blocks))))
        deadline = time.monotonic() + timeout_s
        acked: set[int] = set()
        while len(acked) < len(self._procs):
            if self._monitor.failure is not None:
                raise self._monitor.failure
            try:
                reply = self._monitor.pd_replies.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"tensor-parallel workers did not acknowledge a KV write grant within "
                                   f"{timeout_s:g} s") from None
            if isinstance(reply, WorkerPDAck) and reply.transfer_id == transfer_id:
                acked.add(reply.rank)
            elif isinstance(reply, WorkerPDPushed):
                self._pd_pushed.append(reply)

    def pd_revoke(self, transfer_id: int) -> None:
        self._send(encode_frame(WorkerPDRevoke(transfer_id)))

    def pd_push(self, transfer_id: int, writes: dict, local_blocks: list[int], remote_blocks: list[int],
                num_tokens: int, by_layer: bool) -> None:
        """Worker r writes its heads of the prompt as writes[r] says ([host, port, src_head_offset,
        dst_head_offset, num_heads] each; none: it only answers), by_layer in the next step's forward
        (call before execute()) or at once."""
        for proc in self._procs:
            frame = encode_frame(WorkerPDPush(transfer_id, list(writes.get(proc.rank, [])), list(local_blocks),
                                              list(remote_blocks), num_tokens, by_layer))
            try:
                proc.send(frame)
            except OSError as exc:
                raise (self._monitor.wait_for_failure(FAILURE_REPORT_S)
                       or WorkerFailedError(proc.rank, f"cannot be reached ({exc})")) from exc

    def pd_pushed(self) -> list:
        """The workers' WorkerPDPushed answers since the last call."""
        out, self._pd_pushed = self._pd_pushed, []
        while True:
            try:
                reply = self._monitor.pd_replies.get_nowait()
            except queue.Empty:
                return out
            if isinstance(reply, WorkerPDPushed):
                out.append(reply)

    # ------------------------------------------------------------------ KV tiers (kv_tier_mirror.py)
    def mirror_kv_tiers(self, connector) -> None:
        self._kv_mirror = connector

    def pump_kv_tiers(self) -> None:
        if self._kv_mirror is None:
            return
        if self._monitor.failure is not None:
            raise self._monitor.failure
        operations = self._kv_mirror.take_operations()
        if operations:
            self._send(encode_frame(WorkerKVOps(operations)))
        while True:
            try:
                reply = self._monitor.kv_replies.get_nowait()
            except queue.Empty:
                return
            for handle, done in reply.results:
                self._kv_mirror.report(reply.rank - 1, handle, done)

    def execute(self, batch, sampling_batch, prompt_logprob_seqs: list[int],
                pending: Optional[PendingInputs] = None, drafts: Optional[torch.Tensor] = None) -> StepResult:
        if self._monitor.failure is not None:
            raise self._monitor.failure
        self.pump_kv_tiers()  # a save started since the last pump reaches the workers before this step
        positions, rows = (pending.positions, pending.rows) if pending is not None else (None, None)
        host_drafts = drafts.cpu().numpy() if drafts is not None else None  # every rank's input tokens
        self._send(encode_frame(WorkerStep(StepArrays.of(batch), prompt_logprob_seqs, positions, rows, host_drafts)))
        try:
            return self.worker.execute(batch, sampling_batch, prompt_logprob_seqs, pending, drafts)
        except RuntimeError as exc:
            raise self._failure_behind(exc) from exc

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._finalizer.detach()
        _release(self._monitor, self._procs)
        self.worker.close()
        self._store = None
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)

    # ------------------------------------------------------------------ failures
    @contextlib.contextmanager
    def _shutdown_on_error(self):
        """A start-up step failed on some rank: no engine will follow, so the workers end now
        (killed: they may be waiting in a collective for the rank that failed)."""
        try:
            yield
        except BaseException:
            self._monitor.stop()
            for proc in self._procs:
                proc.kill()
            self.shutdown()
            raise

    def _send(self, frame: bytes) -> None:
        if self._closed:
            raise RuntimeError("executor: used after shutdown()")
        for proc in self._procs:
            try:
                proc.send(frame)
            except OSError as exc:
                raise (self._monitor.wait_for_failure(FAILURE_REPORT_S)
                       or WorkerFailedError(proc.rank, f"cannot be reached ({exc})")) from exc

    def _failure_behind(self, exc: RuntimeError) -> RuntimeError:
        """The worker failure that made a collective fail, if one is seen shortly; else `exc`."""
        if isinstance(exc, WorkerFailedError):
            return exc
        return self._monitor.wait_for_failure(FAILURE_REPORT_S) or exc

    def _on_failure(self, error: WorkerFailedError) -> None:
        """Monitor thread: a rank is gone, so the group is. Free every rank stuck in a collective."""
        for proc in self._procs:
            proc.kill()
        if self.worker.tp is not None:
            self.worker.tp.abort()


def _ignore(error: WorkerFailedError) -> None:
    pass


def _release(monitor: WorkerMonitor, procs: list[WorkerProcess]) -> None:
    monitor.stop()
    stop_workers(procs, _STOP_FRAME, STOP_TIMEOUT_S)

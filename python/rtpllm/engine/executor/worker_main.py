"""A tensor-parallel worker process: one rank > 0 (started by MultiprocExecutor as
`python -m rtpllm.engine.executor.worker_main --fd N`; protocol in worker_procs.py).

It exits after StopWorker, when the engine's end of the socket closes (the engine is gone), and
after any failure, which it reports first. It ignores SIGINT: Ctrl-C reaches the whole process
group, and the engine decides how to stop.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import socket
import sys
import threading
import traceback
from typing import Optional

import torch

from rtpllm.engine.link.frames import recv_blocking, send_blocking
from rtpllm.engine.in_flight import PendingInputs
from rtpllm.engine.link.messages import (InitRunner, InitWorker, StopWorker, WorkerError, WorkerKVOps, WorkerLoaded,
                                         WorkerPDGrant, WorkerPDPush, WorkerPDRevoke, WorkerReady, WorkerStep)

_PD_COMMANDS = (WorkerPDGrant, WorkerPDRevoke, WorkerPDPush)
# How often a worker with KV tier transfers under way polls them while no message comes.
_KV_POLL_S = 0.0005


def serve(sock: socket.socket) -> int:
    init = recv_blocking(sock)
    if not isinstance(init, InitWorker):
        raise TypeError(f"worker: expected InitWorker first, got {type(init).__name__}")
    spec = init.spec
    logging.basicConfig(level=logging.WARNING,
                        format=f"%(asctime)s %(levelname)s %(name)s [tp rank {spec.rank}]: %(message)s")
    from rtpllm.engine.executor.worker import Worker

    worker = Worker(spec)
    pd = None  # pd/worker_side.WorkerPD: this rank's part of prefill-decode disaggregation
    kv = None  # engine/kv_tier_mirror.WorkerKVTiers: this rank's KV tiers
    sending = threading.Lock()  # the PD thread answers too

    def send(message) -> None:
        with sending:
            send_blocking(sock, message)

    try:
        worker.load_model()
        send(WorkerLoaded(spec.rank))
        worker.join_group()
        while True:
            if kv is not None:
                kv.poll()
                if kv.pending and not select.select([sock], [], [], _KV_POLL_S)[0]:
                    continue  # no message yet: poll the transfers again
            try:
                message = recv_blocking(sock)
            except EOFError:
                return 0  # the engine is gone
            kind = type(message)
            if kind is WorkerStep:
                pending = None
                if message.pending_positions is not None:
                    pending = PendingInputs(message.pending_positions, message.pending_rows, worker.last_sampled)
                drafts = None
                if message.drafts is not None:
                    drafts = torch.from_numpy(message.drafts).to(spec.device)
                worker.execute(message.batch, None, message.prompt_logprob_seqs, pending, drafts)
            elif kind is InitRunner:
                num_blocks = worker.init_runner(message.max_model_len, message.extra_kv_bytes_per_block)
                if spec.config.pd.enabled:
                    from rtpllm.pd.worker_side import WorkerPD

                    pd = WorkerPD(spec.config, worker.runner, worker.loaded.arch, spec.model_path, spec.dtype,
                                  spec.rank, send)
                from rtpllm.engine.kv_tier_mirror import WorkerKVTiers

                kv = WorkerKVTiers.build(spec, worker.runner, worker.loaded.arch, message.kv_root_hash, send)
                send(WorkerReady(spec.rank, num_blocks, pd.port if pd is not None else 0))
            elif kind is WorkerKVOps and kv is not None:
                kv.apply(message.operations)
            elif kind in _PD_COMMANDS and pd is not None:
                pd.handle(message)
            elif kind is StopWorker:
                return 0
            else:
                raise TypeError(f"worker: {kind.__name__} is not a command")
    except BaseException as exc:  # noqa: BLE001 - reported to the engine, which names this rank
        try:
            send(WorkerError(f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        except OSError:
            pass  # the engine is gone too
        return 1
    finally:
        if kv is not None:
            kv.close()
        if pd is not None:
            pd.close()
        worker.close()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fd", type=int, required=True, help="the inherited socket to the engine")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_grad_enabled(False)
    with socket.socket(fileno=args.fd) as sock:
        sock.setblocking(True)
        return serve(sock)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skips the interpreter's teardown (torch's, gloo's threads): it took seconds on a busy host,
    # and the engine waits for the exit. Nothing is left to flush or close.
    os._exit(code)

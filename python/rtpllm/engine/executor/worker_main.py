"""A tensor-parallel worker process: one rank > 0 (started by MultiprocExecutor as
`python -m rtpllm.engine.executor.worker_main --fd N`; protocol in worker_procs.py).

It exits after ("stop",), when the engine's end of the socket closes (the engine is gone), and
after any failure, which it reports first. It ignores SIGINT: Ctrl-C reaches the whole process
group, and the engine decides how to stop.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import traceback
from typing import Optional

import torch

from rtpllm.engine.frames import recv_blocking, send_blocking
from rtpllm.engine.in_flight import PendingInputs


def serve(sock: socket.socket) -> int:
    _, spec = recv_blocking(sock)
    logging.basicConfig(level=logging.WARNING,
                        format=f"%(asctime)s %(levelname)s %(name)s [tp rank {spec.rank}]: %(message)s")
    from rtpllm.engine.executor.worker import Worker

    worker = Worker(spec)
    try:
        worker.load_model()
        send_blocking(sock, ("loaded", spec.rank))
        worker.join_group()
        while True:
            try:
                message = recv_blocking(sock)
            except EOFError:
                return 0  # the engine is gone
            kind = message[0]
            if kind == "step":
                _, batch, prompt_logprob_seqs, positions, rows = message
                pending = None if positions is None else PendingInputs(positions, rows, worker.last_sampled)
                worker.execute(batch, None, prompt_logprob_seqs, pending)
            elif kind == "init_runner":
                send_blocking(sock, ("ready", spec.rank, worker.init_runner(message[1])))
            elif kind == "stop":
                return 0
            else:
                raise ValueError(f"worker: unknown command {kind!r}")
    except BaseException as exc:  # noqa: BLE001 - reported to the engine, which names this rank
        try:
            send_blocking(sock, ("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        except OSError:
            pass  # the engine is gone too
        return 1
    finally:
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

"""Prefill-decode disaggregation on a tensor-parallel rank > 0 (a worker process).

Rank 0 keeps all the PD logic (engine_side.py: reservations, notices, the first token); a worker
only moves its own KV heads, as rank 0 tells it (engine/link/messages.py):
    decode worker:  its transfer engine listens (the port goes to rank 0 in WorkerReady, and from
                    there into the KVDestination); WorkerPDGrant / WorkerPDRevoke mirror rank 0's
                    write grants (a grant is acknowledged before the reservation goes out, so a
                    prefill never finds it missing);
    prefill worker: WorkerPDPush writes this rank's heads of a computed prompt, every layer in one
                    put, into the decode rank with the same heads, from a thread of its own, and
                    answers WorkerPDPushed once the write is DONE (remote completion) or FAILED.
                    Rank 0 sends the last layer's notice (with the first token) only after every
                    worker answered DONE, so decode rank 0's notices mean every rank's heads landed.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from typing import Callable, Optional

from rtpllm.engine.link.messages import LinkMessage, WorkerPDAck, WorkerPDGrant, WorkerPDPush, WorkerPDPushed

logger = logging.getLogger(__name__)


class WorkerPD:
    def __init__(self, config, runner, arch, model_path: str, dtype, rank: int,
                 send: Callable[[LinkMessage], None]):
        from rtpllm import _C
        from rtpllm.engine.kv_tiers import kv_layout
        from rtpllm.pd.engine_side import pd_identity_of

        pd = config.pd
        caches = runner.kv_caches
        self._cuda = caches[0].device.type == "cuda"
        if not self._cuda:
            os.environ.setdefault("UCX_TLS", "tcp")  # host memory between processes: TCP works everywhere
        self.role, self.rank, self._send = pd.role, rank, send
        self.timeout_s = pd.pd_timeout_s
        port = pd.pd_transfer_port + rank if pd.pd_transfer_port and pd.role == "decode" else 0
        self.transfer = _C.UcxTransfer(
            _C.TransferOptions(name=f"rtpllm-{pd.role}-rank{rank}", identity=pd_identity_of(model_path, dtype, arch),
                               listen_host=pd.pd_transfer_host, listen_port=port, timeout_s=pd.pd_timeout_s,
                               require_write_grants=pd.role == "decode"),
            cuda_device=caches[0].device.index or 0 if self._cuda else None)
        self.transfer.register_kv(kv_layout(caches, runner.block_size))
        self._caches = caches  # registered memory: kept alive as long as the transfer engine
        first = caches[0]
        self._bytes_per_token = 2 * first.shape[3] * first.shape[4] * first.element_size() * len(caches)
        self._peers: dict[tuple[str, int], int] = {}
        self._pushes: "queue.Queue[Optional[tuple]]" = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        if pd.role == "prefill":
            self._thread = threading.Thread(target=self._run, name="rtpllm-pd-worker-push", daemon=True)
            self._thread.start()

    @property
    def port(self) -> int:
        return self.transfer.listen_port if self.role == "decode" else 0

    def handle(self, message) -> None:
        """One PD command from rank 0 (the worker's loop, between steps)."""
        if isinstance(message, WorkerPDGrant):
            self.transfer.grant_writes(message.transfer_id, list(message.blocks))
            self._send(WorkerPDAck(self.rank, message.transfer_id))
        elif isinstance(message, WorkerPDPush):
            event = None
            if self._cuda:  # the step that computed the prompt is queued before this: write after it
                import torch

                event = torch.cuda.Event()
                event.record()
            self._pushes.put((message, event))
        else:
            self.transfer.revoke_writes(message.transfer_id)

    def close(self) -> None:
        if self._thread is not None:
            self._pushes.put(None)
            self._thread.join(timeout=5.0)

    def _run(self) -> None:
        while True:
            item = self._pushes.get()
            if item is None:
                return
            message, event = item
            if event is not None:
                event.synchronize()
            error = self._write(message)
            moved = 0 if error else message.num_tokens * self._bytes_per_token
            self._send(WorkerPDPushed(self.rank, message.transfer_id, error, moved))

    def _write(self, message: WorkerPDPush) -> str:
        from rtpllm import _C

        try:
            peer = self._peer(message.host, message.port)
            request = _C.TransferRequest(request_id=message.transfer_id, local_blocks=list(message.local_blocks),
                                         remote_blocks=list(message.remote_blocks), num_tokens=message.num_tokens,
                                         notify=False)
            status = self.transfer.wait(self.transfer.put(peer, request), 3 * self.timeout_s)
        except (RuntimeError, ValueError) as exc:
            return f"rank {self.rank}: {exc}"
        if status.state == _C.TransferState.DONE:
            return ""
        return f"rank {self.rank}: {status.error or 'the write did not end in time'}"

    def _peer(self, host: str, port: int) -> int:
        """The connection to a decode rank, dialled once and redialled after it failed."""
        from rtpllm.pd.prefill_side import cached_peer

        key = (host, port)
        peer = cached_peer(self.transfer, self._peers, key)
        if not peer:
            self._peers[key] = peer = self.transfer.connect(host, port)
        return peer

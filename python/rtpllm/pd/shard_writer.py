"""Writes one tensor-parallel rank's KV heads of a computed prompt into decode ranks, from a thread.

Used by every prefill rank for the writes that do not go layer by layer with notices (those are
prefill rank 0's into decode rank 0, prefill_side.py): a worker's (pd/worker_side.py) and, when
the decode instance has more ranks than the prefill instance, rank 0's own writes into decode
ranks 1.. (pd/head_map.py says which heads go where). Each write is every layer in one put, without
a notice; the caller hears once all of a request's writes are final (DONE, or the first FAILED).
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable, Optional

logger = logging.getLogger(__name__)

# on_done(transfer_id, error, bytes): error "" when every write is DONE (remote completion).
OnDone = Callable[[int, str, int], None]


class ShardWriter:
    def __init__(self, transfer, *, rank: int, timeout_s: float, head_token_bytes: int, cuda: bool,
                 on_done: OnDone):
        self.transfer = transfer
        self.rank = rank
        self.timeout_s = timeout_s
        self._head_token_bytes = head_token_bytes  # K and V of one head of one token, every layer
        self._cuda = cuda
        self._on_done = on_done
        self._peers: dict[tuple[str, int], int] = {}
        self._jobs: "queue.Queue[Optional[tuple]]" = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=f"rtpllm-pd-shard-writer-{rank}", daemon=True)
        self._thread.start()

    def submit(self, transfer_id: int, writes: list, local_blocks: list, remote_blocks: list, num_tokens: int) -> None:
        """Queues a request's writes ([host, port, src_head_offset, dst_head_offset, num_heads]
        each). Call after the step that computed the prompt was queued: on the GPU the writes wait
        for an event recorded here."""
        event = None
        if self._cuda:
            import torch

            event = torch.cuda.Event()
            event.record()
        self._jobs.put((transfer_id, writes, local_blocks, remote_blocks, num_tokens, event))

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=5.0)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            transfer_id, writes, local_blocks, remote_blocks, num_tokens, event = job
            if event is not None:
                event.synchronize()
            error, moved = "", 0
            for host, port, src_head_offset, dst_head_offset, num_heads in writes:
                error = self._write(transfer_id, host, port, local_blocks, remote_blocks, num_tokens,
                                    src_head_offset, dst_head_offset, num_heads)
                if error:
                    break
                moved += num_tokens * num_heads * self._head_token_bytes
            self._on_done(transfer_id, error, 0 if error else moved)

    def _write(self, transfer_id: int, host: str, port: int, local_blocks: list, remote_blocks: list,
               num_tokens: int, src_head_offset: int, dst_head_offset: int, num_heads: int) -> str:
        from rtpllm import _C

        try:
            peer = self._peer(host, port)
            request = _C.TransferRequest(request_id=transfer_id, local_blocks=list(local_blocks),
                                         remote_blocks=list(remote_blocks), num_tokens=num_tokens, notify=False,
                                         num_heads=num_heads, local_head_offset=src_head_offset,
                                         remote_head_offset=dst_head_offset)
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

"""Writes one tensor-parallel rank's KV heads of a computed prompt into decode ranks, from a thread.

Used by every prefill rank for the writes that do not carry decode's notices (those are prefill
rank 0's into decode rank 0, prefill_side.py): a worker's (pd/worker_side.py) and, when the decode
instance has more ranks than the prefill instance, rank 0's own writes into decode ranks 1..
(pd/head_map.py says which heads go where). Writes carry no notice; the caller hears once all of a
request's writes are final (DONE, or the first FAILED), through `on_done`.

Two ways to write a request:
    layer by layer  arm() before the forward that computes the prompt's last chunk, then on_layer(l)
                    from the model's layer hook as layer l is computed (the write overlaps the next
                    layers' compute); the last layer ends every armed request;
    at once         submit() after that forward: every layer in one put per write (the
                    destination came only after the prompt was computed).
On a GPU every layer() / submit() records a CUDA event on the current stream, and the thread issues
the puts once it completed, so the step's stream is never synchronized for a write.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

from rtpllm import _C

logger = logging.getLogger(__name__)

# on_done(transfer_id, error, bytes): error "" when every write is DONE (remote completion).
OnDone = Callable[[int, str, int], None]


@dataclass
class _Request:
    writes: list          # [host, port, src_head_offset, dst_head_offset, num_heads] each
    local_blocks: list
    remote_blocks: list
    num_tokens: int
    handles: list = field(default_factory=list)
    error: str = ""
    bytes: int = 0


def cached_peer(transfer, peers: dict, key: tuple[str, int]) -> int:
    """The cached connection to a decode instance (or rank) at key, 0 when there is none: a failed
    one is disconnected and dropped from `peers`, so that the next write dials anew."""
    peer = peers.get(key)
    if peer is None:
        return 0
    state = next((p.state for p in transfer.peers() if p.id == peer), _C.PeerState.FAILED)
    if state == _C.PeerState.CONNECTED:
        return peer
    transfer.disconnect(peer)
    del peers[key]
    return 0


class ShardWriter:
    def __init__(self, transfer, *, rank: int, timeout_s: float, head_token_layer_bytes: int, num_layers: int,
                 cuda: bool, on_done: OnDone):
        self.transfer = transfer
        self.rank = rank
        self.timeout_s = timeout_s
        self._head_token_layer_bytes = head_token_layer_bytes  # K and V of one head of one token in one layer
        self._num_layers = num_layers
        self._cuda = cuda
        self._on_done = on_done
        self._peers: dict[tuple[str, int], int] = {}
        self._requests: dict[int, _Request] = {}  # the thread's own
        self._armed: list[int] = []  # the caller's: requests written layer by layer in the coming forward
        self._jobs: "queue.Queue[Optional[tuple]]" = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=f"rtpllm-pd-shard-writer-{rank}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the caller's side
    def arm(self, transfer_id: int, writes: list, local_blocks: list, remote_blocks: list, num_tokens: int) -> None:
        """Writes the request layer by layer in the coming forward (on_layer hands the layers over)."""
        self._begin(transfer_id, writes, local_blocks, remote_blocks, num_tokens)
        self._armed.append(transfer_id)

    @property
    def armed(self) -> bool:
        return bool(self._armed)

    def on_layer(self, layer: int) -> None:
        """The model's layer hook: layer `layer` of every armed request is computed (or queued on the
        stream); after the last layer they are no longer armed."""
        for transfer_id in self._armed:
            self._layer(transfer_id, layer)
        if layer == self._num_layers - 1:
            for transfer_id in self._armed:
                self._end(transfer_id)
            self._armed = []

    def submit(self, transfer_id: int, writes: list, local_blocks: list, remote_blocks: list, num_tokens: int) -> None:
        """Every layer at once; call after the step that computed the prompt was queued."""
        self._begin(transfer_id, writes, local_blocks, remote_blocks, num_tokens)
        self._layer(transfer_id, -1)
        self._end(transfer_id)

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=5.0)

    def _begin(self, transfer_id: int, writes: list, local_blocks: list, remote_blocks: list,
               num_tokens: int) -> None:
        self._jobs.put(("begin", transfer_id, _Request(list(writes), list(local_blocks), list(remote_blocks),
                                                       num_tokens), None))

    def _layer(self, transfer_id: int, layer: int) -> None:
        """Layer `layer` (-1: every layer) of the request is computed, or queued on the stream."""
        self._jobs.put(("layer", transfer_id, layer, self._event()))

    def _end(self, transfer_id: int) -> None:
        self._jobs.put(("end", transfer_id, None, None))

    def _event(self):
        if not self._cuda:
            return None
        import torch

        event = torch.cuda.Event()
        event.record()
        return event

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            kind, transfer_id, arg, event = job
            if kind == "begin":
                self._requests[transfer_id] = arg
                continue
            request = self._requests.get(transfer_id)
            if request is None:
                continue
            if kind == "layer":
                if event is not None:
                    event.synchronize()
                self._issue(transfer_id, request, arg)
            else:
                del self._requests[transfer_id]
                self._finish(transfer_id, request)

    def _issue(self, transfer_id: int, request: _Request, layer: int) -> None:
        """Starts the layer's puts (every write's); a request that failed starts none."""
        for host, port, src_head_offset, dst_head_offset, num_heads in request.writes:
            if request.error:
                return
            try:
                put = _C.TransferRequest(request_id=transfer_id, local_blocks=request.local_blocks,
                                         remote_blocks=request.remote_blocks, num_tokens=request.num_tokens,
                                         layer=layer, notify=False, num_heads=num_heads,
                                         local_head_offset=src_head_offset, remote_head_offset=dst_head_offset)
                request.handles.append(self.transfer.put(self._peer(host, port), put))
            except (RuntimeError, ValueError) as exc:
                request.error = f"rank {self.rank}: {exc}"
                return
            layers = self._num_layers if layer < 0 else 1
            request.bytes += request.num_tokens * num_heads * self._head_token_layer_bytes * layers

    def _finish(self, transfer_id: int, request: _Request) -> None:
        """Waits until every started put is final (each ends within the engine's timeout), then answers."""
        for handle in request.handles:
            status = self.transfer.wait(handle, 3 * self.timeout_s)
            if status.state != _C.TransferState.DONE and not request.error:
                request.error = f"rank {self.rank}: {status.error or 'the write did not end in time'}"
        self._on_done(transfer_id, request.error, 0 if request.error else request.bytes)

    def _peer(self, host: str, port: int) -> int:
        """The connection to a decode rank, dialled once and redialled after it failed."""
        key = (host, port)
        peer = cached_peer(self.transfer, self._peers, key)
        if not peer:
            self._peers[key] = peer = self.transfer.connect(host, port)
        return peer

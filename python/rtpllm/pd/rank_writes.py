"""A prefill instance's KV writes without notices, for tensor parallelism (prefill_side.py).

Every (prefill rank, decode rank) pair of pd/head_map.py but (0, 0) writes without notices: the
workers' pairs (told over the executor, answered by WorkerPDPushed) and rank 0's own pairs into
decode ranks 1.. (a ShardWriter here, made when first needed). `hand_out` starts a request's,
layer by layer in the coming forward or at once; `layer` hands rank 0's own the layers as the model
computes them; `answers` collects the final word of each rank (one per rank that was handed
writes: every worker, and rank 0 when it had some).
"""

from __future__ import annotations

import queue
from typing import Optional

from rtpllm.pd.shard_writer import ShardWriter


class RankWrites:
    def __init__(self, transfer, workers, tp_size: int, *, timeout_s: float, head_token_layer_bytes: int,
                 num_layers: int, cuda: bool):
        self._transfer, self._workers, self._tp_size = transfer, workers, tp_size
        self._writer_args = dict(rank=0, timeout_s=timeout_s, head_token_layer_bytes=head_token_layer_bytes,
                                 num_layers=num_layers, cuda=cuda)
        self._writer: Optional[ShardWriter] = None
        self._own_answers: "queue.Queue[tuple[int, str, int]]" = queue.Queue()

    def hand_out(self, transfer_id: int, writes: dict, local_blocks: list, remote_blocks: list, num_tokens: int,
                 by_layer: bool) -> int:
        """Starts a request's writes (`writes`: prefill rank -> its list, pd/head_map.py order);
        by_layer: call before the forward that computes the prompt's last chunk. Returns how many
        answers will come."""
        blocks = (local_blocks, remote_blocks, num_tokens)
        expected = 0
        if self._workers is not None:
            self._workers.pd_push(transfer_id, writes, *blocks, by_layer=by_layer)
            expected += self._tp_size - 1
        own = writes.get(0)
        if own:
            if self._writer is None:
                self._writer = ShardWriter(self._transfer, on_done=lambda *answer: self._own_answers.put(answer),
                                           **self._writer_args)
            if by_layer:
                self._writer.arm(transfer_id, own, *blocks)
            else:
                self._writer.submit(transfer_id, own, *blocks)
            expected += 1
        return expected

    def layer(self, layer: int) -> None:
        """Layer `layer` of the forward under way is computed (the model's layer hook, rank 0): rank
        0's own writes of the requests handed out by_layer before it."""
        if self._writer is not None:
            self._writer.on_layer(layer)

    def answers(self) -> list[tuple[int, str, int]]:
        """(transfer id, error or "", bytes) of every rank that finished since the last call."""
        out = [(a.transfer_id, a.error, a.bytes) for a in self._workers.pd_pushed()] if self._workers else []
        while not self._own_answers.empty():
            out.append(self._own_answers.get_nowait())
        return out

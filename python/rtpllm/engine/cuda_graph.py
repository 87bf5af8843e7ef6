"""CUDA graphs for decode steps: one captured forward (model + logits) per batch-size bucket.

A decode step launches hundreds of small kernels; replaying them as one graph removes the launch
gaps that otherwise dominate a small batch. Each bucket's graph reads its inputs from static
device buffers (`DecodeInputs`), so a replay is: one copy of this step's arrays, padding rows
included, into the buffers, then the replay. Padding rows have slot -1 (their K/V is not
written) and context length 0 (the decode kernel writes zeros for them), so they never touch a
real block.
"""

from __future__ import annotations

import bisect
import time
from typing import Callable, Optional

import torch

from rtpllm.engine.decode_inputs import DecodeInputs
from rtpllm.engine.in_flight import PendingInputs
from rtpllm.layers.attention_metadata import AttentionMetadata


def decode_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to max_batch (the last bucket is max_batch itself)."""
    buckets = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return sorted(set(buckets + [max_batch]))


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], plan: Callable[[AttentionMetadata, int], None],
                 max_batch: int, max_blocks_per_seq: int, max_model_len: int, device: torch.device):
        """`plan(meta, max_seq_len)` is the attention backend's host-side planning hook."""
        self.model = model
        self.kv_caches = kv_caches
        self.device = device
        self.buckets = decode_buckets(max_batch)
        self.max_batch = self.buckets[-1]
        self.max_blocks_per_seq = max_blocks_per_seq
        self.inputs = DecodeInputs(self.max_batch, max_blocks_per_seq, device)
        self.query_start_loc = torch.arange(self.max_batch + 1, dtype=torch.int32, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}
        self._aux: dict[int, list[torch.Tensor]] = {}  # the model's aux hidden states, per bucket (EAGLE-3)
        start = time.perf_counter()
        self._capture_all(plan, max_model_len)
        self.capture_seconds = time.perf_counter() - start

    def can_run(self, batch) -> bool:
        return (batch.max_query_len == 1 and batch.num_seqs <= self.max_batch
                and batch.block_tables.shape[1] <= self.max_blocks_per_seq)

    def run(self, batch, pending: Optional[PendingInputs]) -> torch.Tensor:
        """Replays the smallest bucket that holds the decode batch; returns logits [num_seqs, vocab].
        `pending` names input tokens the step in flight is still sampling on the device."""
        n = batch.num_seqs
        bucket = self.buckets[bisect.bisect_left(self.buckets, n)]
        self.inputs.load(batch, bucket, pending)
        self._graphs[bucket].replay()
        if self._aux.get(bucket):
            self.model.aux_hidden_states = [h[:n] for h in self._aux[bucket]]
        return self._logits[bucket][:n]

    def _meta(self, bucket: int, max_model_len: int) -> AttentionMetadata:
        inputs = self.inputs
        return AttentionMetadata(
            slot_mapping=inputs.slot_mapping[:bucket], query_start_loc=self.query_start_loc[:bucket + 1],
            seq_lens=inputs.seq_lens[:bucket], num_computed=inputs.seq_lens[:bucket],
            block_tables=inputs.block_tables[:bucket], max_query_len=1, max_seq_len=max_model_len)

    @torch.inference_mode()
    def _capture_all(self, plan, max_model_len: int) -> None:
        pool = None
        # Largest first, so that the smaller graphs fit in the memory pool the largest one made.
        for bucket in reversed(self.buckets):
            meta = self._meta(bucket, max_model_len)
            plan(meta, max_model_len)
            args = (self.inputs.input_ids[:bucket], self.inputs.positions[:bucket], self.kv_caches, meta)
            self.inputs.slot_mapping[:bucket].fill_(-1)
            self.model.compute_logits(self.model(*args))  # warm-up: lazy inits and autotuning stay out of the graph
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self.model.compute_logits(self.model(*args))
            pool = graph.pool()
            self._graphs[bucket] = graph
            self._logits[bucket] = logits
            self._aux[bucket] = list(getattr(self.model, "aux_hidden_states", []))
        torch.cuda.synchronize(self.device)

"""CUDA graphs for the target's verify steps (opt-in: RTPLLM_SPEC_VERIFY_GRAPHS=1; not yet
validated on a GPU, so off by default).

A graph serves a bucket of B sequences with k + 1 query rows each (every sequence decodes with up
to k drafts). Sequences with fewer drafts, and padding sequences, fill their extra rows with slot
-1 (no K/V written) and positions clamped to their last real one; their context length is set as
if they had k drafts, so the extend kernel places the real rows at the right positions, and the
extra rows' outputs are never read. The prefill/extend kernel reads query_start_loc, seq_lens and
block tables from device memory, so one capture per (B, k) replays any step of that shape.
"""

from __future__ import annotations

import bisect
import os
import numpy as np
import torch

from rtpllm.layers.attention_metadata import AttentionMetadata
from rtpllm.spec.proposer import to_device

BUCKETS = (1, 2, 4, 8, 16)


def verify_graphs_enabled() -> bool:
    return os.environ.get("RTPLLM_SPEC_VERIFY_GRAPHS", "0") == "1"


class VerifyGraphs:
    def __init__(self, model, kv_caches: list[torch.Tensor], max_batch: int, max_k: int, max_blocks_per_seq: int,
                 block_size: int, device: torch.device):
        self.model = model
        self.kv_caches = kv_caches
        self.device = device
        self.buckets = [b for b in BUCKETS if b <= max_batch] or [1]
        self.max_k = max_k
        self.max_blocks = max_blocks_per_seq
        self.block_size = block_size
        b, rows = self.buckets[-1], self.buckets[-1] * (max_k + 1)
        self.input_ids = torch.zeros(rows, dtype=torch.int64, device=device)
        self.positions = torch.zeros(rows, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((rows,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(b, dtype=torch.int32, device=device)
        self.num_computed = torch.zeros(b, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(b, max_blocks_per_seq, dtype=torch.int32, device=device)
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._logits: dict[tuple[int, int], torch.Tensor] = {}
        self._aux: dict[tuple[int, int], list[torch.Tensor]] = {}
        self._query_start = {k: torch.arange(b + 1, dtype=torch.int32, device=device) * (k + 1)
                             for k in range(1, max_k + 1)}
        self._capture()

    def can_run(self, batch) -> bool:
        n = batch.num_seqs
        if n > self.buckets[-1] or batch.num_sampled != n or batch.num_draft_tokens == 0:
            return False
        counts = batch.draft_counts
        k = int(counts.max())
        return (k <= self.max_k and batch.block_tables.shape[1] <= self.max_blocks
                and np.array_equal(np.diff(batch.query_start_loc), counts + 1)
                and int(batch.max_seq_len) + k <= self.max_blocks * self.block_size)

    def run(self, batch, drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits float32 [num_sampled + num_draft_tokens, vocab] at every verified row of `batch`,
        the KV slots of those rows); the model's aux hidden states are left for those rows too."""
        n = batch.num_seqs
        counts = batch.draft_counts.astype(np.int64)
        k = int(counts.max())
        bucket = self.buckets[bisect.bisect_left(self.buckets, n)]
        width = k + 1
        rows = bucket * width
        starts = batch.query_start_loc[:-1].astype(np.int64)
        computed = batch.num_computed.astype(np.int64)
        t = np.arange(width)
        real = t[None, :] <= counts[:, None]  # [n, width]
        pos = computed[:, None] + np.minimum(t[None, :], counts[:, None])
        src = starts[:, None] + np.minimum(t[None, :], counts[:, None])  # the step's token index of each row
        ids = np.where(real, batch.input_token_ids[src], 0).astype(np.int64)
        slots = np.where(real, batch.slot_mapping[src], -1).astype(np.int64)
        host_ids = np.zeros(rows, dtype=np.int64)
        host_pos = np.tile(t, bucket).astype(np.int64)
        host_slots = np.full(rows, -1, dtype=np.int64)
        host_ids[:n * width] = ids.ravel()
        host_pos[:n * width] = pos.ravel()
        host_slots[:n * width] = slots.ravel()
        seq_lens = np.full(bucket, width, dtype=np.int32)
        seq_lens[:n] = computed + width
        num_computed = np.zeros(bucket, dtype=np.int32)
        num_computed[:n] = computed
        tables = np.zeros((bucket, self.max_blocks), dtype=np.int32)
        tables[:n, :batch.block_tables.shape[1]] = batch.block_tables
        self.input_ids[:rows].copy_(to_device(host_ids, self.device), non_blocking=True)
        self.positions[:rows].copy_(to_device(host_pos, self.device), non_blocking=True)
        self.slot_mapping[:rows].copy_(to_device(host_slots, self.device), non_blocking=True)
        self.seq_lens[:bucket].copy_(to_device(seq_lens, self.device), non_blocking=True)
        self.num_computed[:bucket].copy_(to_device(num_computed, self.device), non_blocking=True)
        self.block_tables[:bucket].copy_(to_device(tables, self.device), non_blocking=True)
        # The drafts: row i * width + t of sequence i holds its draft t (1 <= t <= k_i).
        seq_of_draft = np.repeat(np.arange(n), counts)
        t_of_draft = np.concatenate([np.arange(1, c + 1) for c in counts]) if counts.sum() else np.zeros(0, np.int64)
        draft_rows = to_device((seq_of_draft * width + t_of_draft).astype(np.int64), self.device)
        self.input_ids.index_copy_(0, draft_rows, drafts.to(torch.int64))
        self._graphs[(bucket, k)].replay()
        verified = to_device((np.arange(n)[:, None] * width + t[None, :])[real].astype(np.int64), self.device)
        aux = self._aux.get((bucket, k))
        if aux:
            self.model.aux_hidden_states = [h.index_select(0, verified) for h in aux]
        return self._logits[(bucket, k)].index_select(0, verified), self.slot_mapping.index_select(0, verified)

    def _meta(self, bucket: int, k: int) -> AttentionMetadata:
        rows = bucket * (k + 1)
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:rows], query_start_loc=self._query_start[k][:bucket + 1],
            seq_lens=self.seq_lens[:bucket], num_computed=self.num_computed[:bucket],
            block_tables=self.block_tables[:bucket], max_query_len=k + 1,
            max_seq_len=self.max_blocks * self.block_size)

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        for bucket in reversed(self.buckets):
            for k in range(self.max_k, 0, -1):
                rows = bucket * (k + 1)
                meta = self._meta(bucket, k)
                self.slot_mapping[:rows].fill_(-1)
                self.seq_lens[:bucket].fill_(k + 1)
                args = (self.input_ids[:rows], self.positions[:rows], self.kv_caches, meta)
                self.model.compute_logits(self.model(*args))  # warm-up outside the graph
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self.model.compute_logits(self.model(*args))
                pool = graph.pool()
                self._graphs[(bucket, k)] = graph
                self._logits[(bucket, k)] = logits
                self._aux[(bucket, k)] = list(getattr(self.model, "aux_hidden_states", []))
        torch.cuda.synchronize(self.device)

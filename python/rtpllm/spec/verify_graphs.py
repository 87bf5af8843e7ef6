"""CUDA graphs for the target's verify steps (on by default on CUDA; RTPLLM_SPEC_VERIFY_GRAPHS=0
turns them off).

An eager verify step of an 8B model is bound by the host launching its ~400 kernels (12.5 ms
against a 5.7 ms decode step on an H100 at batch 1); replaying a graph costs what the device work
costs. A graph serves a bucket of B sequences with k + 1 query rows each (every sequence decodes
with up to k drafts). Sequences with fewer drafts, and padding sequences, fill their extra rows
with slot -1 (no K/V written) and positions clamped to their last real one; their context length
is set as if they had k drafts, so the extend kernel places the real rows at the right positions,
and the extra rows' outputs are never read. The prefill/extend kernel reads query_start_loc,
seq_lens and block tables from device memory, so one capture per (B, k) replays any step of that
shape. Which (B, k) are captured (`verify_graph_shapes`): every batch bucket up to
`SpeculativeConfig.verify_graph_max_batch` (128 by default) with every k whose graph computes at
most MAX_GRAPH_ROWS rows; a step without a graph of its shape verifies eagerly.

Inputs travel as in decode_inputs.py: every array of a step is packed on the host into one pinned
buffer and moved with one copy; the graphs read views of its device twin. Every graph writes its
logits into one shared output buffer, so the graphs' memory pool holds one step's activations,
not a logits tensor per (B, k).
"""

from __future__ import annotations

import bisect
import os
import time
from typing import Optional

import numpy as np
import torch

from rtpllm.layers.attention_metadata import AttentionMetadata

# Batch sizes captured (those up to the configured bound, `SpeculativeConfig.verify_graph_max_batch`).
BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
# The most query rows (batch x (k + 1)) a captured graph computes. The adaptive policy keeps a large
# batch's verified rows near the GPU cost knee (~128 tokens): at batch 32 it gives k <= 3, at 64
# k = 1, beyond ~120 no drafts at all (adaptive.py, prior cost model), so graphs with more rows
# would rarely replay; and the largest graph sizes the pool all graphs share, and the logits
# buffer (rows x vocab float32: 131 MB at 256 rows of a 128K vocabulary).
MAX_GRAPH_ROWS = 256

_INT64_FIELDS = ("input_ids", "positions", "slot_mapping", "draft_rows", "verified")  # one per row
_INT32_FIELDS = ("seq_lens", "num_computed")  # one per sequence


def verify_graphs_enabled() -> bool:
    return os.environ.get("RTPLLM_SPEC_VERIFY_GRAPHS", "1") != "0"


class VerifyInputs:
    """A verify step's index arrays in one device byte buffer, filled by one copy per step from a
    ring of pinned staging buffers (the host packs step N+1 while step N's copy may still read
    the other one)."""

    def __init__(self, max_rows: int, max_batch: int, max_blocks: int, device: torch.device, ring: int = 2):
        self.max_rows, self.max_batch, self.max_blocks = max_rows, max_batch, max_blocks
        self._layout: dict[str, tuple[int, int, torch.dtype]] = {}  # name -> (offset, count, dtype)
        offset = 0
        for name in _INT64_FIELDS:
            self._layout[name] = (offset, max_rows, torch.int64)
            offset += 8 * max_rows
        for name in _INT32_FIELDS:
            self._layout[name] = (offset, max_batch, torch.int32)
            offset += 4 * max_batch
        self._tables_offset = (offset + 15) // 16 * 16
        self.nbytes = self._tables_offset + 4 * max_batch * max_blocks
        self.device_bytes = torch.zeros(self.nbytes, dtype=torch.uint8, device=device)
        self.views = self._views(self.device_bytes)
        pin = device.type == "cuda"
        self._staging = [torch.zeros(self.nbytes, dtype=torch.uint8, pin_memory=pin) for _ in range(ring)]
        self._host = [{name: t.numpy() for name, t in self._views(buf).items()} for buf in self._staging]
        self._copied = [torch.cuda.Event() if pin else None for _ in range(ring)]
        self._next = 0

    def _views(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        views = {name: buf[offset:offset + count * (8 if dtype == torch.int64 else 4)].view(dtype)
                 for name, (offset, count, dtype) in self._layout.items()}
        start = self._tables_offset
        views["block_tables"] = buf[start:start + 4 * self.max_batch * self.max_blocks].view(torch.int32).view(
            self.max_batch, self.max_blocks)
        return views

    def staging(self) -> dict[str, np.ndarray]:
        """The next staging buffer's numpy views, free to fill."""
        slot = self._next
        if self._copied[slot] is not None:
            self._copied[slot].synchronize()  # its previous copy has left the buffer
        return self._host[slot]

    def upload(self, bucket: int) -> None:
        """Copies the staging buffer just filled (block tables of `bucket` rows) to the device."""
        slot = self._next
        self._next = (self._next + 1) % len(self._staging)
        used = self._tables_offset + 4 * bucket * self.max_blocks
        self.device_bytes[:used].copy_(self._staging[slot][:used], non_blocking=True)
        if self._copied[slot] is not None:
            self._copied[slot].record()


def verify_graph_shapes(max_batch: int, max_k: int, max_rows: int = MAX_GRAPH_ROWS) -> list[tuple[int, int]]:
    """The (batch bucket, k) pairs to capture: every bucket up to max_batch with every k up to max_k
    whose graph computes at most max_rows query rows (so small batches get every k, and large
    ones the few drafts the adaptive policy gives them). Largest row count first: the first
    capture sizes the memory pool the others reuse."""
    buckets = [b for b in BUCKETS if b <= max_batch] or [1]
    shapes = [(b, k) for b in buckets for k in range(1, max_k + 1) if b * (k + 1) <= max_rows]
    return sorted(shapes, key=lambda shape: (-shape[0] * (shape[1] + 1), -shape[0]))


class VerifyGraphs:
    def __init__(self, model, kv_caches: list[torch.Tensor], max_batch: int, max_k: int, max_blocks_per_seq: int,
                 block_size: int, device: torch.device, max_rows: int = MAX_GRAPH_ROWS):
        self.model = model
        self.kv_caches = kv_caches
        self.device = device
        self.shapes = verify_graph_shapes(max_batch, max_k, max_rows)
        self.buckets = sorted({b for b, _ in self.shapes})
        self.max_k = max_k
        self.max_blocks = max_blocks_per_seq
        self.block_size = block_size
        self.capture_seconds = 0.0
        self.capture_bytes = 0  # what capturing added to the device memory reserved (pool, logits)
        b = self.buckets[-1]
        self.inputs = VerifyInputs(max(bb * (k + 1) for bb, k in self.shapes), b, max_blocks_per_seq, device)
        views = self.inputs.views
        self.input_ids, self.positions = views["input_ids"], views["positions"]
        self.slot_mapping, self.seq_lens = views["slot_mapping"], views["seq_lens"]
        self.num_computed, self.block_tables = views["num_computed"], views["block_tables"]
        self.slot_mapping.fill_(-1)
        self._logits: Optional[torch.Tensor] = None  # [max rows, vocab] float32, written by every graph
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._aux: dict[tuple[int, int], list[torch.Tensor]] = {}
        self._query_start = {k: torch.arange(b + 1, dtype=torch.int32, device=device) * (k + 1)
                             for k in range(1, max_k + 1)}
        self._capture()

    def _bucket(self, n: int, k: int) -> Optional[int]:
        """The captured bucket for n sequences with up to k drafts: the smallest one >= n (a larger
        bucket has no graph for this k either: it allows fewer rows per sequence)."""
        i = bisect.bisect_left(self.buckets, n)
        if i == len(self.buckets) or (self.buckets[i], k) not in self._graphs:
            return None
        return self.buckets[i]

    def can_run(self, batch) -> bool:
        n = batch.num_seqs
        if n > self.buckets[-1] or batch.num_sampled != n or batch.num_draft_tokens == 0:
            return False
        counts = batch.draft_counts
        k = int(counts.max())
        return (self._bucket(n, k) is not None and batch.block_tables.shape[1] <= self.max_blocks
                and np.array_equal(np.diff(batch.query_start_loc), counts + 1)
                and int(batch.max_seq_len) + k <= self.max_blocks * self.block_size)

    def run(self, batch, drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits float32 [num_sampled + num_draft_tokens, vocab] at every verified row of `batch`,
        the KV slots of those rows); the model's aux hidden states are left for those rows too."""
        n = batch.num_seqs
        counts = batch.draft_counts.astype(np.int64)
        k = int(counts.max())
        bucket = self._bucket(n, k)
        width = k + 1
        rows = bucket * width
        t = np.arange(width)
        clamped = np.minimum(t[None, :], counts[:, None])  # [n, width]
        real = t[None, :] <= counts[:, None]
        src = batch.query_start_loc[:-1].astype(np.int64)[:, None] + clamped  # the step's token of each row
        computed = batch.num_computed.astype(np.int64)
        grid = np.arange(n * width).reshape(n, width)
        verified = grid[real]  # rows with a real token, sequence after sequence
        draft_rows = grid[real & (t[None, :] >= 1)]  # row of draft t of sequence i: i * width + t

        host = self.inputs.staging()
        used = n * width
        host["input_ids"][:used] = np.where(real, batch.input_token_ids[src], 0).ravel()
        host["input_ids"][used:rows] = 0
        host["positions"][:used] = (computed[:, None] + clamped).ravel()
        host["positions"][used:rows] = np.tile(t, bucket - n)
        host["slot_mapping"][:used] = np.where(real, batch.slot_mapping[src], -1).ravel()
        host["slot_mapping"][used:rows] = -1
        host["seq_lens"][:n] = computed + width
        host["seq_lens"][n:bucket] = width
        host["num_computed"][:n] = computed
        host["num_computed"][n:bucket] = 0
        host["block_tables"][:n, :batch.block_tables.shape[1]] = batch.block_tables
        host["block_tables"][:n, batch.block_tables.shape[1]:] = 0
        host["block_tables"][n:bucket] = 0
        host["draft_rows"][:draft_rows.shape[0]] = draft_rows
        host["verified"][:verified.shape[0]] = verified
        self.inputs.upload(bucket)

        views = self.inputs.views
        self.input_ids.index_copy_(0, views["draft_rows"][:draft_rows.shape[0]], drafts.to(torch.int64))
        self._graphs[(bucket, k)].replay()
        verified_rows = views["verified"][:verified.shape[0]]
        aux = self._aux.get((bucket, k))
        if aux:
            self.model.aux_hidden_states = [h.index_select(0, verified_rows) for h in aux]
        return self._logits.index_select(0, verified_rows), self.slot_mapping.index_select(0, verified_rows)

    def _meta(self, bucket: int, k: int) -> AttentionMetadata:
        rows = bucket * (k + 1)
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:rows], query_start_loc=self._query_start[k][:bucket + 1],
            seq_lens=self.seq_lens[:bucket], num_computed=self.num_computed[:bucket],
            block_tables=self.block_tables[:bucket], max_query_len=k + 1,
            max_seq_len=self.max_blocks * self.block_size)

    @torch.inference_mode()
    def _capture(self) -> None:
        started = time.perf_counter()
        reserved = torch.cuda.memory_reserved(self.device)
        pool = None
        for bucket, k in self.shapes:
            rows = bucket * (k + 1)
            meta = self._meta(bucket, k)
            self.slot_mapping[:rows].fill_(-1)
            self.seq_lens[:bucket].fill_(k + 1)
            args = (self.input_ids[:rows], self.positions[:rows], self.kv_caches, meta)
            warm = self.model.compute_logits(self.model(*args))  # warm-up outside the graph
            if self._logits is None:
                self._logits = torch.empty(self.inputs.max_rows, warm.shape[1], dtype=warm.dtype, device=self.device)
            del warm
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._logits[:rows].copy_(self.model.compute_logits(self.model(*args)))
            pool = graph.pool()
            self._graphs[(bucket, k)] = graph
            self._aux[(bucket, k)] = list(getattr(self.model, "aux_hidden_states", []))
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - started
        self.capture_bytes = torch.cuda.memory_reserved(self.device) - reserved

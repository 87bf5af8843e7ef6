"""A decode step's inputs, moved to the device in one copy for the CUDA graphs to read.

A CUDA graph reads its inputs from fixed device addresses. Copying each array there separately
costs a host-to-device copy per array plus a device-to-device copy (or a cast kernel) per array
every step: at batch 1, where the whole step is ~6 ms of weight streaming, those dozen small
operations were ~0.1 ms of device time. Here every array lives in one byte buffer with a fixed
layout: the host packs the step into a pinned copy of it with numpy, one copy moves the used
prefix to the device, and the graph's input tensors are views of the device buffer.

Layout (max_batch rows each; the block table last, so that a step copies only its own rows):
    input_ids, positions, slot_mapping, pending_positions, pending_rows: int64
    seq_lens: int32;  block_tables: int32 [max_batch, max_blocks_per_seq]
"""

from __future__ import annotations

from typing import Optional

import torch

from rtpllm.engine.in_flight import PendingInputs

_INT64_FIELDS = ("input_ids", "positions", "slot_mapping", "pending_positions", "pending_rows")


class DecodeInputs:
    def __init__(self, max_batch: int, max_blocks_per_seq: int, device: torch.device, ring: int = 2):
        self.max_batch = max_batch
        self.max_blocks_per_seq = max_blocks_per_seq
        b, w = max_batch, max_blocks_per_seq
        self._offsets: dict[str, int] = {}
        offset = 0
        for name in _INT64_FIELDS:
            self._offsets[name] = offset
            offset += 8 * b
        self._offsets["seq_lens"] = offset
        offset += 4 * b
        offset = (offset + 15) // 16 * 16
        self._offsets["block_tables"] = offset
        self.nbytes = offset + 4 * b * w

        self.device_bytes = torch.zeros(self.nbytes, dtype=torch.uint8, device=device)
        views = self._views(self.device_bytes)
        self.input_ids: torch.Tensor = views["input_ids"]
        self.positions: torch.Tensor = views["positions"]
        self.slot_mapping: torch.Tensor = views["slot_mapping"]
        self.seq_lens: torch.Tensor = views["seq_lens"]
        self.block_tables: torch.Tensor = views["block_tables"]
        self._pending_positions: torch.Tensor = views["pending_positions"]
        self._pending_rows: torch.Tensor = views["pending_rows"]
        self.slot_mapping.fill_(-1)  # rows no step has filled yet are padding: nothing written

        # A ring of pinned staging buffers: the host packs step N+1 into one while the copy of
        # step N may still be reading the other. An event per buffer says when it is free again.
        pin = device.type == "cuda"
        self._staging = [torch.zeros(self.nbytes, dtype=torch.uint8, pin_memory=pin) for _ in range(ring)]
        self._staging_views = [
            {name: t.numpy() for name, t in self._views(buf).items()} for buf in self._staging]
        self._copied = [torch.cuda.Event() if pin else None for _ in range(ring)]
        self._next = 0

    def _views(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        b, w = self.max_batch, self.max_blocks_per_seq
        views = {name: buf[self._offsets[name]:self._offsets[name] + 8 * b].view(torch.int64)
                 for name in _INT64_FIELDS}
        views["seq_lens"] = buf[self._offsets["seq_lens"]:self._offsets["seq_lens"] + 4 * b].view(torch.int32)
        start = self._offsets["block_tables"]
        views["block_tables"] = buf[start:start + 4 * b * w].view(torch.int32).view(b, w)
        return views

    def load(self, batch, bucket: int, pending: Optional[PendingInputs]) -> None:
        """Puts a decode batch (one token per sequence) into rows [0, num_seqs) and padding into
        rows [num_seqs, bucket): slot -1 (no K/V written) and context length 0 (nothing read)."""
        n = batch.num_seqs
        width = batch.block_tables.shape[1]
        if not n <= bucket <= self.max_batch or width > self.max_blocks_per_seq:
            raise ValueError(f"decode inputs: {n} sequences x {width} blocks do not fit bucket {bucket} "
                             f"of {self.max_batch} x {self.max_blocks_per_seq}")
        slot = self._next
        self._next = (self._next + 1) % len(self._staging)
        if self._copied[slot] is not None:
            self._copied[slot].synchronize()  # its previous copy has left the buffer
        host = self._staging_views[slot]
        host["input_ids"][:n] = batch.input_token_ids
        host["positions"][:n] = batch.positions
        host["slot_mapping"][:n] = batch.slot_mapping
        host["seq_lens"][:n] = batch.seq_lens
        host["block_tables"][:n, :width] = batch.block_tables
        host["input_ids"][n:bucket] = 0
        host["positions"][n:bucket] = 0
        host["slot_mapping"][n:bucket] = -1
        host["seq_lens"][n:bucket] = 0
        num_pending = 0
        if pending is not None:
            num_pending = len(pending.positions)
            host["pending_positions"][:num_pending] = pending.positions
            host["pending_rows"][:num_pending] = pending.rows

        used = self._offsets["block_tables"] + 4 * n * self.max_blocks_per_seq
        self.device_bytes[:used].copy_(self._staging[slot][:used], non_blocking=True)
        if self._copied[slot] is not None:
            self._copied[slot].record()
        if num_pending:
            # Tokens the step in flight is sampling: gathered on the device, never via the host.
            tokens = pending.token_ids.index_select(0, self._pending_rows[:num_pending])
            self.input_ids.index_copy_(0, self._pending_positions[:num_pending], tokens.to(torch.int64))

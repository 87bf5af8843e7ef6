"""Moves a step's small index arrays to the device through reused pinned buffers.

Pinned (page-locked) staging makes the copies truly asynchronous; allocating pinned memory per
step would cost more than the copies, so each named array keeps its buffer and grows it rarely.
"""

from __future__ import annotations

import numpy as np
import torch


class HostToDevice:
    def __init__(self, device: torch.device):
        self.device = device
        self._buffers: dict[str, torch.Tensor] = {}
        self._copies_done = torch.cuda.Event() if device.type == "cuda" else None

    def begin_step(self) -> None:
        # The previous step's copies may still be reading the buffers about to be overwritten.
        if self._copies_done is not None:
            self._copies_done.synchronize()

    def end_step(self) -> None:
        if self._copies_done is not None:
            self._copies_done.record()

    def __call__(self, name: str, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if self.device.type == "cpu":
            return tensor  # shares the batch's memory: no copy at all
        buffer = self._buffers.get(name)
        if buffer is None or buffer.dtype != tensor.dtype or buffer.numel() < tensor.numel():
            buffer = torch.empty(max(2 * tensor.numel(), 4096), dtype=tensor.dtype, pin_memory=True)
            self._buffers[name] = buffer
        staged = buffer[:tensor.numel()].view(tensor.shape)
        staged.copy_(tensor)
        return staged.to(self.device, non_blocking=True)

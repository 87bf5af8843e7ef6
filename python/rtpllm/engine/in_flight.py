"""The step the engine has launched but not yet read back (asynchronous scheduling).

With one step in flight, the scheduler plans step N+1 while the device still runs step N: the
sequences N samples get placeholder tokens (-1) in N+1's inputs, and the model runner takes
their values from N's sampled-token tensor on the device (`PendingInputs`). N's tokens travel
to the host through a pinned buffer and an event (`TokenReadback`), and are read when the engine
resolves N, after it has launched N+1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

PENDING_TOKEN = -1  # the scheduler's placeholder (kPendingToken)


class TokenReadback:
    """Starts device-to-host copies of sampled tokens without waiting for them: a small ring of
    pinned buffers (one step in flight, one being read) and an event per copy."""

    def __init__(self, device: torch.device, max_rows: int, depth: int = 3):
        self.device = device
        self._cuda = device.type == "cuda"
        # int64, the sampler's dtype: the copy then needs no cast kernel on the device.
        self._buffers = [torch.empty(max(max_rows, 1), dtype=torch.int64, pin_memory=self._cuda) for _ in range(depth)]
        self._next = 0

    def start(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.cuda.Event]]:
        n = token_ids.shape[0]
        if n > self._buffers[0].numel():
            self._buffers = [torch.empty(n, dtype=torch.int64, pin_memory=self._cuda) for _ in self._buffers]
        host = self._buffers[self._next][:n]
        self._next = (self._next + 1) % len(self._buffers)
        if not self._cuda:
            host.copy_(token_ids)
            return host, None
        host.copy_(token_ids.to(torch.int64), non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return host, done


class InFlightStep:
    def __init__(self, batch, token_ids: Optional[torch.Tensor], readback: TokenReadback):
        self.batch = batch
        self.token_ids = token_ids  # device tensor [num_sampled]; the next step's placeholders read it
        self._host, self._done = readback.start(token_ids) if token_ids is not None else (None, None)
        self._rows: Optional[dict[int, int]] = None

    def host_tokens(self) -> np.ndarray:
        if self._host is None:
            return np.zeros(0, dtype=np.int32)
        if self._done is not None:
            self._done.synchronize()
        return self._host.numpy()

    def row_of(self, request_ids: np.ndarray) -> np.ndarray:
        """Row of each request's sampled token in `token_ids`."""
        if self._rows is None:
            self._rows = {int(r): i for i, r in enumerate(self.batch.sampled_request_ids.tolist())}
        return np.fromiter((self._rows[int(r)] for r in request_ids), dtype=np.int64, count=len(request_ids))


@dataclass
class PendingInputs:
    """Input positions of a batch whose token is still on the device, and where it is there."""

    positions: np.ndarray  # int64 [p]: indices into the batch's input tokens
    rows: np.ndarray  # int64 [p]: rows of `token_ids`
    token_ids: torch.Tensor  # the previous step's sampled tokens (device)


def pending_inputs(batch, previous: Optional[InFlightStep]) -> Optional[PendingInputs]:
    positions = np.flatnonzero(batch.input_token_ids == PENDING_TOKEN)
    if positions.size == 0:
        return None
    if previous is None or previous.token_ids is None:
        raise RuntimeError("engine: the batch has placeholder inputs but no step is in flight")
    seq_index = np.searchsorted(batch.query_start_loc, positions, side="right") - 1
    return PendingInputs(positions.astype(np.int64), previous.row_of(batch.request_ids[seq_index]), previous.token_ids)

"""Which rows of a checkpoint tensor one tensor-parallel rank holds.

A sharded dimension is cut into `world_size` equal, contiguous pieces, rank r taking piece r:
- attention heads: q heads evenly; KV heads evenly when there are at least as many as ranks,
  else each KV head is replicated on `world_size / num_kv_heads` consecutive ranks (rank r holds
  KV head r * num_kv_heads // world_size, which is the head its q heads attend with);
- the MLP's intermediate dimension evenly;
- the vocabulary in pieces of ceil(vocab / world_size) rows: the last piece may hold fewer real
  rows and is padded with zero rows (so every rank's logits have the same width).
Sizes that do not split this way raise a ValueError naming `tensor_parallel_size`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch only where a tensor is cut: the server process maps heads (pd/head_map.py) without it
    import torch


@dataclass(frozen=True)
class TensorShard:
    """Rows [start, stop) along `dim` of a checkpoint tensor whose size there is `full`, held in a
    parameter of `size` rows along `dim` (size > stop - start only for a padded vocabulary shard:
    the extra rows are zeros)."""

    dim: int
    start: int
    stop: int
    full: int
    size: int

    @property
    def length(self) -> int:
        return self.stop - self.start

    def index(self, ndim: int) -> tuple[slice, ...]:
        """The slice of the checkpoint tensor, e.g. for safetensors' `get_slice(name)[index]`."""
        before, after = (slice(None),) * self.dim, (slice(None),) * (ndim - self.dim - 1)
        return before + (slice(self.start, self.stop),) + after

    def take(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        """The rank's part of `tensor`, which is either the whole checkpoint tensor or already just
        this shard (a reader that read only its rows); zero-padded to `size`."""
        if tensor.dim() <= self.dim:
            raise ValueError(f"{name}: expected at least {self.dim + 1} dimensions, got shape {tuple(tensor.shape)}")
        rows = tensor.shape[self.dim]
        if rows == self.full:
            tensor = tensor.narrow(self.dim, self.start, self.length)
        elif rows != self.length:
            raise ValueError(f"{name}: has {rows} rows along dim {self.dim}; expected the whole tensor "
                             f"({self.full}) or this rank's shard ({self.length})")
        if self.size > self.length:
            import torch

            pad = list(tensor.shape)
            pad[self.dim] = self.size - self.length
            tensor = torch.cat([tensor, tensor.new_zeros(pad)], dim=self.dim)
        return tensor

    def along(self, dim: int) -> "TensorShard":
        return TensorShard(dim, self.start, self.stop, self.full, self.size)

    def scaled(self, factor: int) -> "TensorShard":
        """The same shard in units `factor` times finer (heads -> rows of head_dim each)."""
        return TensorShard(self.dim, self.start * factor, self.stop * factor, self.full * factor, self.size * factor)


def split_evenly(full: int, rank: int, world_size: int, what: str) -> TensorShard:
    _check_rank(rank, world_size)
    if full % world_size:
        raise ValueError(f"tensor_parallel_size: {world_size} does not divide {what}={full}")
    size = full // world_size
    return TensorShard(0, rank * size, (rank + 1) * size, full, size)


def split_heads(num_heads: int, rank: int, world_size: int, what: str) -> TensorShard:
    """Heads evenly; fewer heads than ranks: each head on world_size / num_heads ranks."""
    _check_rank(rank, world_size)
    if num_heads >= world_size:
        return split_evenly(num_heads, rank, world_size, what)
    if world_size % num_heads:
        raise ValueError(f"tensor_parallel_size: {world_size} is neither a divisor nor a multiple of {what}={num_heads}")
    head = rank * num_heads // world_size
    return TensorShard(0, head, head + 1, num_heads, 1)


def split_vocab(vocab_size: int, rank: int, world_size: int) -> TensorShard:
    _check_rank(rank, world_size)
    size = -(-vocab_size // world_size)
    start = min(rank * size, vocab_size)
    return TensorShard(0, start, min(start + size, vocab_size), vocab_size, size)


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"tensor_parallel_size: rank {rank} is outside [0, {world_size})")

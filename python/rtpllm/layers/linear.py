"""The layers that hold the model's weight matrices: dense projections and the token embedding.

Weights are plain parameters in the checkpoint's layout ([out_features, in_features]), created
uninitialized: the loader always overwrites them. Projections that read the same input (q|k|v,
gate|up) are stacked into one `FusedLinear` so a single GEMM computes them; a quantized or
custom-kernel GEMM plugs in by replacing `forward`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rtpllm.layers.gemm_dispatch import linear


def _empty_parameter(*shape: int, dtype: Optional[torch.dtype]) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


def copy_checked(param: torch.Tensor, loaded: torch.Tensor, name: str) -> None:
    """Copies a checkpoint tensor into `param` (any dtype/device), insisting on the exact shape."""
    if tuple(loaded.shape) != tuple(param.shape):
        raise ValueError(f"{name}: checkpoint shape {tuple(loaded.shape)} does not match the model's "
                         f"{tuple(param.shape)}")
    param.copy_(loaded)


class Linear(nn.Module):
    """y = x @ weight.T (+ bias); weight [out_features, in_features]."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = _empty_parameter(out_features, in_features, dtype=dtype)
        self.bias = _empty_parameter(out_features, dtype=dtype) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class FusedLinear(Linear):
    """Several projections of one input stacked along the output dim, in the order given.

    `shards` names each projection and its output size, e.g. [("q_proj", 2048), ("k_proj", 512), ("v_proj", 512)];
    the loader copies the checkpoint's separate tensors into their rows (`shard_view`).
    """

    def __init__(self, in_features: int, shards: Sequence[tuple[str, int]], bias: bool,
                 dtype: Optional[torch.dtype] = None):
        super().__init__(in_features, sum(size for _, size in shards), bias, dtype)
        self.shard_sizes = [size for _, size in shards]
        self.shard_rows: dict[str, slice] = {}
        start = 0
        for shard, size in shards:
            self.shard_rows[shard] = slice(start, start + size)
            start += size

    def shard_view(self, shard: str, kind: str, name: str) -> torch.Tensor:
        """The rows of the weight (or bias, per `kind`) that projection `shard` (checkpoint tensor
        `name`) fills: a contiguous view of the fused parameter."""
        param = self.weight if kind == "weight" else self.bias
        if param is None:
            raise ValueError(f"{name}: the checkpoint has a bias but the model's config says this "
                             "projection has none")
        return param[self.shard_rows[shard]]

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Splits the fused output [..., sum(sizes)] back into one view per projection."""
        return y.split(self.shard_sizes, dim=-1)


class Embedding(nn.Module):
    """Token id -> row of weight [vocab_size, hidden_size]."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.weight = _empty_parameter(vocab_size, hidden_size, dtype=dtype)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(token_ids, self.weight)

"""The layers that communicate under tensor parallelism (see models/llama_shards.py for the split).

Column-parallel projections need no layer of their own: a `FusedLinear` built with the rank's
rows (its q/k/v heads, its part of gate/up) is one. What communicates:
- `RowParallelLinear`: each rank holds a slice of the input dimension; the partial products are
  summed with an all-reduce, then the bias (held whole) is added once.
- `VocabParallelEmbedding`: each rank holds a contiguous slice of the vocabulary (the last one
  zero-padded); ids outside it give zero rows, and an all-reduce fills in every row.
- `gather_vocab_logits`: each rank's logits for its vocabulary slice, gathered and trimmed to the
  real vocabulary, so rank 0 samples from exactly what one GPU would have computed.
None of these exist in a model built without a group: at tensor_parallel_size 1 the plain
layers run and nothing communicates.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from rtpllm.distributed.partition import TensorShard
from rtpllm.distributed.tp_group import TPGroup
from rtpllm.layers.gemm_dispatch import linear
from rtpllm.layers.linear import Embedding, Linear


class RowParallelLinear(Linear):
    """y = all_reduce(x_local @ weight_local.T) + bias; weight [out_features, in_features / world]."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: Optional[torch.dtype],
                 tp: TPGroup):
        super().__init__(in_features, out_features, bias, dtype)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(linear(x, self.weight))
        return y if self.bias is None else y.add_(self.bias)


class VocabParallelEmbedding(Embedding):
    """Token id -> row, with this rank holding rows `shard` of the vocabulary."""

    def __init__(self, shard: TensorShard, hidden_size: int, dtype: Optional[torch.dtype], tp: TPGroup):
        super().__init__(shard.size, hidden_size, dtype)
        self.start = shard.start
        self.tp = tp

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        local = token_ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        rows = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(rows.masked_fill_(outside.unsqueeze(-1), 0))


def gather_vocab_logits(local_logits: torch.Tensor, tp: TPGroup, vocab_size: int) -> torch.Tensor:
    """[n, vocab_shard] on every rank -> [n, vocab_size] float32 on every rank."""
    n, width = local_logits.shape
    gathered = tp.all_gather(local_logits)  # [world * n, width], rank-major
    logits = gathered.view(tp.world_size, n, width).transpose(0, 1).reshape(n, tp.world_size * width)
    return logits[:, :vocab_size].float().contiguous()

"""The typed batch description every attention backend receives (no global context)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import numpy as np
import torch


@dataclass
class AttentionMetadata:
    """Where one step's tokens sit in the paged KV cache. All tensors live on the model's device.

    Tokens of the step are laid out sequence after sequence; sequence i owns tokens
    `query_start_loc[i] : query_start_loc[i + 1]`, which are its context positions
    `num_computed[i] : seq_lens[i]`.
    """

    slot_mapping: torch.Tensor  # int64 [num_tokens]: block_id * block_size + offset of each new token
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1]: cumulative new-token counts
    seq_lens: torch.Tensor  # int32 [num_seqs]: context length after this step
    num_computed: torch.Tensor  # int32 [num_seqs]: context already cached before this step
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks_per_seq], padded with 0
    max_query_len: int  # host copy: the longest run of new tokens of one sequence
    max_seq_len: int  # host copy: the longest context
    # Host copies: how many sequences at the front of the step have exactly one new token (the
    # scheduler puts decodes first), and their longest context. In a mixed step a backend may run
    # those through its decode kernel and only the rest through prefill (see `leading_decodes`).
    num_decodes: int = 0
    decode_max_seq_len: int = 0
    # Backend-specific plan (e.g. split-KV work partition for CUDA decode), built on the host
    # before the step so that a CUDA graph can replay the launch.
    plan: Optional[object] = None

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


class AttentionBackend(Protocol):
    """Applies rotary embeddings to q and k, writes the step's K/V into the paged cache, then
    attends causally over each sequence's context. Owning RoPE lets a backend fuse it with the
    cache write, or (CUDA decode steps) into the attention kernel itself.

    q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim] (pre-RoPE);
    positions: int64 [num_tokens]; rotary: layers.rotary.RotaryEmbedding (cos/sin cache);
    kv_cache: [2, num_blocks, block_size, num_kv_heads, head_dim] (K then V).
    Returns [num_tokens, num_heads, head_dim] in q's dtype.
    """

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                rotary: object, kv_cache: torch.Tensor, meta: AttentionMetadata,
                scale: float) -> torch.Tensor: ...


def leading_decodes(query_start_loc: np.ndarray, seq_lens: np.ndarray) -> tuple[int, int]:
    """(count, longest context) of the sequences at the front of a step with one new token each,
    from the host copies of `query_start_loc` and `seq_lens`."""
    others = np.flatnonzero(np.diff(query_start_loc) != 1)
    count = int(others[0]) if others.size else len(seq_lens)
    return count, int(seq_lens[:count].max()) if count else 0

"""The CUDA attention backend: the `AttentionBackend` protocol on our own kernels.

Per layer and step:
  - decode-only steps (one new token per sequence) run one kernel, the split-KV paged decode
    kernel, which also rotates q and the new k and writes the new K/V row into the cache (where
    the rotary embedding spans the whole head; otherwise a RoPE + cache-write kernel runs first);
  - any other step (prefill, chunked prefill, mixed) first rotates q in place and writes RoPE(k)
    and v into the cache (one fused kernel), then runs the prefill/extend kernel, which reads
    every sequence's context, new tokens included, from the cache. In a mixed step the decodes
     at the front of the batch (`meta.num_decodes`) go to the decode kernel instead: the prefill
     grid is sized by the longest chunk, so each decode there would cost a column of mostly empty
     CTAs per KV head, and its one query row would fill a 128-row tile.

CUDA graphs: decode launches depend only on the host-side `DecodePlan` and on device memory
(seq_lens, block_tables), so the model runner plans before capturing a batch-size bucket,
    meta.plan = backend.plan(meta, max_seq_len=max_model_len)
and every replay reuses that plan with fresh lengths. In eager mode `forward` plans on demand.
"""

from __future__ import annotations

from typing import Optional

import torch

from rtpllm.layers import cuda_ops
from rtpllm.layers.attention_metadata import AttentionMetadata
from rtpllm.layers.prefill_attention import prefill_attention
from rtpllm.layers.rotary import RotaryEmbedding


class CudaAttentionBackend:
    """Attention on CUDA kernels for one model shape (shared by all its layers).

    head_dim 64 or 128, block_size 16/32/64, float16 or bfloat16 activations and cache.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str,
                 decode_workspace_bytes: int = cuda_ops.DEFAULT_DECODE_WORKSPACE_BYTES):
        if num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads: must divide num_heads={num_heads}, got {num_kv_heads}")
        if head_dim not in (64, 128):
            raise ValueError(f"head_dim: the CUDA kernels support 64 and 128, got {head_dim}")
        if block_size not in (16, 32, 64):
            raise ValueError(f"block_size: the CUDA kernels support 16, 32 and 64, got {block_size}")
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"dtype: the CUDA kernels run float16 or bfloat16, got {dtype}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.block_size = block_size
        self.dtype = dtype
        self.device = torch.device(device)
        # One workspace for every layer and step: kernels on one stream run one after another,
        # and a captured graph bakes in its address.
        self.decode_workspace = cuda_ops.allocate_decode_workspace(self.device, decode_workspace_bytes)

    def plan(self, meta: AttentionMetadata, max_seq_len: Optional[int] = None) -> Optional[cuda_ops.DecodePlan]:
        """Host-side planning for this step; stores the plan in `meta.plan` and returns it.

        `max_seq_len` bounds the lengths the launch must serve (default: this step's
        `meta.max_seq_len`); pass `max_model_len` before capturing a CUDA graph so that every
        replay fits. Non-decode steps need no plan (returns None).
        """
        if not meta.is_decode_only:
            meta.plan = None
            return None
        bound = meta.max_seq_len if max_seq_len is None else max_seq_len
        if bound < meta.max_seq_len:
            raise ValueError(f"max_seq_len: {bound} is below this step's longest context {meta.max_seq_len}")
        meta.plan = cuda_ops.plan_paged_decode(meta.num_seqs, self.num_heads, self.num_kv_heads, self.head_dim,
                                               self.block_size, self.dtype, bound, self.decode_workspace)
        return meta.plan

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                rotary: RotaryEmbedding, kv_cache: torch.Tensor, meta: AttentionMetadata,
                scale: float) -> torch.Tensor:
        """See `AttentionBackend`. NOTE: q may be rotated in place (it is the projection's scratch)."""
        if q.shape[1:] != (self.num_heads, self.head_dim):
            raise ValueError(f"q: expected [tokens, {self.num_heads}, {self.head_dim}], got {tuple(q.shape)}")
        if meta.is_decode_only:
            plan = meta.plan
            if not isinstance(plan, cuda_ops.DecodePlan) or plan.num_seqs != meta.num_seqs:
                plan = self.plan(meta)
            elif plan.max_seq_len < meta.max_seq_len:
                raise ValueError(f"meta.plan: planned for contexts up to {plan.max_seq_len}, "
                                 f"this step has {meta.max_seq_len}")
            rope = None
            if rotary.cos_sin_cache.shape[1] == self.head_dim:
                rope = cuda_ops.DecodeRope(k, v, positions, rotary.cos_sin_cache, meta.slot_mapping)
            else:
                cuda_ops.rope_and_cache_write(q, k, v, positions, rotary.cos_sin_cache, kv_cache, meta.slot_mapping)
            return cuda_ops.paged_decode_attention(q, kv_cache, meta.block_tables, meta.seq_lens, scale, plan,
                                                   rope=rope)
        cuda_ops.rope_and_cache_write(q, k, v, positions, rotary.cos_sin_cache, kv_cache, meta.slot_mapping)
        d = meta.num_decodes
        if d == 0:
            return prefill_attention(q, kv_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                                     meta.max_query_len, scale)
        # Mixed step: the first d sequences (one token each, so tokens 0..d-1) through the decode
        # kernel, the rest through prefill. The prefill kernel addresses q and out by the absolute
        # offsets in query_start_loc, so it takes the whole tensors and the tail of the index arrays.
        plan = meta.plan
        if (not isinstance(plan, cuda_ops.DecodePlan) or plan.num_seqs != d
                or plan.max_seq_len < meta.decode_max_seq_len):
            plan = meta.plan = cuda_ops.plan_paged_decode(d, self.num_heads, self.num_kv_heads, self.head_dim,
                                                          self.block_size, self.dtype, meta.decode_max_seq_len,
                                                          self.decode_workspace)  # once per step, not per layer
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        cuda_ops.paged_decode_attention(q[:d], kv_cache, meta.block_tables[:d], meta.seq_lens[:d], scale, plan,
                                        out=out[:d])
        return prefill_attention(q, kv_cache, meta.query_start_loc[d:], meta.seq_lens[d:], meta.block_tables[d:],
                                 meta.max_query_len, scale, out=out)

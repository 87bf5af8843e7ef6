"""Checked entry point of the CUDA prefill / extend attention kernel (cuda/attention/prefill_attention.h).

Every sequence's new tokens attend causally to its whole context in the paged KV cache: new token
t of sequence i sits at position `seq_lens[i] - q_len_i + t` and sees keys 0 .. that position. The
new tokens' K/V must already be written into the cache.
"""

from __future__ import annotations

from typing import Optional

import torch

from rtpllm.layers.cuda_ops import kernel_ops, scalar_type

_IMPLS = ("auto", "sm80", "sm90")
_HEAD_DIMS = (64, 128)


def _require(cond: bool, field_name: str, message: str) -> None:
    if not cond:
        raise ValueError(f"prefill_attention: {field_name}: {message}")


def _check_index_tensor(t: torch.Tensor, name: str, ndim: int, device: torch.device) -> None:
    _require(isinstance(t, torch.Tensor), name, "must be a torch.Tensor")
    _require(t.dtype == torch.int32, name, f"must be int32, got {t.dtype}")
    _require(t.dim() == ndim, name, f"must have {ndim} dimension(s), got shape {tuple(t.shape)}")
    _require(t.device == device, name, f"must be on {device}, got {t.device}")
    _require(t.is_contiguous(), name, "must be contiguous")


def prefill_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_query_len: int,
    scale: float,
    *,
    out: Optional[torch.Tensor] = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its paged context; returns `out`.

    q:               [num_tokens, num_heads, head_dim], float16 or bfloat16, on a CUDA device. Heads and
                     head_dim must be contiguous; the token stride may be larger (a view into a fused
                     qkv projection) but must be a multiple of 8 elements.
    kv_cache:        [2, num_blocks, block_size, num_kv_heads, head_dim], q's dtype, contiguous (K then V).
                     block_size is a power of two; head_dim is 64 or 128; num_kv_heads divides num_heads.
    query_start_loc: int32 [num_seqs + 1], cumulative new-token counts; query_start_loc[-1] == num_tokens.
    seq_lens:        int32 [num_seqs], context length of each sequence including its new tokens.
    block_tables:    int32 [num_seqs, max_blocks_per_seq], cache block ids, enough columns for seq_lens.
    max_query_len:   host int, the largest new-token count of any sequence (sizes the launch grid).
    scale:           softmax scale, usually head_dim ** -0.5.
    out:             optional [num_tokens, num_heads, head_dim] output in q's dtype (same layout rules as q).
    impl:            "auto" (wgmma kernel on compute capability 9.0, mma.sync elsewhere), "sm80" or "sm90".

    The index tensors are read on the device; their consistency (query_start_loc non-decreasing,
    seq_lens[i] >= new-token count, block ids < num_blocks) is the caller's contract, as it is
    for the scheduler that produces them.
    """
    _require(isinstance(q, torch.Tensor), "q", "must be a torch.Tensor")
    _require(q.is_cuda, "q", f"must be on a CUDA device, got {q.device}")
    _require(q.dtype in (torch.float16, torch.bfloat16), "q", f"dtype must be float16 or bfloat16, got {q.dtype}")
    _require(q.dim() == 3, "q", f"must be [num_tokens, num_heads, head_dim], got shape {tuple(q.shape)}")
    num_tokens, num_heads, head_dim = q.shape
    _require(head_dim in _HEAD_DIMS, "q", f"head_dim must be one of {_HEAD_DIMS}, got {head_dim}")
    _require(q.stride(2) == 1 and q.stride(1) == head_dim, "q", "heads and head_dim must be contiguous")
    _require(q.stride(0) % 8 == 0, "q", f"token stride must be a multiple of 8 elements, got {q.stride(0)}")
    _require(q.stride(0) >= num_heads * head_dim or num_tokens <= 1, "q", "token rows must not overlap")
    device = q.device

    _require(isinstance(kv_cache, torch.Tensor), "kv_cache", "must be a torch.Tensor")
    _require(kv_cache.device == device, "kv_cache", f"must be on {device}, got {kv_cache.device}")
    _require(kv_cache.dtype == q.dtype, "kv_cache", f"dtype must match q ({q.dtype}), got {kv_cache.dtype}")
    _require(kv_cache.dim() == 5 and kv_cache.shape[0] == 2, "kv_cache",
             f"must be [2, num_blocks, block_size, num_kv_heads, head_dim], got shape {tuple(kv_cache.shape)}")
    _require(kv_cache.is_contiguous(), "kv_cache", "must be contiguous")
    _, num_blocks, block_size, num_kv_heads, cache_head_dim = kv_cache.shape
    _require(cache_head_dim == head_dim, "kv_cache", f"head_dim {cache_head_dim} differs from q's {head_dim}")
    _require(block_size > 0 and block_size & (block_size - 1) == 0, "kv_cache",
             f"block_size must be a power of two, got {block_size}")
    _require(num_blocks > 0, "kv_cache", "must hold at least one block")
    _require(num_kv_heads > 0 and num_heads % num_kv_heads == 0, "q",
             f"num_heads ({num_heads}) must be a multiple of kv_cache's num_kv_heads ({num_kv_heads})")

    _check_index_tensor(query_start_loc, "query_start_loc", 1, device)
    _check_index_tensor(seq_lens, "seq_lens", 1, device)
    _check_index_tensor(block_tables, "block_tables", 2, device)
    num_seqs = seq_lens.shape[0]
    _require(query_start_loc.shape[0] == num_seqs + 1, "query_start_loc",
             f"must have num_seqs + 1 = {num_seqs + 1} entries, got {query_start_loc.shape[0]}")
    _require(block_tables.shape[0] == num_seqs, "block_tables",
             f"must have one row per sequence ({num_seqs}), got {block_tables.shape[0]}")
    _require(block_tables.shape[1] > 0, "block_tables", "must have at least one column")

    _require(isinstance(max_query_len, int) and max_query_len >= 0, "max_query_len",
             f"must be a non-negative int, got {max_query_len!r}")
    _require(max_query_len <= num_tokens, "max_query_len",
             f"cannot exceed num_tokens ({num_tokens}), got {max_query_len}")
    _require(isinstance(scale, (int, float)) and scale > 0 and scale != float("inf"), "scale",
             f"must be a positive finite number, got {scale!r}")
    _require(impl in _IMPLS, "impl", f"must be one of {_IMPLS}, got {impl!r}")

    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    else:
        _require(isinstance(out, torch.Tensor), "out", "must be a torch.Tensor")
        _require(out.shape == q.shape, "out", f"shape must be {tuple(q.shape)}, got {tuple(out.shape)}")
        _require(out.dtype == q.dtype, "out", f"dtype must match q ({q.dtype}), got {out.dtype}")
        _require(out.device == device, "out", f"must be on {device}, got {out.device}")
        _require(out.stride(2) == 1 and out.stride(1) == head_dim, "out", "heads and head_dim must be contiguous")
        _require(out.stride(0) % 8 == 0 and (out.stride(0) >= num_heads * head_dim or num_tokens <= 1), "out",
                 f"token stride must be a multiple of 8 elements covering a token, got {out.stride(0)}")
    if num_tokens == 0 or num_seqs == 0 or max_query_len == 0:
        return out

    ops = kernel_ops()
    row = num_heads * head_dim
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device).cuda_stream
        ops.prefill_attention(
            out=out.data_ptr(), q=q.data_ptr(), kv_cache=kv_cache.data_ptr(),
            query_start_loc=query_start_loc.data_ptr(), seq_lens=seq_lens.data_ptr(),
            block_tables=block_tables.data_ptr(),
            q_token_stride=q.stride(0) if num_tokens > 1 else row,
            out_token_stride=out.stride(0) if num_tokens > 1 else row,
            num_seqs=num_seqs, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
            block_size=block_size, num_blocks=num_blocks, max_blocks_per_seq=block_tables.shape[1],
            max_query_len=max_query_len, scale=float(scale),
            dtype=scalar_type(q.dtype),
            impl={"auto": ops.PrefillAttentionImpl.AUTO, "sm80": ops.PrefillAttentionImpl.SM80_MMA,
                  "sm90": ops.PrefillAttentionImpl.SM90_WGMMA}[impl],
            stream=stream,
        )
    return out

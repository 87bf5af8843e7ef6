"""Fused elementwise kernels (cuda/ops) against fp32 torch references.

The references round to the activation dtype at the same points as the model's torch layers
(HF semantics), so the tolerances are one or two units in the last place of bf16 / fp16.
Outputs are poisoned with NaN first; views with padded row strides stand in for the strided
tensors the model passes (q/k/v inside a fused qkv projection).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rtpllm.layers import cuda_ops
from rtpllm.layers.rotary import RopeConfig, RotaryEmbedding

DEVICE = "cuda"
DTYPES = [torch.bfloat16, torch.float16]
DTYPE_IDS = ["bf16", "fp16"]
# Relative tolerance: ~2 ulp of the output dtype (the kernels and torch may round an intermediate
# differently when it lands near a rounding boundary).
RTOL = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
ATOL = {torch.bfloat16: 1e-3, torch.float16: 1e-4}


def strided(rows: int, cols: int, dtype: torch.dtype, pad: int = 24) -> torch.Tensor:
    """A [rows, cols] view whose rows are `cols + pad` elements apart, filled with randn."""
    return torch.randn(rows, cols + pad, dtype=dtype, device=DEVICE)[:, :cols]


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert not out.isnan().any(), f"{int(out.isnan().sum())} outputs are NaN (unwritten?)"
    torch.testing.assert_close(out.float(), ref.float(), rtol=RTOL[dtype], atol=ATOL[dtype])


# ----------------------------------------------------------------------------- RMSNorm


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return weight.float() * normed.float()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("hidden", [64, 576, 4096, 8200, 16384])
@pytest.mark.parametrize("rows", [1, 7, 33, 1000])
def test_rms_norm(rows, hidden, dtype):
    x = strided(rows, hidden, dtype) * 3
    weight = torch.randn(hidden, dtype=dtype, device=DEVICE)
    out = torch.full((rows, hidden), float("nan"), dtype=dtype, device=DEVICE)
    cuda_ops.rms_norm(x, weight, 1e-5, out=out)
    assert_close(out, reference_rms_norm(x, weight, 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rms_norm_per_head_3d(dtype):
    """Qwen3's q/k norm: a contiguous [tokens, heads, head_dim] input normalised per head."""
    x = torch.randn(33, 9, 128, dtype=dtype, device=DEVICE)
    weight = torch.randn(128, dtype=dtype, device=DEVICE)
    out = cuda_ops.rms_norm(x, weight, 1e-6)
    assert out.shape == x.shape
    assert_close(out, reference_rms_norm(x, weight, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("hidden", [576, 4096, 8200])
@pytest.mark.parametrize("rows", [1, 7, 33, 1000])
def test_fused_add_rms_norm(rows, hidden, dtype):
    x = strided(rows, hidden, dtype)
    residual = strided(rows, hidden, dtype, pad=40) * 4
    weight = torch.randn(hidden, dtype=dtype, device=DEVICE)
    expected_sum = (x.float() + residual.float()).to(dtype)  # HF: the residual stream is stored in dtype
    expected_out = reference_rms_norm(expected_sum, weight, 1e-5)
    cuda_ops.fused_add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(residual, expected_sum)
    assert_close(x, expected_out, dtype)


# ----------------------------------------------------------------------------- RoPE + cache write


def reference_rope(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> torch.Tensor:
    """neox "rotate half" on the first rotary_dim dims in fp32; the rest passes through."""
    rotary_dim = cos_sin_cache.shape[1]
    cos, sin = cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)
    rot, rest = x.float()[..., :rotary_dim], x.float()[..., rotary_dim:]
    x1, x2 = rot.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def llama3_cos_sin_cache(head_dim: int, max_positions: int) -> torch.Tensor:
    rope = RopeConfig(theta=500000.0, scaling="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192)
    return RotaryEmbedding(head_dim, rope, max_positions).cos_sin_cache.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(9, 3), (32, 8)])
@pytest.mark.parametrize("num_tokens", [1, 7, 33, 1000])
def test_rope_and_cache_write(num_tokens, num_heads, num_kv_heads, head_dim, dtype):
    block_size, num_blocks, max_positions = 16, 160, 20000
    cos_sin_cache = llama3_cos_sin_cache(head_dim, max_positions)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = torch.randn(num_tokens, q_size + 2 * kv_size, dtype=dtype, device=DEVICE)  # the model's fused output
    q = qkv[:, :q_size].view(num_tokens, num_heads, head_dim)
    k = qkv[:, q_size:q_size + kv_size].view(num_tokens, num_kv_heads, head_dim)
    v = qkv[:, q_size + kv_size:].view(num_tokens, num_kv_heads, head_dim)
    positions = torch.randint(0, max_positions, (num_tokens,), device=DEVICE)
    slot_mapping = torch.randperm(num_blocks * block_size, device=DEVICE)[:num_tokens]
    slot_mapping[::5] = -1  # padding tokens: rotated q, no cache write
    kv_cache = torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype,
                          device=DEVICE)
    expected_q = reference_rope(q, positions, cos_sin_cache)
    expected_k = reference_rope(k, positions, cos_sin_cache)
    k_before, v_before = k.clone(), v.clone()

    cuda_ops.rope_and_cache_write(q, k, v, positions, cos_sin_cache, kv_cache, slot_mapping)

    assert_close(q, expected_q, dtype)
    assert torch.equal(k, k_before), "k itself must not change: only its rotated copy goes to the cache"
    written = slot_mapping >= 0
    slots = slot_mapping[written]
    k_slots = kv_cache[0].flatten(0, 1)
    v_slots = kv_cache[1].flatten(0, 1)
    assert_close(k_slots[slots], expected_k[written], dtype)
    assert torch.equal(v_slots[slots], v_before[written])
    untouched = torch.ones(k_slots.shape[0], dtype=torch.bool, device=DEVICE)
    untouched[slots] = False
    assert k_slots[untouched].isnan().all() and v_slots[untouched].isnan().all(), "wrote outside slot_mapping"


def test_rope_partial_rotary_dim_passes_the_tail_through():
    dtype, head_dim, rotary_dim = torch.bfloat16, 128, 64
    cos_sin_cache = llama3_cos_sin_cache(rotary_dim, 4096)
    q = torch.randn(33, 4, head_dim, dtype=dtype, device=DEVICE)
    k = torch.randn(33, 2, head_dim, dtype=dtype, device=DEVICE)
    v = torch.randn(33, 2, head_dim, dtype=dtype, device=DEVICE)
    positions = torch.randint(0, 4096, (33,), device=DEVICE)
    slot_mapping = torch.arange(33, device=DEVICE)
    kv_cache = torch.full((2, 4, 16, 2, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    expected_q, expected_k = reference_rope(q, positions, cos_sin_cache), reference_rope(k, positions, cos_sin_cache)
    cuda_ops.rope_and_cache_write(q, k, v, positions, cos_sin_cache, kv_cache, slot_mapping)
    assert_close(q, expected_q, dtype)
    assert_close(kv_cache[0].flatten(0, 1)[:33], expected_k, dtype)


def test_rope_position_outside_the_table_poisons_instead_of_reading_past_it():
    cos_sin_cache = llama3_cos_sin_cache(64, 100)
    q = torch.randn(2, 2, 64, dtype=torch.bfloat16, device=DEVICE)
    k = torch.randn(2, 1, 64, dtype=torch.bfloat16, device=DEVICE)
    kv_cache = torch.zeros(2, 1, 16, 1, 64, dtype=torch.bfloat16, device=DEVICE)
    positions = torch.tensor([5, 100], device=DEVICE)
    cuda_ops.rope_and_cache_write(q, k, k.clone(), positions, cos_sin_cache, kv_cache,
                                  torch.tensor([0, 1], device=DEVICE))
    assert not q[0].isnan().any() and q[1].isnan().all()


# ----------------------------------------------------------------------------- SiLU and mul, embedding


def reference_silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.float().chunk(2, dim=-1)
    return F.silu(gate).to(x.dtype).float() * up


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("inter_size", [64, 1536, 14336])
@pytest.mark.parametrize("num_tokens", [1, 7, 33, 1000])
def test_silu_and_mul(num_tokens, inter_size, dtype):
    x = strided(num_tokens, 2 * inter_size, dtype) * 3
    out = torch.full((num_tokens, inter_size), float("nan"), dtype=dtype, device=DEVICE)
    cuda_ops.silu_and_mul(x, out=out)
    assert_close(out, reference_silu_and_mul(x), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
@pytest.mark.parametrize("num_tokens", [1, 7, 33, 1000])
def test_embedding(num_tokens, ids_dtype, dtype):
    vocab, hidden = 49152, 576
    table = torch.randn(vocab, hidden, dtype=dtype, device=DEVICE)
    ids = torch.randint(0, vocab, (num_tokens,), dtype=ids_dtype, device=DEVICE)
    out = torch.full((num_tokens, hidden), float("nan"), dtype=dtype, device=DEVICE)
    cuda_ops.embedding(ids, table, out=out)
    assert torch.equal(out, table[ids.long()])


def test_embedding_out_of_range_ids_give_zero_rows():
    table = torch.randn(100, 64, dtype=torch.bfloat16, device=DEVICE)
    ids = torch.tensor([3, -1, 100, 99], device=DEVICE)
    out = cuda_ops.embedding(ids, table)
    assert torch.equal(out[0], table[3]) and torch.equal(out[3], table[99])
    assert torch.equal(out[1:3], torch.zeros_like(out[1:3]))


# ----------------------------------------------------------------------------- argument checks


def test_wrappers_name_the_bad_argument():
    x = torch.randn(4, 64, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match="weight"):
        cuda_ops.rms_norm(x, torch.randn(32, dtype=torch.bfloat16, device=DEVICE), 1e-5)
    with pytest.raises(ValueError, match="x"):
        cuda_ops.rms_norm(x.float(), torch.randn(64, device=DEVICE), 1e-5)
    with pytest.raises(ValueError, match="x"):
        cuda_ops.rms_norm(x.cpu(), torch.randn(64, dtype=torch.bfloat16), 1e-5)
    with pytest.raises(ValueError, match="residual"):
        cuda_ops.fused_add_rms_norm(x, x[:2].clone(), torch.randn(64, dtype=torch.bfloat16, device=DEVICE), 1e-5)
    with pytest.raises(ValueError, match="x"):
        cuda_ops.silu_and_mul(torch.randn(4, 20, dtype=torch.bfloat16, device=DEVICE))
    with pytest.raises(ValueError, match="ids"):
        cuda_ops.embedding(torch.zeros(3, device=DEVICE), torch.randn(10, 64, dtype=torch.bfloat16, device=DEVICE))
    q = torch.randn(2, 4, 64, dtype=torch.bfloat16, device=DEVICE)
    k = torch.randn(2, 2, 64, dtype=torch.bfloat16, device=DEVICE)
    cache = torch.zeros(2, 2, 16, 2, 64, dtype=torch.bfloat16, device=DEVICE)
    table = llama3_cos_sin_cache(64, 10)
    with pytest.raises(ValueError, match="slot_mapping"):
        cuda_ops.rope_and_cache_write(q, k, k, torch.zeros(2, dtype=torch.int64, device=DEVICE), table, cache,
                                      torch.zeros(2, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="cos_sin_cache"):
        cuda_ops.rope_and_cache_write(q, k, k, torch.zeros(2, dtype=torch.int64, device=DEVICE), table.half(), cache,
                                      torch.zeros(2, dtype=torch.int64, device=DEVICE))

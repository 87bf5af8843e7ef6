"""TorchAttentionBackend against a direct float64 reference written token by token, on a mixed
step: a fresh prefill, a later prefill chunk, decodes, a one-token context; odd head counts,
scattered blocks, a NaN-filled cache and non-contiguous q/k/v (as the fused projection yields)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rtpllm.layers.attention_metadata import AttentionMetadata, leading_decodes
from rtpllm.layers.rotary import RopeConfig, RotaryEmbedding
from rtpllm.layers.torch_attention import TorchAttentionBackend

# (num_computed before the step, new tokens) per sequence.
SEQUENCES = [(0, 19), (33, 7), (16, 1), (0, 1), (99, 1)]
# The scheduler's order: decodes first (attended apart from the prompt chunks), a one-token chunk later.
DECODES_FIRST = [(40, 1), (0, 1), (99, 1), (0, 19), (33, 7), (16, 1)]


def _build_step(block_size: int, num_blocks: int, generator: torch.Generator, sequences=SEQUENCES):
    order = torch.randperm(num_blocks, generator=generator).tolist()  # scattered, block 0 included
    tables, slots, positions, query_start, seq_lens, computed = [], [], [], [0], [], []
    for done, new in sequences:
        total = done + new
        table = [order.pop() for _ in range(-(-total // block_size))]
        tables.append(table)
        for pos in range(done, total):
            slots.append(table[pos // block_size] * block_size + pos % block_size)
        positions += range(done, total)
        query_start.append(query_start[-1] + new)
        seq_lens.append(total)
        computed.append(done)
    width = max(map(len, tables))
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots), query_start_loc=torch.tensor(query_start, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), num_computed=torch.tensor(computed, dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        max_query_len=max(n for _, n in sequences), max_seq_len=max(seq_lens))
    meta.num_decodes, meta.decode_max_seq_len = leading_decodes(meta.query_start_loc.numpy(), meta.seq_lens.numpy())
    return torch.tensor(positions), tables, meta


def _reference(q, cache_k, cache_v, tables, block_size, scale, sequences):
    """Each token of each sequence attends to its own context positions 0..p, in float64."""
    out = torch.empty(q.shape, dtype=torch.float64)
    group = q.shape[1] // cache_k.shape[2]
    token = 0
    for (done, new), table in zip(sequences, tables):
        for i in range(new):
            p = done + i
            slots = [table[j // block_size] * block_size + j % block_size for j in range(p + 1)]
            k = cache_k.flatten(0, 1)[slots].double().repeat_interleave(group, dim=1)  # [p+1, H, D]
            v = cache_v.flatten(0, 1)[slots].double().repeat_interleave(group, dim=1)
            scores = torch.einsum("hd,thd->ht", q[token].double(), k) * scale
            out[token] = torch.einsum("ht,thd->hd", scores.softmax(-1), v)
            token += 1
    return out


@pytest.mark.parametrize("sequences", [SEQUENCES, DECODES_FIRST], ids=["mixed", "decodes_first"])
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim, block_size", [
    (9, 3, 64, 16), (4, 4, 128, 1), (8, 1, 32, 4)])
def test_matches_direct_reference(num_heads, num_kv_heads, head_dim, block_size, sequences):
    generator = torch.Generator().manual_seed(num_heads * 100 + block_size)
    num_blocks = sum(done + new for done, new in sequences) // block_size + 40
    positions, tables, meta = _build_step(block_size, num_blocks, generator, sequences)
    assert meta.num_decodes == (3 if sequences is DECODES_FIRST else 0)
    num_tokens = positions.numel()
    rotary = RotaryEmbedding(head_dim, RopeConfig(theta=10000.0), max_positions=256)
    cache = torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), float("nan"))
    # Fill the context computed in earlier steps (and only that) with finite values.
    for (done, _), table in zip(sequences, tables):
        for pos in range(done):
            cache[:, table[pos // block_size], pos % block_size] = torch.randn(2, num_kv_heads, head_dim,
                                                                               generator=generator)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = torch.randn(num_tokens, q_size + 2 * kv_size, generator=generator)
    q, k, v = (t.unflatten(-1, (-1, head_dim)) for t in qkv.split([q_size, kv_size, kv_size], dim=-1))
    assert not q.is_contiguous()
    scale = 1 / math.sqrt(head_dim)

    out = TorchAttentionBackend().forward(q, k, v, positions, rotary, cache, meta, scale)

    q_rot, k_rot = rotary(positions, q, k)
    k_slots, v_slots = cache[0].flatten(0, 1), cache[1].flatten(0, 1)
    assert torch.equal(k_slots[meta.slot_mapping], k_rot) and torch.equal(v_slots[meta.slot_mapping], v)
    expected = _reference(q_rot, cache[0], cache[1], tables, block_size, scale, sequences)
    assert out.shape == (num_tokens, num_heads, head_dim) and out.dtype == torch.float32
    assert (out.double() - expected).abs().max().item() < 1e-5


def test_many_decodes_attend_in_length_buckets():
    """300 decodes of scattered lengths behind a prompt chunk: on the CPU the decodes attend in
    buckets sorted by length, and each still gets exactly its own context."""
    rng = torch.Generator().manual_seed(3)
    sequences = [(int(n), 1) for n in torch.randint(0, 90, (300,), generator=rng)] + [(5, 11)]
    block_size, heads, kv_heads, dim = 16, 4, 2, 32
    num_blocks = sum(-(-(done + new) // block_size) for done, new in sequences) + 8
    positions, tables, meta = _build_step(block_size, num_blocks, rng, sequences)
    assert meta.num_decodes == 300
    rotary = RotaryEmbedding(dim, RopeConfig(theta=10000.0), max_positions=256)
    cache = torch.randn(2, num_blocks, block_size, kv_heads, dim, generator=rng)
    q = torch.randn(positions.numel(), heads, dim, generator=rng)
    k = torch.randn(positions.numel(), kv_heads, dim, generator=rng)
    v = torch.randn(positions.numel(), kv_heads, dim, generator=rng)
    out = TorchAttentionBackend().forward(q, k, v, positions, rotary, cache, meta, dim ** -0.5)
    expected = _reference(rotary(positions, q, k)[0], cache[0], cache[1], tables, block_size, dim ** -0.5, sequences)
    assert (out.double() - expected).abs().max().item() < 1e-5


def test_bfloat16_stays_close_to_float32():
    generator = torch.Generator().manual_seed(7)
    block_size, num_blocks, heads, kv_heads, dim = 16, 50, 9, 3, 64
    positions, tables, meta = _build_step(block_size, num_blocks, generator)
    rotary = RotaryEmbedding(dim, RopeConfig(theta=10000.0), max_positions=256)
    base = torch.randn(2, num_blocks, block_size, kv_heads, dim, generator=generator)
    q = torch.randn(positions.numel(), heads, dim, generator=generator)
    k = torch.randn(positions.numel(), kv_heads, dim, generator=generator)
    v = torch.randn(positions.numel(), kv_heads, dim, generator=generator)
    backend = TorchAttentionBackend()
    out32 = backend.forward(q, k, v, positions, rotary, base.clone(), meta, dim ** -0.5)
    out16 = backend.forward(q.bfloat16(), k.bfloat16(), v.bfloat16(), positions, rotary, base.bfloat16(), meta,
                            dim ** -0.5)
    assert out16.dtype == torch.bfloat16
    assert (out16.float() - out32).abs().max().item() < 3e-2


def test_rejects_a_non_contiguous_cache():
    positions, _, meta = _build_step(4, 60, torch.Generator().manual_seed(0))
    cache = torch.zeros(60, 4, 2, 2, 16).permute(3, 0, 1, 2, 4)[:2]
    x = torch.zeros(positions.numel(), 2, 16)
    with pytest.raises(ValueError, match="kv_cache: must be contiguous"):
        TorchAttentionBackend().forward(x, x, x, positions, RotaryEmbedding(16, RopeConfig(), 256), cache, meta, 1.0)


@pytest.mark.parametrize("query_lens, seq_lens, expected", [
    ([1, 1, 1, 57, 1], [40, 4097, 9, 57, 300], (3, 4097)),  # decodes first, a one-token chunk later
    ([19, 1, 1], [19, 50, 60], (0, 0)),  # a prefill at the front: no leading decodes
    ([1, 1], [5, 6], (2, 6)),  # all decodes
])
def test_leading_decodes(query_lens, seq_lens, expected):
    query_start_loc = np.concatenate([[0], np.cumsum(query_lens)]).astype(np.int32)
    assert leading_decodes(query_start_loc, np.array(seq_lens, dtype=np.int32)) == expected

"""Paged decode attention with RoPE and the cache write fused in (`rope=DecodeRope(...)`), against
the unfused path on the same inputs: `rope_and_cache_write` then the plain decode kernel.

Both paths rotate with the same fp32 operations and round once, so they must agree bit for bit,
outputs and cache alike. The new token's cache slot holds NaN before the launch: the fused kernel
loads its tiles before the projection's output exists, so it must take that row from registers,
never from the cache.
"""

from __future__ import annotations

import math

import pytest
import torch

from cuda_graphs import capture
from rtpllm.layers import cuda_ops
from rtpllm.layers.rotary import RopeConfig, RotaryEmbedding

DEVICE = "cuda"


def llama3_table(head_dim: int, max_positions: int) -> torch.Tensor:
    rope = RopeConfig(theta=500000.0, scaling="llama3", factor=8.0, original_max_position_embeddings=8192)
    return RotaryEmbedding(head_dim, rope, max_positions).cos_sin_cache.to(DEVICE)


class FusedCase:
    """A decode step: sequence i has seq_lens[i] - 1 cached tokens and one new token, whose q, k, v
    are views into one projection output; every cache slot no cached token owns holds NaN."""

    def __init__(self, seq_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                 dtype: torch.dtype, seed: int = 0):
        gen = torch.Generator(device=DEVICE).manual_seed(seed)
        n = len(seq_lens)
        needed = [math.ceil(length / block_size) for length in seq_lens]
        num_blocks = sum(needed) + 3
        self.cache = torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype,
                                device=DEVICE)
        self.block_tables = torch.zeros(n, max(needed) + 2, dtype=torch.int32, device=DEVICE)
        physical = torch.randperm(num_blocks, device=DEVICE, generator=gen).tolist()
        flat = self.cache.view(2, -1, num_kv_heads, head_dim)
        slots = []
        for i, length in enumerate(seq_lens):
            blocks = [physical.pop() for _ in range(needed[i])]
            self.block_tables[i, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
            seq_slots = [blocks[p // block_size] * block_size + p % block_size for p in range(length)]
            flat[:, seq_slots[:-1]] = torch.randn(2, length - 1, num_kv_heads, head_dim, dtype=dtype, device=DEVICE,
                                                  generator=gen)
            slots.append(seq_slots[-1])
        self.slot_mapping = torch.tensor(slots, dtype=torch.int64, device=DEVICE)
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
        self.positions = self.seq_lens.long() - 1
        width = (num_heads + 2 * num_kv_heads) * head_dim
        self.qkv = torch.randn(n, width, dtype=dtype, device=DEVICE, generator=gen) * 2
        q, k, v = self.qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=1)
        self.q = q.view(n, num_heads, head_dim)
        self.k = k.view(n, num_kv_heads, head_dim)
        self.v = v.view(n, num_kv_heads, head_dim)
        self.table = llama3_table(head_dim, max(seq_lens) + 64)
        self.scale = head_dim ** -0.5

    def rope(self) -> cuda_ops.DecodeRope:
        return cuda_ops.DecodeRope(self.k, self.v, self.positions, self.table, self.slot_mapping)

    def unfused(self, plan: cuda_ops.DecodePlan) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, cache) of rope_and_cache_write + the plain decode kernel, on copies."""
        q, cache = self.q.clone(), self.cache.clone()
        cuda_ops.rope_and_cache_write(q, self.k, self.v, self.positions, self.table, cache, self.slot_mapping)
        return cuda_ops.paged_decode_attention(q, cache, self.block_tables, self.seq_lens, self.scale, plan), cache

    def fused(self, plan: cuda_ops.DecodePlan) -> torch.Tensor:
        out = torch.full_like(self.q, float("nan"), memory_format=torch.contiguous_format)
        return cuda_ops.paged_decode_attention(self.q, self.cache, self.block_tables, self.seq_lens, self.scale, plan,
                                               out=out, rope=self.rope())


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int16), b.view(torch.int16))  # NaN poison compares equal to itself


def assert_fused_matches_unfused(case: FusedCase, plan: cuda_ops.DecodePlan) -> None:
    """Same output bits, same cache bits, and the projection output left as it was."""
    expected_out, expected_cache = case.unfused(plan)
    q_before = case.q.clone()
    out = case.fused(plan)
    assert not out.isnan().any()
    assert same_bits(out, expected_out), f"max |diff| {(out.float() - expected_out.float()).abs().max().item():.3e}"
    assert same_bits(case.cache, expected_cache), "the fused kernel wrote a different cache"
    assert torch.equal(case.q, q_before), "the fused path must leave the projection output alone"


@pytest.fixture(scope="module")
def workspace():
    return cuda_ops.allocate_decode_workspace(DEVICE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32, 64])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(32, 8), (9, 3), (40, 2)])
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_fused_rope_matches_unfused_path(num_splits, num_heads, num_kv_heads, block_size, head_dim, dtype, workspace):
    """Contexts of 1 token (the new one alone), tile and block edges, long ones; 40/2 heads gives
    each KV head two 16-head tiles, which must both see the new row and write it once."""
    lengths = [1, 16, 17, 64, 65, 640, 1000, 2049]
    case = FusedCase(lengths, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=num_heads + block_size)
    plan = cuda_ops.plan_paged_decode(len(lengths), num_heads, num_kv_heads, head_dim, block_size, dtype,
                                      max(lengths), workspace, num_splits=num_splits)
    assert_fused_matches_unfused(case, plan)


def test_fused_rope_single_sequence_at_decode_shapes(workspace):
    """The batch-1 decode step of an 8B Llama (32/8 heads, 128 dims): the split plan it really gets."""
    for length in (2, 640, 4096):
        case = FusedCase([length], 32, 8, 128, 16, torch.bfloat16, seed=length)
        plan = cuda_ops.plan_paged_decode(1, 32, 8, 128, 16, torch.bfloat16, 4096, workspace)
        assert_fused_matches_unfused(case, plan)


def test_fused_rope_takes_k_and_v_with_their_own_strides(workspace):
    """Qwen3 normalizes k per head before RoPE, so k arrives as its own tensor and v as a view."""
    case = FusedCase([5, 300, 77], 16, 2, 128, 16, torch.bfloat16)
    case.k = case.k.contiguous()
    plan = cuda_ops.plan_paged_decode(3, 16, 2, 128, 16, torch.bfloat16, 300, workspace)
    assert_fused_matches_unfused(case, plan)


def test_fused_rope_negative_slot_writes_nothing(workspace):
    """A padded CUDA-graph slot (negative slot) leaves the cache untouched; its neighbours are written."""
    case = FusedCase([30, 300, 5], 32, 8, 128, 16, torch.bfloat16)
    case.slot_mapping[1] = -1
    before = case.cache.clone()
    plan = cuda_ops.plan_paged_decode(3, 32, 8, 128, 16, torch.bfloat16, 300, workspace)
    _, expected_cache = case.unfused(plan)
    out = case.fused(plan)
    assert not out.isnan().any(), "the new row is taken from registers, whatever the slot"
    assert same_bits(case.cache, expected_cache)
    assert not same_bits(case.cache, before)  # sequences 0 and 2 did write


def test_fused_rope_replays_in_cuda_graph(workspace):
    """Captured once, replayed after new values are written into the same input tensors."""
    case = FusedCase([700, 33, 2000], 32, 8, 128, 16, torch.bfloat16)
    plan = cuda_ops.plan_paged_decode(3, 32, 8, 128, 16, torch.bfloat16, 4096, workspace)
    out = torch.empty_like(case.q, memory_format=torch.contiguous_format)
    rope = case.rope()

    def launch():
        cuda_ops.paged_decode_attention(case.q, case.cache, case.block_tables, case.seq_lens, case.scale, plan,
                                        out=out, rope=rope)

    pristine = case.cache.clone()
    graph = capture(launch)
    for trial in range(3):
        case.cache.copy_(pristine)
        case.qkv.copy_(torch.randn_like(case.qkv))
        expected_out, expected_cache = case.unfused(plan)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert same_bits(out, expected_out), f"replay {trial}"
        assert same_bits(case.cache, expected_cache), f"replay {trial}"


def test_fused_rope_rejects_bad_arguments(workspace):
    case = FusedCase([10, 20], 32, 8, 128, 16, torch.bfloat16)
    plan = cuda_ops.plan_paged_decode(2, 32, 8, 128, 16, torch.bfloat16, 20, workspace)

    def launch(**changes):
        fields = dict(k=case.k, v=case.v, positions=case.positions, cos_sin_cache=case.table,
                      slot_mapping=case.slot_mapping)
        fields.update(changes)
        cuda_ops.paged_decode_attention(case.q, case.cache, case.block_tables, case.seq_lens, case.scale, plan,
                                        rope=cuda_ops.DecodeRope(**fields))

    before = case.cache.clone()
    with pytest.raises(ValueError, match="rope.cos_sin_cache"):
        launch(cos_sin_cache=case.table[:, :64].contiguous())  # partial rotary: not fused
    with pytest.raises(ValueError, match="rope.positions"):
        launch(positions=case.positions.int())
    with pytest.raises(ValueError, match="rope.slot_mapping"):
        launch(slot_mapping=case.slot_mapping[:1])
    with pytest.raises(ValueError, match="rope.k"):
        launch(k=case.k[:, :4])
    with pytest.raises(ValueError, match="rope.v"):
        launch(v=case.v.float())
    with pytest.raises(ValueError, match="rope"):
        cuda_ops.paged_decode_attention(case.q, case.cache, case.block_tables, case.seq_lens, case.scale, plan,
                                        rope=(case.k, case.v))
    assert same_bits(case.cache, before), "a rejected launch must not touch the cache"

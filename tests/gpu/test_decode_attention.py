"""Paged decode attention (cuda/attention/paged_decode_*) against an fp32 torch reference.

Caches are poisoned with NaN everywhere except the slots each sequence owns, block tables are
shuffled, outputs are poisoned before every launch: a kernel that reads a slot past a sequence's
end, follows the wrong block, or leaves an output unwritten fails here.
"""

from __future__ import annotations

import math

import pytest
import torch

from cuda_graphs import capture
from rtpllm.layers import cuda_ops

DEVICE = "cuda"
# ||out - ref|| / ||ref|| and max |out - ref|: bf16 keeps 8 mantissa bits (P and the output are
# rounded to it), fp16 keeps 11.
TOLERANCES = {torch.bfloat16: (1e-2, 3e-2), torch.float16: (2e-3, 5e-3)}


def reference_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """softmax(q K^T * scale) V per sequence in float32, K/V gathered through the block table."""
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = num_heads // num_kv_heads
    out = torch.zeros(num_seqs, num_heads, head_dim, dtype=torch.float32, device=q.device)
    for i in range(num_seqs):
        n = int(seq_lens[i])
        if n == 0:
            continue
        blocks = block_tables[i, :math.ceil(n / block_size)].long()
        k = kv_cache[0][blocks].flatten(0, 1)[:n].float().repeat_interleave(group, dim=1)  # [n, heads, dim]
        v = kv_cache[1][blocks].flatten(0, 1)[:n].float().repeat_interleave(group, dim=1)
        probs = (torch.einsum("hd,nhd->hn", q[i].float(), k) * scale).softmax(dim=-1)
        out[i] = torch.einsum("hn,nhd->hd", probs, v)
    return out


class DecodeCase:
    """A random batch in a shuffled paged cache; every slot no sequence owns holds NaN."""

    def __init__(self, seq_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                 dtype: torch.dtype, max_blocks_per_seq: int | None = None, num_blocks: int | None = None):
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.block_size, self.dtype = block_size, dtype
        num_seqs = len(seq_lens)
        needed = [math.ceil(n / block_size) for n in seq_lens]
        max_blocks = max_blocks_per_seq or max(max(needed), 1) + 2  # padded columns, as the scheduler pads
        num_blocks = num_blocks or sum(needed) + 5  # a few blocks no sequence owns (NaN)
        self.kv_cache = torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype,
                                   device=DEVICE)
        self.block_tables = torch.zeros(num_seqs, max_blocks, dtype=torch.int32, device=DEVICE)
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
        self.q = torch.randn(num_seqs, num_heads, head_dim, dtype=dtype, device=DEVICE) * 1.5
        self.refill(seq_lens)

    def refill(self, seq_lens: list[int]) -> None:
        """New lengths, a new shuffle of the blocks and new values, in the same tensors."""
        self.kv_cache.fill_(float("nan"))
        self.block_tables.zero_()
        physical = torch.randperm(self.kv_cache.shape[1], device=DEVICE).tolist()
        flat = self.kv_cache.view(2, -1, self.num_kv_heads, self.head_dim)
        for i, n in enumerate(seq_lens):
            blocks = [physical.pop() for _ in range(math.ceil(n / self.block_size))]
            self.block_tables[i, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
            slots = (torch.tensor(blocks, device=DEVICE)[:, None] * self.block_size
                     + torch.arange(self.block_size, device=DEVICE)).flatten()[:n]
            flat[:, slots] = torch.randn(2, n, self.num_kv_heads, self.head_dim, dtype=self.dtype, device=DEVICE)
        self.seq_lens.copy_(torch.tensor(seq_lens, dtype=torch.int32))
        self.q.copy_(torch.randn_like(self.q) * 1.5)

    def plan(self, max_seq_len: int, workspace: torch.Tensor, num_splits: int | None = None) -> cuda_ops.DecodePlan:
        return cuda_ops.plan_paged_decode(len(self.seq_lens), self.num_heads, self.num_kv_heads, self.head_dim,
                                          self.block_size, self.dtype, max_seq_len, workspace, num_splits=num_splits)

    def reference(self, q: torch.Tensor | None = None) -> torch.Tensor:
        return reference_decode(self.q if q is None else q, self.kv_cache, self.block_tables, self.seq_lens,
                                self.head_dim ** -0.5)


def assert_matches(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert not out.isnan().any(), f"{int(out.isnan().sum())} of {out.numel()} outputs are NaN (unwritten or poisoned)"
    rel_tol, abs_tol = TOLERANCES[dtype]
    err = out.float() - ref
    rel = (err.norm() / ref.norm().clamp_min(1e-12)).item()
    worst = err.abs().max().item()
    assert rel < rel_tol and worst < abs_tol, \
        f"relative L2 error {rel:.2e} (tol {rel_tol}), max abs error {worst:.2e} (tol {abs_tol})"


def random_lengths(batch: int, max_ctx: int, gen: torch.Generator) -> list[int]:
    lengths = torch.randint(1, max_ctx + 1, (batch,), generator=gen).tolist()
    lengths[0] = max_ctx  # the longest context is always present
    return lengths


@pytest.fixture(scope="module")
def workspace():
    return cuda_ops.allocate_decode_workspace(DEVICE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(9, 3), (32, 8)])
@pytest.mark.parametrize("batch", [1, 7, 33])
@pytest.mark.parametrize("max_ctx", [1, 17, 1000, 4097])
def test_decode_matches_reference(max_ctx, batch, num_heads, num_kv_heads, block_size, head_dim, dtype, workspace):
    gen = torch.Generator().manual_seed(max_ctx * 1000 + batch)
    case = DecodeCase(random_lengths(batch, max_ctx, gen), num_heads, num_kv_heads, head_dim, block_size, dtype)
    plan = case.plan(max_ctx, workspace)
    out = torch.full_like(case.q, float("nan"))
    cuda_ops.paged_decode_attention(case.q, case.kv_cache, case.block_tables, case.seq_lens, head_dim ** -0.5, plan,
                                    out=out)
    assert_matches(out, case.reference(), dtype)


@pytest.mark.parametrize("num_splits", [1, 2, 5, 16, 64])
@pytest.mark.parametrize("num_heads,num_kv_heads,block_size", [(40, 2, 64), (32, 8, 16)])
def test_decode_forced_splits(num_splits, num_heads, num_kv_heads, block_size, workspace):
    """Every split count gives the same answer: the merge is exact, and the splits a short
    context does not need (splits are at least 128 tokens) stay out of it.
    40/2 heads puts 20 query heads on one KV head: two 16-row head tiles per KV head."""
    gen = torch.Generator().manual_seed(num_splits)
    lengths = random_lengths(7, 4097, gen)
    lengths[3] = 1  # a one-token context next to a long one: one active split, no merge
    lengths[4], lengths[5] = 128, 129  # one full minimum split; two splits, the second of one token
    case = DecodeCase(lengths, num_heads, num_kv_heads, 128, block_size, torch.bfloat16)
    plan = case.plan(4097, workspace, num_splits=num_splits)
    assert plan.num_splits == num_splits
    for _ in range(2):  # the second launch relies on the first having re-zeroed the split counters
        out = torch.full_like(case.q, float("nan"))
        cuda_ops.paged_decode_attention(case.q, case.kv_cache, case.block_tables, case.seq_lens, 128 ** -0.5, plan,
                                        out=out)
        assert_matches(out, case.reference(), torch.bfloat16)
    assert workspace.split_counters.count_nonzero().item() == 0, "a launch left a split counter armed"


def test_decode_reads_q_from_fused_qkv_view(workspace):
    """q as the model produces it: a strided view into the fused qkv projection output."""
    num_heads, num_kv_heads, head_dim = 32, 8, 128
    case = DecodeCase([300, 5, 4097, 64], num_heads, num_kv_heads, head_dim, 16, torch.bfloat16)
    qkv = torch.randn(4, (num_heads + 2 * num_kv_heads) * head_dim, dtype=torch.bfloat16, device=DEVICE)
    q = qkv[:, :num_heads * head_dim].view(4, num_heads, head_dim)
    plan = case.plan(4097, workspace)
    out = cuda_ops.paged_decode_attention(q, case.kv_cache, case.block_tables, case.seq_lens, head_dim ** -0.5, plan)
    assert_matches(out, case.reference(q), torch.bfloat16)


def test_decode_empty_sequence_gives_zeros(workspace):
    """A padded CUDA-graph slot (seq_len 0) writes zeros, and its neighbours are unaffected."""
    case = DecodeCase([100, 1, 2000], 32, 8, 128, 16, torch.bfloat16)
    case.seq_lens[1] = 0
    for num_splits in (1, 4):
        plan = case.plan(2000, workspace, num_splits=num_splits)
        out = torch.full_like(case.q, float("nan"))
        cuda_ops.paged_decode_attention(case.q, case.kv_cache, case.block_tables, case.seq_lens, 128 ** -0.5, plan,
                                        out=out)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert_matches(out, case.reference(), torch.bfloat16)


def test_decode_replays_in_cuda_graph(workspace):
    """Captured once with a plan for contexts up to 4097, replayed with new lengths, new block
    tables and new values written into the same tensors."""
    gen = torch.Generator().manual_seed(7)
    case = DecodeCase(random_lengths(7, 4097, gen), 32, 8, 128, 16, torch.bfloat16, max_blocks_per_seq=260,
                      num_blocks=7 * 257 + 5)  # room for any lengths up to 4097
    plan = case.plan(4097, workspace)
    out = torch.empty_like(case.q)
    scale = 128 ** -0.5

    def launch():
        cuda_ops.paged_decode_attention(case.q, case.kv_cache, case.block_tables, case.seq_lens, scale, plan, out=out)

    graph = capture(launch)
    for trial in range(3):
        lengths = [1, 17, 4097, 1000, 64, 65, 2048] if trial == 0 else random_lengths(7, 4097, gen)
        case.refill(lengths)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_matches(out, case.reference(), torch.bfloat16)


def test_decode_plan_splits_long_contexts_of_small_batches(workspace):
    """A lone long sequence is spread over the whole GPU; a full batch needs no splitting."""
    small = cuda_ops.plan_paged_decode(1, 32, 8, 128, 16, torch.bfloat16, 8192, workspace)
    large = cuda_ops.plan_paged_decode(256, 32, 8, 128, 16, torch.bfloat16, 8192, workspace)
    short = cuda_ops.plan_paged_decode(1, 32, 8, 128, 16, torch.bfloat16, 50, workspace)
    assert small.num_splits >= 8
    assert large.num_splits == 1 and large.partial_out is None
    assert short.num_splits == 1


def test_decode_rejects_bad_arguments(workspace):
    case = DecodeCase([10, 20], 32, 8, 128, 16, torch.bfloat16)
    plan = case.plan(20, workspace)
    scale = 128 ** -0.5
    with pytest.raises(ValueError, match="seq_lens"):
        cuda_ops.paged_decode_attention(case.q, case.kv_cache, case.block_tables, case.seq_lens.long(), scale, plan)
    with pytest.raises(ValueError, match="kv_cache"):
        cuda_ops.paged_decode_attention(case.q, case.kv_cache.half(), case.block_tables, case.seq_lens, scale, plan)
    with pytest.raises(ValueError, match="block_tables"):
        cuda_ops.paged_decode_attention(case.q, case.kv_cache, case.block_tables[:1], case.seq_lens, scale, plan)
    with pytest.raises(ValueError, match="plan"):
        cuda_ops.paged_decode_attention(case.q[:1], case.kv_cache, case.block_tables[:1], case.seq_lens[:1], scale,
                                        plan)
    with pytest.raises(ValueError, match="workspace"):
        cuda_ops.plan_paged_decode(2, 32, 8, 128, 16, torch.bfloat16, 20, workspace.partials)
    odd = DecodeCase([10], 32, 8, 96, 16, torch.bfloat16)
    with pytest.raises(ValueError, match="head_dim"):
        cuda_ops.plan_paged_decode(1, 32, 8, 96, 16, torch.bfloat16, 10, workspace)
    with pytest.raises(ValueError, match="head_dim"):
        cuda_ops.paged_decode_attention(odd.q, odd.kv_cache, odd.block_tables, odd.seq_lens, scale,
                                        cuda_ops.DecodePlan(1, 32, 96, 10, 1))

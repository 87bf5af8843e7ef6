"""CUDA prefill / extend attention over the paged KV cache against an fp32 torch reference.

Covers odd query lengths (1, 17, 1000, 4097), cached prefixes (0, 5, 300), batches of 1, 5, 7 and 33,
GQA 9/3 and 32/8 heads, head dims 64 and 128, block sizes 4 to 128, fp16 and bf16, and both
implementations (mma.sync "sm80" everywhere, wgmma "sm90" on compute capability 9.0). Outputs are
poisoned with NaN before each call; cache blocks no sequence owns, and slots past each sequence's
context, hold NaN so that a read outside the context shows up in the output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

from rtpllm.layers.prefill_attention import prefill_attention  # noqa: E402

# ||out - ref|| / ||ref|| and elementwise (atol, rtol) per dtype: P and the output are rounded to
# the 16-bit type (bf16: 8 mantissa bits, fp16: 11), everything else accumulates in fp32.
REL_TOL = {torch.bfloat16: 1e-2, torch.float16: 2.5e-3}
ELEM_TOL = {torch.bfloat16: (1.5e-2, 1.5e-2), torch.float16: (3e-3, 3e-3)}


def _impls():
    impls = ["sm80"]
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9:
        impls.append("sm90")
    return impls


IMPLS = _impls()


@dataclass
class PagedBatch:
    q: torch.Tensor  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1]
    seq_lens: torch.Tensor  # int32 [num_seqs]
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks], padded with 0
    max_query_len: int
    scale: float


def make_batch(q_lens, prefixes, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=0) -> PagedBatch:
    """Random q and cache; each sequence's blocks are scattered over the cache in random order.

    Block 0 is never assigned (block tables are padded with it), and it, every spare block and every
    slot past a sequence's context hold NaN.
    """
    gen = torch.Generator(device="cuda").manual_seed(seed)
    seq_lens = [p + q for p, q in zip(prefixes, q_lens)]
    blocks_per_seq = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = 1 + sum(blocks_per_seq) + 3
    kv_cache = torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype, device="cuda")
    order = (torch.randperm(num_blocks - 1, generator=gen, device="cuda") + 1).tolist()
    max_blocks = max(blocks_per_seq) + 2
    block_tables = torch.zeros(len(q_lens), max_blocks, dtype=torch.int32, device="cuda")
    next_block = 0
    for i, (n, nb) in enumerate(zip(seq_lens, blocks_per_seq)):
        ids = order[next_block:next_block + nb]
        next_block += nb
        block_tables[i, :nb] = torch.tensor(ids, dtype=torch.int32, device="cuda")
        values = torch.randn(2, n, num_kv_heads, head_dim, generator=gen, device="cuda").to(dtype)
        slots = torch.tensor(ids, device="cuda").repeat_interleave(block_size)[:n] * block_size
        slots = slots + torch.arange(n, device="cuda") % block_size
        kv_cache.view(2, num_blocks * block_size, num_kv_heads, head_dim)[:, slots] = values
    num_tokens = sum(q_lens)
    q = torch.randn(num_tokens, num_heads, head_dim, generator=gen, device="cuda").to(dtype)
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    return PagedBatch(
        q=q, kv_cache=kv_cache,
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device="cuda"),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device="cuda"),
        block_tables=block_tables, max_query_len=max(q_lens), scale=head_dim ** -0.5,
    )


def reference_attention(b: PagedBatch) -> torch.Tensor:
    """fp32 causal attention of each sequence's new tokens over its gathered context."""
    num_tokens, num_heads, head_dim = b.q.shape
    _, num_blocks, block_size, num_kv_heads, _ = b.kv_cache.shape
    group = num_heads // num_kv_heads
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=torch.float32, device=b.q.device)
    starts = b.query_start_loc.tolist()
    for i, seq_len in enumerate(b.seq_lens.tolist()):
        begin, end = starts[i], starts[i + 1]
        q_len = end - begin
        blocks = b.block_tables[i, :math.ceil(seq_len / block_size)].long()
        k = b.kv_cache[0, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        v = b.kv_cache[1, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", b.q[begin:end].float(), k) * b.scale
        positions = seq_len - q_len + torch.arange(q_len, device=b.q.device)
        masked = torch.arange(seq_len, device=b.q.device)[None, :] > positions[:, None]
        scores.masked_fill_(masked, float("-inf"))
        out[begin:end] = torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v)
    return out


def run_checked(b: PagedBatch, impl: str, q: torch.Tensor = None, out: torch.Tensor = None) -> torch.Tensor:
    q = b.q if q is None else q
    if out is None:
        out = torch.full_like(q, float("nan"), memory_format=torch.contiguous_format)
    else:
        out.fill_(float("nan"))
    result = prefill_attention(q, b.kv_cache, b.query_start_loc, b.seq_lens, b.block_tables,
                               max_query_len=b.max_query_len, scale=b.scale, out=out, impl=impl)
    torch.cuda.synchronize()
    assert result is out
    return out


def assert_matches_reference(out: torch.Tensor, b: PagedBatch) -> None:
    assert not torch.isnan(out).any(), f"{int(torch.isnan(out).sum())} output elements unwritten or NaN"
    ref = reference_attention(b)
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel < REL_TOL[out.dtype], f"relative error {rel:.2e} >= {REL_TOL[out.dtype]:.1e}"
    atol, rtol = ELEM_TOL[out.dtype]
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)


# Batch of 7 covering every query length and prefix of the issue in one launch.
MIXED_Q_LENS = [1, 17, 1000, 4097, 1, 17, 1000]
MIXED_PREFIXES = [0, 5, 300, 0, 300, 0, 5]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", [(9, 3), (32, 8)], ids=["9q3kv", "32q8kv"])
@pytest.mark.parametrize("block_size", [16, 32])
def test_mixed_batch_matches_reference(impl, dtype, head_dim, heads, block_size):
    b = make_batch(MIXED_Q_LENS, MIXED_PREFIXES, *heads, head_dim, block_size, dtype, seed=block_size + head_dim)
    assert_matches_reference(run_checked(b, impl), b)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("q_len,prefix", [(4097, 300), (1, 0), (17, 5)])
def test_single_sequence(impl, q_len, prefix):
    b = make_batch([q_len], [prefix], 32, 8, 128, 16, torch.bfloat16, seed=q_len)
    assert_matches_reference(run_checked(b, impl), b)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_many_tiles_per_cta_mixed_lengths(impl, head_dim):
    """Far more tiles than SMs, so each SM runs many CTAs back to back through the same K/V ring
    code, with sequences of very different lengths (short ones have no CTA at the top m blocks)
    and cached prefixes on some."""
    b = make_batch([2500, 3, 1300, 129, 640], [0, 7, 250, 2000, 0], 32, 8, head_dim, 16, torch.bfloat16,
                   seed=head_dim + 1)
    assert_matches_reference(run_checked(b, impl), b)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("heads", [(9, 3), (32, 8)], ids=["9q3kv", "32q8kv"])
def test_batch_of_33_short_sequences(impl, heads):
    gen = torch.Generator().manual_seed(33)
    q_lens = [[1, 17, 100][i] for i in torch.randint(0, 3, (33,), generator=gen).tolist()]
    prefixes = [[0, 5, 300][i] for i in torch.randint(0, 3, (33,), generator=gen).tolist()]
    b = make_batch(q_lens, prefixes, *heads, 128, 16, torch.float16, seed=7)
    assert_matches_reference(run_checked(b, impl), b)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("head_dim,block_size", [(64, 8), (64, 64), (128, 4), (128, 8), (128, 128)])
def test_other_power_of_two_block_sizes(impl, head_dim, block_size):
    # Blocks smaller than a gather thread's run of rows (16 rows at head_dim 128 on sm90) take the
    # per-row block-table path; larger ones the one-read-per-run path.
    b = make_batch([300, 33], [129, 0], 9, 3, head_dim, block_size, torch.bfloat16, seed=block_size)
    assert_matches_reference(run_checked(b, impl), b)


@pytest.mark.parametrize("impl", IMPLS)
def test_multi_head_attention_without_grouping(impl):
    b = make_batch([200, 77], [0, 40], 4, 4, 128, 32, torch.float16, seed=3)
    assert_matches_reference(run_checked(b, impl), b)


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_q_and_out_views(impl):
    # q and out as views into wider per-token rows, the way q sits inside a fused qkv projection.
    b = make_batch([130, 5], [20, 300], 9, 3, 128, 16, torch.bfloat16, seed=11)
    num_tokens, num_heads, head_dim = b.q.shape
    fused = torch.randn(num_tokens, (num_heads + 2 * 3) * head_dim, device="cuda").to(torch.bfloat16)
    fused[:, : num_heads * head_dim] = b.q.reshape(num_tokens, -1)
    q_view = fused[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    out_buffer = torch.empty(num_tokens, (num_heads + 1) * head_dim, device="cuda", dtype=torch.bfloat16)
    out_view = out_buffer[:, head_dim:].view(num_tokens, num_heads, head_dim)
    out_buffer[:, :head_dim] = 7.0
    out = run_checked(b, impl, q=q_view, out=out_view)
    assert_matches_reference(out, b)
    assert (out_buffer[:, :head_dim] == 7.0).all(), "wrote outside the out view"


@pytest.mark.parametrize("impl", IMPLS)
def test_repeated_calls_are_bitwise_identical(impl):
    b = make_batch(MIXED_Q_LENS, MIXED_PREFIXES, 32, 8, 128, 16, torch.bfloat16, seed=5)
    first = run_checked(b, impl).clone()
    for _ in range(3):
        assert torch.equal(run_checked(b, impl), first), "output changed between identical calls (a race?)"


def test_sm80_and_sm90_agree():
    if "sm90" not in IMPLS:
        pytest.skip("needs compute capability 9.0")
    b = make_batch(MIXED_Q_LENS, MIXED_PREFIXES, 9, 3, 64, 32, torch.float16, seed=9)
    sm80 = run_checked(b, "sm80").float()
    sm90 = run_checked(b, "sm90").float()
    assert ((sm80 - sm90).norm() / sm80.norm()).item() < 2e-3


def test_empty_batch_returns_out_untouched():
    b = make_batch([4], [0], 4, 2, 64, 16, torch.float16)
    q = b.q[:0]
    out = torch.empty_like(q)
    result = prefill_attention(q, b.kv_cache, b.query_start_loc[:1], b.seq_lens[:0], b.block_tables[:0],
                               max_query_len=0, scale=b.scale, out=out)
    assert result is out


def test_rejects_bad_inputs_naming_the_field():
    b = make_batch([5, 3], [0, 2], 8, 2, 64, 16, torch.float16)
    good = dict(q=b.q, kv_cache=b.kv_cache, query_start_loc=b.query_start_loc, seq_lens=b.seq_lens,
                block_tables=b.block_tables)

    def call(max_query_len=b.max_query_len, scale=b.scale, impl="auto", out=None, **changes):
        args = {**good, **changes}
        return prefill_attention(args["q"], args["kv_cache"], args["query_start_loc"], args["seq_lens"],
                                 args["block_tables"], max_query_len=max_query_len, scale=scale, impl=impl, out=out)

    cases = [
        ("q", dict(q=b.q.float())),
        ("q", dict(q=b.q.cpu())),
        ("q", dict(q=torch.zeros(8, 8, 96, dtype=torch.float16, device="cuda"))),
        ("q", dict(q=b.q.transpose(0, 1).contiguous().transpose(0, 1))),
        ("q", dict(q=torch.zeros(8, 3, 64, dtype=torch.float16, device="cuda"))),
        ("kv_cache", dict(kv_cache=b.kv_cache.to(torch.bfloat16))),
        ("kv_cache", dict(kv_cache=b.kv_cache[0])),
        ("kv_cache", dict(kv_cache=b.kv_cache.transpose(2, 3))),
        ("kv_cache", dict(kv_cache=torch.zeros(2, 4, 24, 2, 64, dtype=torch.float16, device="cuda"))),
        ("query_start_loc", dict(query_start_loc=b.query_start_loc.long())),
        ("query_start_loc", dict(query_start_loc=b.query_start_loc[:2])),
        ("seq_lens", dict(seq_lens=b.seq_lens.cpu())),
        ("block_tables", dict(block_tables=b.block_tables[:1])),
        ("block_tables", dict(block_tables=b.block_tables.t())),
    ]
    for field, change in cases:
        with pytest.raises(ValueError, match=field):
            call(**change)
    with pytest.raises(ValueError, match="max_query_len"):
        call(max_query_len=-1)
    with pytest.raises(ValueError, match="scale"):
        call(scale=0.0)
    with pytest.raises(ValueError, match="impl"):
        call(impl="sm75")
    with pytest.raises(ValueError, match="out"):
        call(out=torch.empty(8, 8, 64, dtype=torch.bfloat16, device="cuda"))
    with pytest.raises(ValueError, match="out"):
        call(out=torch.empty(8, 4, 64, dtype=torch.float16, device="cuda"))

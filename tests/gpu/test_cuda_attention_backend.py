"""CudaAttentionBackend against the torch reference backend (fp32) on the same step.

A step is built the way the scheduler describes it: shuffled block tables, contexts partly in
the cache already, new tokens at positions num_computed..seq_len-1. Both backends rotate, write
the cache and attend; outputs and the written cache slots must agree.
"""

from __future__ import annotations

import math

import pytest
import torch

from cuda_graphs import capture
from rtpllm.layers import cuda_ops
from rtpllm.layers.attention_metadata import AttentionMetadata, leading_decodes
from rtpllm.layers.cuda_attention import CudaAttentionBackend
from rtpllm.layers.rotary import RopeConfig, RotaryEmbedding
from rtpllm.layers.torch_attention import TorchAttentionBackend

DEVICE = "cuda"
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16


class Step:
    """One scheduled step: `cached[i]` context tokens already in the cache, `new[i]` new tokens."""

    def __init__(self, cached: list[int], new: list[int], num_blocks: int = 600, max_blocks_per_seq: int = 300):
        self.num_blocks = num_blocks
        seq_lens = [c + n for c, n in zip(cached, new)]
        physical = torch.randperm(num_blocks).tolist()
        self.block_tables = torch.zeros(len(cached), max_blocks_per_seq, dtype=torch.int32)
        for i, n in enumerate(seq_lens):
            blocks = [physical.pop() for _ in range(math.ceil(n / BLOCK_SIZE))]
            self.block_tables[i, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        slots, positions = [], []
        for i, (c, n) in enumerate(zip(cached, new)):
            for pos in range(c, c + n):
                positions.append(pos)
                slots.append(int(self.block_tables[i, pos // BLOCK_SIZE]) * BLOCK_SIZE + pos % BLOCK_SIZE)
        self.cached, self.new = cached, new
        self.positions = torch.tensor(positions, device=DEVICE)
        self.meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, device=DEVICE),
            query_start_loc=torch.tensor([0] + list(torch.tensor(new).cumsum(0)), dtype=torch.int32, device=DEVICE),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
            num_computed=torch.tensor(cached, dtype=torch.int32, device=DEVICE),
            block_tables=self.block_tables.to(DEVICE),
            max_query_len=max(new), max_seq_len=max(seq_lens))
        self.meta.num_decodes, self.meta.decode_max_seq_len = leading_decodes(
            self.meta.query_start_loc.cpu().numpy(), self.meta.seq_lens.cpu().numpy())

    def caches(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(bf16 cache for the CUDA backend, fp32 copy for the reference), cached contexts filled."""
        cache = torch.randn(2, self.num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
        return cache, cache.float()

    def qkv(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens = sum(self.new)
        qkv = torch.randn(tokens, (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM, dtype=DTYPE, device=DEVICE)
        q, k, v = qkv.split([NUM_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM], dim=1)
        return (q.view(tokens, NUM_HEADS, HEAD_DIM), k.view(tokens, NUM_KV_HEADS, HEAD_DIM),
                v.view(tokens, NUM_KV_HEADS, HEAD_DIM))


@pytest.fixture(scope="module")
def rotary():
    rope = RopeConfig(theta=500000.0, scaling="llama3", factor=8.0, original_max_position_embeddings=8192)
    return RotaryEmbedding(HEAD_DIM, rope, 16384).to(DEVICE)


@pytest.fixture(scope="module")
def backend():
    return CudaAttentionBackend(NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, DTYPE, DEVICE)


def run_both(step: Step, rotary: RotaryEmbedding, backend: CudaAttentionBackend):
    cache, ref_cache = step.caches()
    q, k, v = step.qkv()
    scale = HEAD_DIM ** -0.5
    expected = TorchAttentionBackend().forward(q.float(), k.float(), v.float(), step.positions, rotary, ref_cache,
                                               step.meta, scale)
    out = backend.forward(q, k, v, step.positions, rotary, cache, step.meta, scale)
    return out, expected, cache, ref_cache


def assert_close_rel(out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    assert not out.isnan().any()
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel < tol, f"relative L2 error {rel:.2e} >= {tol}"


def test_decode_step_matches_torch_backend(rotary, backend):
    step = Step(cached=[0, 16, 99, 1000, 4000, 7], new=[1] * 6)
    out, expected, cache, ref_cache = run_both(step, rotary, backend)
    assert step.meta.plan is not None and step.meta.plan.num_seqs == 6  # planned on demand
    assert_close_rel(out, expected, 1e-2)
    slots = step.meta.slot_mapping
    assert_close_rel(cache[0].flatten(0, 1)[slots], ref_cache[0].flatten(0, 1)[slots], 1e-2)
    assert torch.equal(cache[1].flatten(0, 1)[slots].float(), ref_cache[1].flatten(0, 1)[slots])


def test_mixed_prefill_step_matches_torch_backend(rotary, backend):
    """New prompts, a later chunk on a cached prefix and decodes in one step: the prefill kernel."""
    step = Step(cached=[0, 300, 17, 0, 2000], new=[33, 64, 1, 1, 1])
    assert step.meta.num_decodes == 0  # no decode at the front: nothing to split off
    out, expected, _, _ = run_both(step, rotary, backend)
    assert step.meta.plan is None
    assert_close_rel(out, expected, 1e-2)


def test_mixed_step_with_decodes_first_matches_torch_backend(rotary, backend):
    """The scheduler's order: decodes first (the decode kernel), then prompt chunks and a
    one-token chunk behind them (the prefill kernel), each writing only its own rows."""
    step = Step(cached=[4096, 0, 999, 17, 0, 300, 5], new=[1, 1, 1, 1, 57, 64, 1])
    assert (step.meta.num_decodes, step.meta.decode_max_seq_len) == (4, 4097)
    out, expected, _, _ = run_both(step, rotary, backend)
    assert step.meta.plan.num_seqs == 4
    assert_close_rel(out[:4], expected[:4], 1e-2)
    assert_close_rel(out[4:], expected[4:], 1e-2)


def test_decode_step_replays_in_cuda_graph(rotary, backend):
    """The model runner's pattern: plan with the max_model_len bound, capture, replay with new
    contexts written into the same metadata tensors."""
    step = Step(cached=[5, 700, 64], new=[1, 1, 1])
    cache, _ = step.caches()
    q, k, v = step.qkv()
    scale = HEAD_DIM ** -0.5
    backend.plan(step.meta, max_seq_len=4096)
    q_in = q.clone()
    out = torch.empty(3, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)

    def forward():
        q_in.copy_(q)  # the backend rotates q in place
        out.copy_(backend.forward(q_in, k, v, step.positions, rotary, cache, step.meta, scale))

    graph = capture(forward)

    replay = Step(cached=[4000, 2, 1500], new=[1, 1, 1])
    for name in ("slot_mapping", "seq_lens", "num_computed", "block_tables"):
        getattr(step.meta, name).copy_(getattr(replay.meta, name))
    step.positions.copy_(replay.positions)
    new_cache, ref_cache = replay.caches()
    cache.copy_(new_cache)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    expected = TorchAttentionBackend().forward(q.float(), k.float(), v.float(), replay.positions, rotary, ref_cache,
                                               replay.meta, scale)
    assert_close_rel(out, expected, 1e-2)


def test_backend_rejects_unsupported_shapes():
    with pytest.raises(ValueError, match="head_dim"):
        CudaAttentionBackend(32, 8, 96, 16, DTYPE, DEVICE)
    with pytest.raises(ValueError, match="block_size"):
        CudaAttentionBackend(32, 8, 128, 8, DTYPE, DEVICE)
    with pytest.raises(ValueError, match="num_kv_heads"):
        CudaAttentionBackend(32, 5, 128, 16, DTYPE, DEVICE)
    with pytest.raises(ValueError, match="dtype"):
        CudaAttentionBackend(32, 8, 128, 16, torch.float32, DEVICE)


def test_plan_must_bound_the_step(rotary, backend):
    step = Step(cached=[10, 20], new=[1, 1])
    with pytest.raises(ValueError, match="max_seq_len"):
        backend.plan(step.meta, max_seq_len=16)
    assert isinstance(backend.plan(step.meta), cuda_ops.DecodePlan)
    step.meta.max_seq_len = 5000  # a longer step replayed on a plan made for 21 tokens
    q, k, v = step.qkv()
    cache, _ = step.caches()
    with pytest.raises(ValueError, match="meta.plan"):
        backend.forward(q, k, v, step.positions, rotary, cache, step.meta, HEAD_DIM ** -0.5)

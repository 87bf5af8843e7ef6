"""Fused elementwise kernels against the copy bandwidth and against the torch layers they replace.

Every op here is memory-bound: its floor is the bytes it must read and write over the copy
bandwidth (3.02 TB/s on this workplace's H100). Shapes are Llama-3.1-8B's (hidden 4096,
intermediate 14336, 32 query / 8 KV heads of 128); 4096 and 16384 tokens are prefill steps, 64 a
decode batch (there a launch is a few microseconds of latency and bandwidth is not the point).
Both sides are timed as back-to-back launches inside a CUDA graph, cycling through input copies
so that inputs come from DRAM.

    python bench/gpu/bench_fused_ops.py [--json out.json] [--quick]
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from bench_util import H100_COPY_TBPS, copies_for_cold_l2, device_name, parse_args, row, time_in_graph_us, write_json
from rtpllm.layers import cuda_ops
from rtpllm.layers.rotary import RopeConfig, RotaryEmbedding
from rtpllm.layers.torch_attention import write_kv_cache

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, VOCAB, MAX_POS = 4096, 14336, 32, 8, 128, 128256, 131072
DTYPE = torch.bfloat16
ELEM = 2


def torch_rms_norm(x, weight, eps):
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@functools.cache
def shared_tables():
    """Read-only tables shared by every input copy (random rows of them are read, so they stay cold)."""
    rope = RopeConfig(theta=500000.0, scaling="llama3", factor=8.0, original_max_position_embeddings=8192)
    rotary = RotaryEmbedding(HEAD_DIM, rope, MAX_POS).cuda()
    embedding_table = torch.randn(VOCAB, HIDDEN, dtype=DTYPE, device="cuda")
    weight = torch.randn(HIDDEN, dtype=DTYPE, device="cuda")
    return rotary, embedding_table, weight


def rms_norm_case(tokens):
    _, _, weight = shared_tables()
    x = torch.randn(tokens, HIDDEN, dtype=DTYPE, device="cuda")
    out = torch.empty_like(x)
    return (lambda: cuda_ops.rms_norm(x, weight, 1e-5, out=out)), (lambda: torch_rms_norm(x, weight, 1e-5))


def fused_add_rms_norm_case(tokens):
    _, _, weight = shared_tables()
    x = torch.randn(tokens, HIDDEN, dtype=DTYPE, device="cuda")
    residual = torch.randn_like(x)
    return (lambda: cuda_ops.fused_add_rms_norm(x, residual, weight, 1e-5)), \
        (lambda: torch_rms_norm(x + residual, weight, 1e-5))


def rope_case(tokens):
    rotary, _, _ = shared_tables()
    q_size, kv_size = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    qkv = torch.randn(tokens, q_size + 2 * kv_size, dtype=DTYPE, device="cuda")
    q, k, v = (t.view(tokens, -1, HEAD_DIM) for t in qkv.split([q_size, kv_size, kv_size], dim=1))
    positions = torch.randint(0, MAX_POS, (tokens,), device="cuda")
    num_blocks = max(tokens // 16 * 2, 64)
    kv_cache = torch.zeros(2, num_blocks, 16, KV_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    slot_mapping = torch.randperm(num_blocks * 16, device="cuda")[:tokens]

    def reference():
        q_rot, k_rot = rotary(positions, q, k)
        write_kv_cache(kv_cache, k_rot, v, slot_mapping)
        return q_rot

    ours = lambda: cuda_ops.rope_and_cache_write(q, k, v, positions, rotary.cos_sin_cache,  # noqa: E731
                                                 kv_cache, slot_mapping)
    return ours, reference


def silu_and_mul_case(tokens):
    gate_up = torch.randn(tokens, 2 * INTER, dtype=DTYPE, device="cuda")
    out = torch.empty(tokens, INTER, dtype=DTYPE, device="cuda")
    return (lambda: cuda_ops.silu_and_mul(gate_up, out=out)), (lambda: F.silu(gate_up[:, :INTER]) * gate_up[:, INTER:])


def embedding_case(tokens):
    _, table, _ = shared_tables()
    ids = torch.randint(0, VOCAB, (tokens,), device="cuda")
    out = torch.empty(tokens, HIDDEN, dtype=DTYPE, device="cuda")
    return (lambda: cuda_ops.embedding(ids, table, out=out)), (lambda: F.embedding(ids, table))


# (name, builder, bytes that must move at `tokens` tokens)
OPS = [
    ("rms_norm", rms_norm_case, lambda t: 2 * t * HIDDEN * ELEM),
    ("fused_add_rms_norm", fused_add_rms_norm_case, lambda t: 4 * t * HIDDEN * ELEM),
    ("rope_and_cache_write", rope_case,
     lambda t: t * (2 * HEADS + 4 * KV_HEADS) * HEAD_DIM * ELEM + t * HEAD_DIM * 4),
    ("silu_and_mul", silu_and_mul_case, lambda t: 3 * t * INTER * ELEM),
    ("embedding", embedding_case, lambda t: 2 * t * HIDDEN * ELEM),
]


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    print(f"device: {device_name()}")
    print(f"{'op':<22} {'tokens':>6} {'ours us':>9} {'torch us':>9} {'speedup':>8} {'TB/s':>6} {'vs 3.02':>8}")
    rows = []
    for tokens in ((4096,) if args.quick else (64, 4096, 16384)):
        for name, build, num_bytes in OPS:
            pairs = [build(tokens) for _ in range(copies_for_cold_l2(num_bytes(tokens)))]
            ours_us = time_in_graph_us([ours for ours, _ in pairs])
            torch_us = time_in_graph_us([reference for _, reference in pairs])
            del pairs
            torch.cuda.empty_cache()
            tbps = num_bytes(tokens) / (ours_us * 1e-6) / 1e12
            ratio = tbps / H100_COPY_TBPS
            print(f"{name:<22} {tokens:>6} {ours_us:>9.1f} {torch_us:>9.1f} {torch_us / ours_us:>7.2f}x "
                  f"{tbps:>6.2f} {ratio:>8.2f}")
            rows.append(row(f"{name} T={tokens}", tbps, "TB/s", f"copy {H100_COPY_TBPS} TB/s", ratio,
                            time_us=ours_us, torch_us=torch_us, speedup_vs_torch=torch_us / ours_us))
    write_json(args.json, "fused_ops", rows)


if __name__ == "__main__":
    main()

"""Fused elementwise kernels against the copy bandwidth and against the torch layers they replace.

Every op here is memory-bound: its floor is the bytes it must read and write over the copy
bandwidth (3.02 TB/s on this workplace's H100). Shapes are Llama-3.1-8B's (hidden 4096,
intermediate 14336, 32 query / 8 KV heads of 128); 4096 tokens is a prefill step, 64 a decode
batch (there the launch latency, a few microseconds, dominates and the bandwidth is not the point).

    python bench/gpu/bench_fused_ops.py [--json out.json] [--quick]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench_util import H100_COPY_TBPS, device_name, parse_args, row, time_us, write_json
from rtpllm.layers import cuda_ops
from rtpllm.layers.rotary import RopeConfig, RotaryEmbedding
from rtpllm.layers.torch_attention import write_kv_cache

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 4096, 14336, 32, 8, 128, 128256
DTYPE = torch.bfloat16


def torch_rms_norm(x, weight, eps):
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def cases(tokens: int):
    """(name, bytes moved, our call, the torch equivalent) for each op at `tokens` tokens."""
    x = torch.randn(tokens, HIDDEN, dtype=DTYPE, device="cuda")
    residual = torch.randn_like(x)
    weight = torch.randn(HIDDEN, dtype=DTYPE, device="cuda")
    gate_up = torch.randn(tokens, 2 * INTER, dtype=DTYPE, device="cuda")
    qkv = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, dtype=DTYPE, device="cuda")
    q_size, kv_size = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    q = qkv[:, :q_size].view(tokens, HEADS, HEAD_DIM)
    k = qkv[:, q_size:q_size + kv_size].view(tokens, KV_HEADS, HEAD_DIM)
    v = qkv[:, q_size + kv_size:].view(tokens, KV_HEADS, HEAD_DIM)
    rope = RopeConfig(theta=500000.0, scaling="llama3", factor=8.0, original_max_position_embeddings=8192)
    rotary = RotaryEmbedding(HEAD_DIM, rope, 131072).cuda()
    positions = torch.randint(0, 131072, (tokens,), device="cuda")
    num_blocks = max(tokens // 16 * 2, 64)
    kv_cache = torch.zeros(2, num_blocks, 16, KV_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    slot_mapping = torch.randperm(num_blocks * 16, device="cuda")[:tokens]
    table = torch.randn(VOCAB, HIDDEN, dtype=DTYPE, device="cuda")
    ids = torch.randint(0, VOCAB, (tokens,), device="cuda")
    e = x.element_size()

    def torch_rope_cache():
        q2, k2 = rotary(positions, q, k)
        write_kv_cache(kv_cache, k2, v, slot_mapping)
        return q2

    return [
        ("rms_norm", 2 * tokens * HIDDEN * e, lambda: cuda_ops.rms_norm(x, weight, 1e-5),
         lambda: torch_rms_norm(x, weight, 1e-5)),
        ("fused_add_rms_norm", 4 * tokens * HIDDEN * e, lambda: cuda_ops.fused_add_rms_norm(x, residual, weight, 1e-5),
         lambda: torch_rms_norm(x + residual, weight, 1e-5)),
        ("rope_and_cache_write", tokens * (2 * q_size + 4 * kv_size) * e + tokens * HEAD_DIM * 4,
         lambda: cuda_ops.rope_and_cache_write(q, k, v, positions, rotary.cos_sin_cache, kv_cache, slot_mapping),
         torch_rope_cache),
        ("silu_and_mul", 3 * tokens * INTER * e, lambda: cuda_ops.silu_and_mul(gate_up),
         lambda: F.silu(gate_up[:, :INTER]) * gate_up[:, INTER:]),
        ("embedding", 2 * tokens * HIDDEN * e, lambda: cuda_ops.embedding(ids, table), lambda: F.embedding(ids, table)),
    ]


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    print(f"device: {device_name()}")
    print(f"{'op':<22} {'tokens':>6} {'ours us':>9} {'torch us':>9} {'speedup':>8} {'TB/s':>6} {'vs 3.02':>8}")
    rows = []
    for tokens in ((4096,) if args.quick else (64, 4096, 16384)):
        for name, num_bytes, ours, reference in cases(tokens):
            ours_us, torch_us = time_us(ours), time_us(reference)
            tbps = num_bytes / (ours_us * 1e-6) / 1e12
            ratio = tbps / H100_COPY_TBPS
            print(f"{name:<22} {tokens:>6} {ours_us:>9.1f} {torch_us:>9.1f} {torch_us / ours_us:>7.2f}x "
                  f"{tbps:>6.2f} {ratio:>8.2f}")
            rows.append(row(f"{name} T={tokens}", tbps, "TB/s", f"copy {H100_COPY_TBPS} TB/s", ratio,
                            time_us=ours_us, torch_us=torch_us, speedup_vs_torch=torch_us / ours_us))
        torch.cuda.empty_cache()
    write_json(args.json, "fused_ops", rows)


if __name__ == "__main__":
    main()

"""Paged decode attention: KV bytes streamed per second against the copy bandwidth.

Decode attention reads every K and V element of every context once and does little arithmetic
per byte, so its floor is KV bytes / copy bandwidth. Target (issue 5): at least 80% of the
copy bandwidth (3.02 TB/s on this workplace's H100) at batch 64, context 4096, 32 query /
8 KV heads, head dim 128, bf16. Blocks are shuffled in the pool, as after a long serving run.
Timed as back-to-back launches inside a CUDA graph (how the model runner replays decode), cycling
through enough input copies that every launch reads its K/V from DRAM, not from L2.

    python bench/gpu/bench_decode_attention.py [--json out.json] [--quick]
"""

from __future__ import annotations

import functools
import math

import torch

from bench_util import (H100_COPY_TBPS, copies_for_cold_l2, device_name, measure_copy_tbps, parse_args, row,
                        time_in_graph_us, write_json)
from rtpllm.layers import cuda_ops

HEADLINE = dict(batch=64, ctx=4096, num_heads=32, num_kv_heads=8, head_dim=128)
SWEEP = [  # (batch, context)
    (1, 4096), (1, 32768), (8, 4096), (16, 8192), (32, 2048), (64, 4096), (64, 8192), (128, 2048), (256, 1024),
    (256, 4096),
]


def build(batch: int, ctx: int, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
          dtype: torch.dtype):
    blocks_per_seq = math.ceil(ctx / block_size)
    num_blocks = batch * blocks_per_seq
    kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device="cuda")
    block_tables = torch.randperm(num_blocks, device="cuda").to(torch.int32).view(batch, blocks_per_seq)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, num_heads, head_dim, dtype=dtype, device="cuda")
    return q, kv_cache, block_tables, seq_lens


def measure(batch: int, ctx: int, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int = 16,
            dtype: torch.dtype = torch.bfloat16, num_splits: int | None = None) -> dict:
    kv_bytes = 2 * batch * ctx * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8
    workspace = cuda_ops.allocate_decode_workspace("cuda")
    plan = cuda_ops.plan_paged_decode(batch, num_heads, num_kv_heads, head_dim, block_size, dtype, ctx, workspace,
                                      num_splits=num_splits)
    scale = head_dim ** -0.5
    launches = []
    for _ in range(copies_for_cold_l2(kv_bytes, max_copies=16)):
        q, kv_cache, block_tables, seq_lens = build(batch, ctx, num_heads, num_kv_heads, head_dim, block_size, dtype)
        launches.append(functools.partial(cuda_ops.paged_decode_attention, q, kv_cache, block_tables, seq_lens, scale,
                                          plan, out=torch.empty_like(q)))
    us = time_in_graph_us(launches)
    del launches
    torch.cuda.empty_cache()
    return {"us": us, "tbps": kv_bytes / (us * 1e-6) / 1e12, "num_splits": plan.num_splits, "kv_gb": kv_bytes / 1e9}


def sdpa_contiguous_us(batch: int, ctx: int, num_heads: int, num_kv_heads: int, head_dim: int) -> float | None:
    """torch SDPA on contiguous (unpaged) K/V of the same size, for orientation only."""
    q = torch.randn(batch, num_heads, 1, head_dim, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(batch, num_kv_heads, ctx, head_dim, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    try:
        return time_in_graph_us([lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)])
    except (RuntimeError, TypeError):
        return None
    finally:
        del k, v
        torch.cuda.empty_cache()


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    card = device_name()
    copy_tbps = measure_copy_tbps()
    print(f"device: {card}; copy bandwidth measured now: {copy_tbps:.2f} TB/s (reference {H100_COPY_TBPS} TB/s)")
    rows = [row("device copy (measured now)", copy_tbps, "TB/s", f"copy {H100_COPY_TBPS} TB/s",
                copy_tbps / H100_COPY_TBPS)]

    print(f"{'config':<46} {'splits':>6} {'time us':>9} {'TB/s':>6} {'vs 3.02':>8} {'vs now':>7}")

    def report(label: str, result: dict) -> None:
        ratio = result["tbps"] / H100_COPY_TBPS
        print(f"{label:<46} {result['num_splits']:>6} {result['us']:>9.1f} {result['tbps']:>6.2f} {ratio:>8.2f} "
              f"{result['tbps'] / copy_tbps:>7.2f}")
        rows.append(row(f"decode {label}", result["tbps"], "TB/s", f"copy {H100_COPY_TBPS} TB/s", ratio,
                        time_us=result["us"], num_splits=result["num_splits"],
                        ratio_to_copy_now=result["tbps"] / copy_tbps))

    h = HEADLINE
    for block_size in (16, 32):
        report(f"b{h['batch']} ctx{h['ctx']} 32/8 d128 bf16 bs{block_size}", measure(**h, block_size=block_size))
    sdpa = sdpa_contiguous_us(**h)
    if sdpa is not None:
        kv_bytes = 2 * h["batch"] * h["ctx"] * h["num_kv_heads"] * h["head_dim"] * 2
        tbps = kv_bytes / (sdpa * 1e-6) / 1e12
        print(f"{'torch SDPA, contiguous KV (reference)':<46} {'-':>6} {sdpa:>9.1f} {tbps:>6.2f} "
              f"{tbps / H100_COPY_TBPS:>8.2f} {tbps / copy_tbps:>7.2f}")
        rows.append(row("torch SDPA decode, contiguous KV b64 ctx4096", tbps, "TB/s", f"copy {H100_COPY_TBPS} TB/s",
                        tbps / H100_COPY_TBPS, time_us=sdpa))
    if not args.quick:
        for splits in (1, 2, 4):
            report(f"b64 ctx4096 32/8 d128 bf16 bs16 splits={splits}", measure(**h, num_splits=splits))
        report("b64 ctx4096 32/8 d128 fp16 bs16", measure(**h, dtype=torch.float16))
        report("b64 ctx4096 32/8 d64 bf16 bs16", measure(64, 4096, 32, 8, 64))
        report("b64 ctx4096 64/8 d128 bf16 bs16", measure(64, 4096, 64, 8, 128))
        for batch, ctx in SWEEP:
            report(f"b{batch} ctx{ctx} 32/8 d128 bf16 bs16", measure(batch, ctx, 32, 8, 128))
        # The split heuristic's trade-off on small batches: more CTAs against a longer merge.
        for (batch, ctx), split_counts in (((1, 4096), (8, 16, 32, 64)), ((1, 32768), (8, 16, 32, 64)),
                                           ((8, 4096), (1, 2, 4, 8)), ((16, 8192), (1, 2, 4))):
            for splits in split_counts:
                report(f"b{batch} ctx{ctx} 32/8 d128 bf16 bs16 splits={splits}",
                       measure(batch, ctx, 32, 8, 128, num_splits=splits))
    write_json(args.json, "decode_attention", rows, copy_tbps_measured=copy_tbps)


if __name__ == "__main__":
    main()

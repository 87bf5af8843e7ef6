"""Prefill attention throughput: our paged kernels against torch SDPA on the same card, same run.

Causal prefill of S tokens per sequence, 32 query heads x head_dim 128 (and variants), bf16, with a
batch that fills the chip (16k tokens per launch). Ours reads K/V through block tables from a paged
cache whose blocks are scattered in random order; SDPA reads contiguous [B, H, S, D] tensors.
FLOPs are counted as causal: 4 * S * S * heads * head_dim / 2 per sequence (extend: 4 * heads *
head_dim * sum over new tokens of the keys each sees).

Usage: python bench/gpu/bench_prefill_attention.py [--json PATH] [--quick] [--impls sm90,sm80]
Ceilings measured on this workplace's H100 (issue 5): SDPA causal 32x128 at S = 1024 / 4096 / 8192:
237 / 517 / 549 TFLOP/s. Target: ours >= 0.8x SDPA at S = 4096 and 8192.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F

import bench_util
from rtpllm.layers.prefill_attention import prefill_attention

TOKENS_PER_LAUNCH = 16384


@dataclass
class Case:
    name: str
    seq_len: int  # new tokens per sequence
    prefix: int  # cached tokens before them
    batch: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def flops(self) -> float:
        keys_seen = self.seq_len * self.prefix + self.seq_len * (self.seq_len + 1) / 2
        return 4.0 * self.num_heads * self.head_dim * keys_seen * self.batch


@dataclass
class Row:
    case: str
    impl: str
    ms: float
    tflops: float


def time_ms(fn) -> float:
    """Median milliseconds of one call (bench_util: CUDA events / do_bench, L2 flushed)."""
    return bench_util.time_us(fn, warmup_ms=100, rep_ms=400) / 1000.0


def paged_inputs(case: Case, block_size: int = 16, dtype=torch.bfloat16):
    ctx = case.prefix + case.seq_len
    blocks_per_seq = math.ceil(ctx / block_size)
    num_blocks = case.batch * blocks_per_seq + 1
    kv_cache = torch.randn(2, num_blocks, block_size, case.num_kv_heads, case.head_dim, device="cuda", dtype=dtype)
    order = torch.randperm(num_blocks - 1, device="cuda", dtype=torch.int32) + 1
    block_tables = order[: case.batch * blocks_per_seq].view(case.batch, blocks_per_seq).contiguous()
    q = torch.randn(case.batch * case.seq_len, case.num_heads, case.head_dim, device="cuda", dtype=dtype)
    query_start_loc = torch.arange(0, case.batch + 1, device="cuda", dtype=torch.int32) * case.seq_len
    seq_lens = torch.full((case.batch,), ctx, device="cuda", dtype=torch.int32)
    return q, kv_cache, query_start_loc, seq_lens, block_tables


def bench_ours(case: Case, impl: str) -> Row:
    q, kv_cache, qsl, seq_lens, block_tables = paged_inputs(case)
    out = torch.empty_like(q)
    scale = case.head_dim ** -0.5

    def run():
        prefill_attention(q, kv_cache, qsl, seq_lens, block_tables, case.seq_len, scale, out=out, impl=impl)

    ms = time_ms(run)
    return Row(case.name, f"ours-{impl}", ms, case.flops / (ms * 1e-3) / 1e12)


def bench_sdpa(case: Case, backend: Optional[str]) -> Optional[Row]:
    """torch SDPA on contiguous tensors; backend "flash" forces FlashAttention, None lets torch pick."""
    if case.prefix:
        return None  # SDPA has no paged prefix; compare plain prefill only
    from torch.nn.attention import SDPBackend, sdpa_kernel

    shape = (case.batch, case.num_heads, case.seq_len, case.head_dim)
    kv_shape = (case.batch, case.num_kv_heads, case.seq_len, case.head_dim)
    q = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(kv_shape, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(kv_shape, device="cuda", dtype=torch.bfloat16)
    gqa = case.num_kv_heads != case.num_heads

    def run():
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

    try:
        if backend == "flash":
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                ms = time_ms(run)
        else:
            ms = time_ms(run)
    except RuntimeError as err:  # e.g. no flash kernel for this shape
        print(f"  sdpa-{backend or 'default'} unavailable for {case.name}: {err}".splitlines()[0])
        return None
    return Row(case.name, f"sdpa-{backend or 'default'}", ms, case.flops / (ms * 1e-3) / 1e12)


def cases(quick: bool):
    out = []
    for s in ((4096,) if quick else (1024, 4096, 8192)):
        out.append(Case(f"prefill S={s} 32x128", s, 0, max(1, TOKENS_PER_LAUNCH // s), 32, 32, 128))
    if not quick:
        out.append(Case("prefill S=4096 GQA 32/8x128", 4096, 0, 4, 32, 8, 128))
        out.append(Case("prefill S=4096 32x64", 4096, 0, 4, 32, 32, 64))
        out.append(Case("extend 512 new on 3584 cached, GQA 32/8x128", 512, 3584, 32, 32, 8, 128))
    return out


def summary_rows(rows: list[Row]) -> list[dict]:
    """Rows in the bench_util format: ours against the best SDPA backend of the same run."""
    out = []
    for r in rows:
        if not r.impl.startswith("ours"):
            continue
        sdpa = {x.impl: x.tflops for x in rows if x.case == r.case and x.impl.startswith("sdpa")}
        best = max(sdpa.values()) if sdpa else None
        ceiling = ", ".join(f"{k} {v:.0f} TFLOP/s" for k, v in sdpa.items()) + " (same run)" if sdpa else ""
        out.append(bench_util.row(f"{r.case} {r.impl}", r.tflops, "TFLOP/s", ceiling,
                                  None if best is None else r.tflops / best, ms=r.ms,
                                  **{f"vs_{k}": r.tflops / v for k, v in sdpa.items()}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here (bench/gpu/bench_util.py format)")
    parser.add_argument("--quick", action="store_true", help="S = 4096 only")
    parser.add_argument("--impls", default=None, help="comma-separated kernels to time (default: all this card runs)")
    args = parser.parse_args()

    card = bench_util.device_name()
    impls = ["sm90", "sm80"] if torch.cuda.get_device_capability()[0] == 9 else ["sm80"]
    if args.impls:
        impls = args.impls.split(",")
    rows = []
    for case in cases(args.quick):
        for impl in impls:
            rows.append(bench_ours(case, impl))
        for backend in ("flash", None):
            row = bench_sdpa(case, backend)
            if row is not None:
                rows.append(row)
        torch.cuda.empty_cache()

    print(f"\nprefill attention, {card}, bf16, causal, block_size 16 (ours), torch {torch.__version__}")
    print(f"{'case':<46} {'impl':<14} {'ms':>9} {'TFLOP/s':>9} {'vs flash':>9} {'vs default':>11}")
    for row in rows:
        ratios = []
        for backend in ("sdpa-flash", "sdpa-default"):
            ref = next((r for r in rows if r.case == row.case and r.impl == backend), None)
            ratios.append(f"{row.tflops / ref.tflops:.2f}x" if ref is not None else "-")
        print(f"{row.case:<46} {row.impl:<14} {row.ms:>9.3f} {row.tflops:>9.1f} {ratios[0]:>9} {ratios[1]:>11}")
    bench_util.write_json(args.json, "prefill_attention", summary_rows(rows), torch=torch.__version__,
                          all_rows=[asdict(r) for r in rows])


if __name__ == "__main__":
    main()

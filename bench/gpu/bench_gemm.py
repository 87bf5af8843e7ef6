"""GEMMs on Llama-3.1-8B / Qwen3-8B weight shapes: cuBLAS against our decode GEMV and every built
CUTLASS sm90 kernel (with split-K / stream-K settings), each timed in a CUDA graph over enough
weight copies that L2 never holds one. Reports, per shape and M, our best kernel against cuBLAS
(weight TB/s for decode sizes, TFLOP/s for prefill sizes), and with --write-table writes the
dispatch table (python/rtpllm/layers/gemm_dispatch.json format) choosing the fastest of all."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess

import torch

from bench_util import copies_for_cold_l2, device_name, row, time_in_graph_us, write_json
from rtpllm.layers.cuda_gemm import gemv, gemv_applies
from rtpllm.layers.gemm_dispatch import DEFAULT_TABLE, M_BUCKETS
from rtpllm.layers.sm90_gemm import WORKSPACE_BYTES, kernels, sm90_gemm, workspace_bytes_needed

# (name, N, K); Qwen3-8B's qkv and o have Llama-8B's shapes.
SHAPES = [("llama8b qkv", 6144, 4096), ("llama8b o", 4096, 4096), ("llama8b gate_up", 28672, 4096),
          ("llama8b down", 4096, 14336), ("llama8b lm_head", 128256, 4096),
          ("qwen3-8b gate_up", 24576, 4096), ("qwen3-8b down", 4096, 12288), ("qwen3-8b lm_head", 151936, 4096)]
LM_HEAD_MAX_M = 512  # logits are computed for the last token of each sequence only
DECODE_MAX_M = 256
SPLITS = (1, 0, 2, 3, 4, 6, 8)
SWIZZLES = (1, 4, 8)  # tried for the prefill kernels at M >= SWIZZLE_MIN_M
SWIZZLE_MIN_M = 1024


def candidates(m: int, n: int, k: int, x: torch.Tensor, w: torch.Tensor):
    """(backend, kernel, splits, swizzle) worth timing at this shape."""
    out = [("cublas", "", 1, 1)]
    if gemv_applies(x, w):
        out.append(("gemv", "", 1, 1))
    for name, spec in kernels().items():
        if spec.swap_ab and m > 2 * DECODE_MAX_M:
            continue  # tokens on the narrow side: only for small M
        if not spec.swap_ab and m < 32:
            continue  # a 128-row token tile would be mostly padding
        splits = SPLITS if spec.stream_k and m <= 2048 else (1,)
        for s in splits:
            if s != 1 and workspace_bytes_needed(x, w, kernel=name, splits=s) > WORKSPACE_BYTES:
                continue
            swizzles = SWIZZLES if not spec.swap_ab and s == 1 and m >= SWIZZLE_MIN_M else (1,)
            out.extend(("sm90", name, s, z) for z in swizzles)
    return out


def launcher(backend: str, kernel: str, splits: int, swizzle: int, x: torch.Tensor):
    if backend == "cublas":
        return lambda w: torch.nn.functional.linear(x, w)
    if backend == "gemv":
        return lambda w: gemv(x, w)
    return lambda w: sm90_gemm(x, w, kernel=kernel, splits=splits, swizzle=swizzle)


def git_commit() -> str:
    if os.environ.get("RTPLLM_COMMIT"):
        return os.environ["RTPLLM_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_table(path: str, entries: list[dict]) -> None:
    """The shipped table with this card's entries replaced by `entries` (other cards' kept)."""
    card = device_name()
    kept = [e for e in json.loads(DEFAULT_TABLE.read_text())["entries"]
            if e.get("device") != card] if DEFAULT_TABLE.exists() else []
    runs = json.loads(DEFAULT_TABLE.read_text()).get("runs", {}) if DEFAULT_TABLE.exists() else {}
    runs[card] = {"date": datetime.date.today().isoformat(), "commit": git_commit()}
    with open(path, "w") as f:
        json.dump({"arch": "sm90", "tool": "bench/gpu/bench_gemm.py --write-table", "runs": runs,
                   "entries": kept + entries}, f, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--quick", action="store_true", help="fewer M values")
    parser.add_argument("--write-table", default=os.environ.get("GEMM_TABLE_OUT"),
                        help="write the dispatch table (gemm_dispatch.json format) here, after every shape "
                             "(default: $GEMM_TABLE_OUT)")
    args = parser.parse_args()

    ms = (1, 8, 64, 256, 4096) if args.quick else M_BUCKETS
    rows, entries = [], []
    for shape_name, n, k in SHAPES:
        copies = copies_for_cold_l2(n * k * 2, max_copies=8)
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5 for _ in range(copies)]
        for m in ms:
            if "lm_head" in shape_name and m > LM_HEAD_MAX_M:
                continue
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            replays = 20 if m <= 512 else 5
            timings = {}
            for cand in candidates(m, n, k, x, weights[0]):
                fn = launcher(*cand, x)
                timings[cand] = time_in_graph_us([lambda w=w, fn=fn: fn(w) for w in weights], replays=replays)
            cublas_us = timings[("cublas", "", 1, 1)]
            ours = {c: t for c, t in timings.items() if c[0] != "cublas"}
            best_ours = min(ours, key=ours.get)
            best = min(timings, key=timings.get)
            speedup = cublas_us / ours[best_ours]
            decode = m <= DECODE_MAX_M
            if decode:
                value, unit = n * k * 2 / ours[best_ours] / 1e6, "TB/s"
            else:
                value, unit = 2 * m * n * k / ours[best_ours] / 1e6, "TFLOP/s"
            label = (best_ours[0] if best_ours[0] != "sm90"
                     else f"{best_ours[1]} splits={best_ours[2]} swizzle={best_ours[3]}")
            rows.append(row(f"gemm {shape_name} M={m} ({n}x{k}): {label}", speedup, "x cuBLAS",
                            f"cuBLAS {cublas_us:.1f} us", speedup, us=ours[best_ours], cublas_us=cublas_us,
                            rate=value, rate_unit=unit, backend=best_ours[0], kernel=best_ours[1],
                            splits=best_ours[2], swizzle=best_ours[3]))
            entries.append({"device": device_name(), "dtype": "bfloat16", "n": n, "k": k, "m": m,
                            "backend": best[0], "kernel": best[1], "splits": best[2], "swizzle": best[3],
                            "us": round(timings[best], 2), "cublas_us": round(cublas_us, 2)})
            print(f"[{device_name()}] {shape_name} M={m}: cuBLAS {cublas_us:.1f} us; best ours {label} "
                  f"{ours[best_ours]:.1f} us ({value:.2f} {unit}, {speedup:.2f}x cuBLAS)", flush=True)
        del weights
        torch.cuda.empty_cache()
        write_json(args.json, "gemm", rows)  # after every shape, so a run cut short keeps what it measured
        if args.write_table:
            write_table(args.write_table, entries)


if __name__ == "__main__":
    main()

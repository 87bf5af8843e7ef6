"""Decode GEMV vs cuBLAS (torch F.linear) on Llama-3.1-8B / Qwen3-8B decode shapes: weight bytes
per second against the copy ceiling, both measured in the same run on the same card."""

import torch

from bench_util import H100_COPY_TBPS, device_name, parse_args, row, time_in_graph_us, write_json
from rtpllm.layers.cuda_gemm import gemv

# (name, N, K): fused qkv, o, fused gate_up, down of Llama-3.1-8B; Qwen3-8B's qkv and gate_up.
SHAPES = [("llama8b qkv", 6144, 4096), ("llama8b o", 4096, 4096), ("llama8b gate_up", 28672, 4096),
          ("llama8b down", 4096, 14336), ("llama8b lm_head", 128256, 4096),
          ("qwen3-8b qkv", 6144, 4096), ("qwen3-8b gate_up", 24576, 4096)]


def main() -> None:
    args = parse_args(__doc__)
    rows = []
    ms = (1, 4) if args.quick else (1, 2, 4)
    for name, n, k in SHAPES:
        copies = max(2, (200 << 20) // (n * k * 2))  # enough weight copies that L2 never holds one
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ours = time_in_graph_us([lambda w=w: gemv(x, w) for w in weights])
            cublas = time_in_graph_us([lambda w=w: torch.nn.functional.linear(x, w) for w in weights])
            tbps = n * k * 2 / ours / 1e6
            rows.append(row(f"gemv {name} M={m} ({n}x{k})", tbps, "TB/s", f"copy {H100_COPY_TBPS}",
                            tbps / H100_COPY_TBPS, us=ours, cublas_us=cublas, speedup_vs_cublas=cublas / ours))
            print(f"[{device_name()}] {name} M={m}: ours {ours:.1f} us ({tbps:.2f} TB/s), cuBLAS {cublas:.1f} us, "
                  f"{cublas / ours:.2f}x", flush=True)
        del weights
    write_json(args.json, "gemv", rows)


if __name__ == "__main__":
    main()

"""Which GEMM serves y = x[M, K] @ w[N, K]^T on the GPU: a measured table, not code paths.

`gemm_dispatch.json` (beside this file) is written by `bench/gpu/bench_gemm.py --write-table` on
the device: for each card, each weight shape (N, K) of the models we benchmark and each bucket of
M, the fastest of cuBLAS, our decode GEMV and every built CUTLASS sm90 kernel (with its
split-K/stream-K and swizzle settings), timed in the same run. The running card's entries are
used, or, on a card the table has not seen, those of the first card it lists. A lookup takes the
smallest bucket that holds M; shapes or dtypes the table does not know use the GEMV for M <= 4
and cuBLAS otherwise.

    linear(x, weight, bias=None)        the entry point the model's Linear layers call
    linear_silu_and_mul(x, gate_up, bias=None)
                                        a gated MLP's gate/up projection and activation; fused into
                                        one GEMV pass where the table picks the GEMV
    choose(m, n, k, dtype)              -> GemmChoice, for tests and benchmarks

RTPLLM_GEMM=cublas sends every GEMM to cuBLAS (for A/B runs), RTPLLM_GEMM=sm90 every shape our
CUTLASS kernels can take to one of them (so end-to-end tests cover them on any model);
RTPLLM_GEMM_TABLE=PATH reads another table.
"""

from __future__ import annotations

import bisect
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from rtpllm.layers.cuda_dispatch import cuda_kernels_built, use_cuda_kernels
from rtpllm.layers.activation import silu_and_mul
from rtpllm.layers.cuda_gemm import gemv, gemv_applies, gemv_silu_and_mul
from rtpllm.layers.sm90_gemm import kernels, sm90_gemm, sm90_gemm_applies

M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
BACKENDS = ("cublas", "gemv", "sm90")
DEFAULT_TABLE = Path(__file__).with_name("gemm_dispatch.json")


@dataclass(frozen=True)
class GemmChoice:
    backend: str  # one of BACKENDS
    kernel: str = ""  # the sm90 kernel's name
    splits: int = 1  # sm90 only: 1, split-K factor, or 0 for stream-K
    swizzle: int = 1  # sm90 only: tile band width for L2 reuse


CUBLAS = GemmChoice("cublas")
GEMV = GemmChoice("gemv")
# What RTPLLM_GEMM=sm90 forces: a decode-shaped (swap-AB) and a prefill-shaped kernel.
FORCED_SM90_DECODE = GemmChoice("sm90", "swap_64x32x128_pingpong")
FORCED_SM90_PREFILL = GemmChoice("sm90", "tn_128x128x64_c1x2_pingpong")


def m_bucket(m: int) -> int:
    """The smallest bucket that holds m (the largest bucket for anything bigger)."""
    return M_BUCKETS[min(bisect.bisect_left(M_BUCKETS, m), len(M_BUCKETS) - 1)]


class GemmTable:
    """(dtype, n, k, M bucket) -> GemmChoice, loaded from the tuner's JSON and checked against the build."""

    def __init__(self, entries: dict[tuple[str, int, int, int], GemmChoice]):
        self.entries = entries

    @classmethod
    def load(cls, path: Path, built_kernels: Optional[set[str]] = None, device: Optional[str] = None) -> "GemmTable":
        """Entries measured on `device` (a CUDA device name); None or an unseen card: the first card's."""
        data = json.loads(Path(path).read_text())
        listed = data.get("entries", [])
        cards = list(dict.fromkeys(e.get("device", "") for e in listed))
        card = device if device in cards else (cards[0] if cards else "")
        entries = {}
        for i, e in enumerate(listed):
            if e.get("device", "") != card:
                continue
            choice = GemmChoice(e["backend"], e.get("kernel", ""), int(e.get("splits", 1)), int(e.get("swizzle", 1)))
            if choice.backend not in BACKENDS:
                raise ValueError(f"{path}: entries[{i}].backend: {choice.backend!r} is not one of {BACKENDS}")
            if choice.backend == "sm90" and built_kernels is not None and choice.kernel not in built_kernels:
                raise ValueError(f"{path}: entries[{i}].kernel: {choice.kernel!r} is not built "
                                 f"(built: {sorted(built_kernels)})")
            if int(e["m"]) not in M_BUCKETS:
                raise ValueError(f"{path}: entries[{i}].m: {e['m']} is not a bucket {M_BUCKETS}")
            entries[(e["dtype"], int(e["n"]), int(e["k"]), int(e["m"]))] = choice
        return cls(entries)

    def lookup(self, m: int, n: int, k: int, dtype: torch.dtype) -> Optional[GemmChoice]:
        return self.entries.get((str(dtype).removeprefix("torch."), n, k, m_bucket(m)))


@functools.cache
def _table() -> GemmTable:
    path = Path(os.environ.get("RTPLLM_GEMM_TABLE", DEFAULT_TABLE))
    if not path.exists():
        return GemmTable({})
    built = set(kernels()) if cuda_kernels_built() else None
    return GemmTable.load(path, built, torch.cuda.get_device_name() if torch.cuda.is_available() else None)


@functools.lru_cache(maxsize=4096)
def choose(m: int, n: int, k: int, dtype: torch.dtype) -> GemmChoice:
    """The table's choice for this shape (before checking the operands' alignment)."""
    forced = os.environ.get("RTPLLM_GEMM", "")
    if forced == "cublas":
        return CUBLAS
    if forced == "sm90":
        return FORCED_SM90_DECODE if m <= 64 else FORCED_SM90_PREFILL
    choice = _table().lookup(m, n, k, dtype)
    if choice is not None:
        return choice
    return GEMV if m <= 4 else CUBLAS


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear, with each GPU shape on the backend the table measured fastest."""
    if use_cuda_kernels(x) and x.dim() == 2:
        choice = choose(x.shape[0], weight.shape[0], weight.shape[1], x.dtype)
        if choice.backend == "sm90" and sm90_gemm_applies(x, weight) and _bias_ok(bias):
            return sm90_gemm(x, weight, bias, kernel=choice.kernel, splits=choice.splits, swizzle=choice.swizzle)
        if choice.backend == "gemv" and gemv_applies(x, weight):
            return gemv(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


def linear_silu_and_mul(x: torch.Tensor, gate_up: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """silu(x @ gate.T) * (x @ up.T) for gate_up [2 * d, k] stacked gate | up -> [m, d]."""
    if (use_cuda_kernels(x) and x.dim() == 2 and gemv_applies(x, gate_up)
            and choose(x.shape[0], gate_up.shape[0], gate_up.shape[1], x.dtype) == GEMV):
        return gemv_silu_and_mul(x, gate_up, bias)
    return silu_and_mul(linear(x, gate_up, bias))


def _bias_ok(bias: Optional[torch.Tensor]) -> bool:
    return bias is None or (bias.is_contiguous() and bias.data_ptr() % 16 == 0)

"""The CUTLASS Hopper GEMMs (cuda/gemm/sm90_gemm*) behind a checked wrapper.

    kernels()                            -> {name: Sm90Kernel}, the kernels this build holds
    sm90_gemm_applies(x, weight)         -> whether any of them can take these operands
    sm90_gemm(x, weight, bias=None, residual=None, *, kernel, splits=1, swizzle=1, out=None)
        y = x @ weight.T (+ bias) (+ residual), bias and residual added in the kernel's epilogue

Which kernel serves which shape is decided by python/rtpllm/layers/gemm_dispatch.py from a
measured table; this module only runs the one it is told to. Split-K and stream-K kernels keep
partial sums in one workspace per device, allocated on first use (outside any CUDA-graph capture:
the model runner's warm-up pass makes that first use) and shared by every launch on the stream.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from rtpllm.layers.cuda_dispatch import use_cuda_kernels
from rtpllm.layers.cuda_ops import kernel_ops, scalar_type

WORKSPACE_BYTES = 64 << 20
_workspaces: dict[torch.device, torch.Tensor] = {}


@dataclass(frozen=True)
class Sm90Kernel:
    id: int
    name: str
    swap_ab: bool  # computes y^T = w @ x^T: the weight's rows fill the wide MMA side (decode shapes)
    stream_k: bool  # takes splits != 1 (split-K, or 0 for stream-K)
    tile: tuple[int, int, int]


@functools.cache
def kernels() -> dict[str, Sm90Kernel]:
    return {k["name"]: Sm90Kernel(i, k["name"], k["swap_ab"], k["stream_k"], tuple(k["tile"]))
            for i, k in enumerate(kernel_ops().sm90_gemm_kernels())}


@functools.cache
def _is_sm90(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) == (9, 0)


def sm90_gemm_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """2-D 16-bit operands on a Hopper GPU with the 16-byte alignment TMA needs."""
    return (use_cuda_kernels(x) and x.dim() == 2 and weight.dim() == 2 and weight.dtype == x.dtype
            and _is_sm90(x.device.index or 0) and weight.is_contiguous() and x.stride(1) == 1
            and x.shape[1] == weight.shape[1] and weight.shape[0] % 8 == 0 and weight.shape[1] % 8 == 0
            and (x.shape[0] == 1 or x.stride(0) % 8 == 0)
            and x.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0)


def workspace(device: torch.device) -> torch.Tensor:
    buf = _workspaces.get(device)
    if buf is None:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("sm90_gemm: the split-K workspace must be allocated before a CUDA-graph capture; "
                               "run the captured shapes once eagerly first")
        buf = _workspaces[device] = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    return buf


def sm90_gemm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
              residual: Optional[torch.Tensor] = None, *, kernel: str, splits: int = 1, swizzle: int = 1,
              out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [m, k] @ weight [n, k].T (+ bias [n]) (+ residual [m, n]) -> [m, n] in x's dtype.

    splits: 1 (a CTA per output tile), > 1 (split-K) or 0 (stream-K; stream-K kernels only);
    swizzle: 1, 2, 4 or 8, the width of the tile band consecutive CTAs walk (L2 reuse)."""
    spec = kernels().get(kernel)
    if spec is None:
        raise ValueError(f"kernel: {kernel!r} is not built; built: {sorted(kernels())}")
    if not sm90_gemm_applies(x, weight):
        raise ValueError(f"x: sm90_gemm takes 2-D 16-bit CUDA operands on an sm90 GPU with matching dtypes, "
                         f"n and k multiples of 8 and 16-byte aligned rows; got x {tuple(x.shape)} {x.dtype} "
                         f"strides {x.stride()}, weight {tuple(weight.shape)} {weight.dtype}")
    if splits < 0 or (splits != 1 and not spec.stream_k):
        raise ValueError(f"splits: {kernel} takes only splits=1, got {splits}" if splits >= 0
                         else f"splits: must be >= 0, got {splits}")
    if swizzle not in (1, 2, 4, 8):
        raise ValueError(f"swizzle: must be 1, 2, 4 or 8, got {swizzle}")
    m, k = x.shape
    n = weight.shape[0]
    if bias is not None and (bias.shape != (n,) or bias.dtype != x.dtype or not bias.is_contiguous()
                             or bias.device != x.device or bias.data_ptr() % 16 != 0):
        raise ValueError(f"bias: expected a contiguous, 16-byte aligned [{n}] {x.dtype} tensor on {x.device}, "
                         f"got {tuple(bias.shape)} {bias.dtype}")
    if residual is not None and (residual.shape != (m, n) or residual.dtype != x.dtype or residual.stride(1) != 1
                                 or residual.device != x.device or residual.data_ptr() % 16 != 0
                                 or (m > 1 and residual.stride(0) % 8 != 0)):
        raise ValueError(f"residual: expected a [{m}, {n}] {x.dtype} tensor on {x.device} with 16-byte aligned "
                         f"rows, got {tuple(residual.shape)} {residual.dtype} strides {residual.stride()}")
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    elif (out.shape != (m, n) or out.dtype != x.dtype or out.stride(1) != 1 or out.data_ptr() % 16 != 0
          or (m > 1 and out.stride(0) % 8 != 0)):
        raise ValueError(f"out: expected a [{m}, {n}] {x.dtype} tensor with 16-byte aligned rows, "
                         f"got {tuple(out.shape)} {out.dtype} strides {out.stride()}")
    ws = workspace(x.device) if spec.stream_k else None
    ldx = x.stride(0) if m > 1 else k
    ldy = out.stride(0) if m > 1 else n
    ld_residual = (residual.stride(0) if m > 1 else n) if residual is not None else 0
    kernel_ops().sm90_gemm(
        spec.id, out.data_ptr(), x.data_ptr(), weight.data_ptr(), 0 if bias is None else bias.data_ptr(),
        0 if residual is None else residual.data_ptr(), m, n, k, ldx, ldy, ld_residual, splits, swizzle,
        0 if ws is None else ws.data_ptr(), 0 if ws is None else ws.numel(), scalar_type(x.dtype),
        torch.cuda.current_stream(x.device).cuda_stream)
    return out


def workspace_bytes_needed(x: torch.Tensor, weight: torch.Tensor, *, kernel: str, splits: int = 1) -> int:
    """What `sm90_gemm` would need of the workspace for these operands (benchmarks, the tuner)."""
    spec = kernels()[kernel]
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    return kernel_ops().sm90_gemm_workspace_size(spec.id, y.data_ptr(), x.data_ptr(), weight.data_ptr(), m, n, k,
                                                 x.stride(0) if m > 1 else k, n, splits, scalar_type(x.dtype))

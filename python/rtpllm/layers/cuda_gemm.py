"""The decode GEMV kernel (cuda/gemm/gemv.cu) behind a checked wrapper.

At decode batch sizes (a few rows of activations) a projection is one pass over its weight
matrix; the kernel streams it at close to copy bandwidth, where cuBLAS reaches ~70% of it.
Which shapes it serves is decided by gemm_dispatch.py.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from rtpllm.layers.cuda_dispatch import use_cuda_kernels
from rtpllm.layers.cuda_ops import kernel_ops, scalar_type


@functools.cache
def max_rows() -> int:
    return int(kernel_ops().GEMV_MAX_ROWS)


def gemv_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `gemv` serves x @ weight.T: few 16-bit rows on the GPU, 16-byte aligned rows."""
    return (use_cuda_kernels(x) and x.dim() == 2 and 1 <= x.shape[0] <= max_rows()
            and weight.dtype == x.dtype and weight.is_contiguous() and x.stride(1) == 1
            and x.shape[1] % 8 == 0 and x.stride(0) % 8 == 0
            and x.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0)


def _checked_rows(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], kernel: str,
                  weight_name: str) -> None:
    if not gemv_applies(x, weight):
        raise ValueError(f"x: {kernel} takes [1..{max_rows()}, k] 16-bit CUDA rows (k % 8 == 0, 16-byte aligned) "
                         f"matching {weight_name}'s dtype; got x {tuple(x.shape)} {x.dtype}, {weight_name} {weight.dtype}")
    rows, k = weight.shape
    if x.shape[1] != k:
        raise ValueError(f"x: has {x.shape[1]} columns, {weight_name} expects {k}")
    if bias is not None and (bias.shape != (rows,) or bias.dtype != x.dtype or not bias.is_contiguous()):
        raise ValueError(f"bias: expected a contiguous [{rows}] {x.dtype} tensor, got {tuple(bias.shape)} {bias.dtype}")


def _launch(kernel, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], n: int) -> torch.Tensor:
    y = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    kernel(y.data_ptr(), x.data_ptr(), weight.data_ptr(), 0 if bias is None else bias.data_ptr(), x.shape[0], n,
           weight.shape[1], x.stride(0), y.stride(0), scalar_type(x.dtype),
           torch.cuda.current_stream(x.device).cuda_stream)
    return y


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [m, k] @ weight[n, k].T (+ bias [n]) -> [m, n] in x's dtype; m <= max_rows()."""
    _checked_rows(x, weight, bias, "gemv", "weight")
    return _launch(kernel_ops().gemv, x, weight, bias, weight.shape[0])


def gemv_silu_and_mul(x: torch.Tensor, gate_up: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """silu(x @ gate.T) * (x @ up.T) in one pass, gate_up [2 * n, k] stacked gate | up -> [m, n].

    Rounds where gemv + silu_and_mul round, so the fused and unfused decode paths agree bit for bit.
    """
    _checked_rows(x, gate_up, bias, "gemv_silu_and_mul", "gate_up")
    if gate_up.shape[0] % 2 != 0:
        raise ValueError(f"gate_up: needs an even number of rows (gate then up), got {gate_up.shape[0]}")
    return _launch(kernel_ops().gemv_silu_and_mul, x, gate_up, bias, gate_up.shape[0] // 2)

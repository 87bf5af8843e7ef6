"""Whether a layer should call our CUDA kernels for a tensor, or stay on the torch path.

The kernels take 16-bit activations on a CUDA device and exist only in a `RTPLLM_CUDA=1`
build; everything else (the CPU reference, float32 on a GPU) runs the torch code.
"""

from __future__ import annotations

import functools

import torch

_KERNEL_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def cuda_kernels_built() -> bool:
    from rtpllm import _C

    return bool(getattr(_C, "has_cuda", False))


def use_cuda_kernels(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype in _KERNEL_DTYPES and cuda_kernels_built()

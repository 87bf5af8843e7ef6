"""Which device and precision the engine runs in."""

from __future__ import annotations

import torch

from rtpllm.layers.cuda_dispatch import cuda_kernels_built

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def cuda_kernels_available() -> bool:
    return cuda_kernels_built() and torch.cuda.is_available()


def resolve_device(device: str) -> torch.device:
    """`auto` is CUDA when a GPU is visible, else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was asked for but torch sees no CUDA device")
    return torch.device(device, 0) if device == "cuda" else torch.device("cpu")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is float32 on the CPU (the exact reference path) and bfloat16 on a GPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu" and dtype != "float32":
        raise ValueError(f"dtype: the CPU path runs in float32 only, got {dtype!r}")
    return _DTYPES[dtype]


def attention_backend_factory(device: torch.device, dtype: torch.dtype, block_size: int):
    """The CUDA kernels' backend on a GPU when they were built in; None (the torch reference) elsewhere."""
    if device.type != "cuda" or not cuda_kernels_available():
        return None
    from rtpllm.layers.cuda_attention import CudaAttentionBackend

    def make(arch):
        return CudaAttentionBackend(arch.num_heads, arch.num_kv_heads, arch.head_dim, block_size, dtype, device)

    return make

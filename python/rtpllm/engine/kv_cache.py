"""The paged KV pool: how many blocks fit, and the per-layer tensors that hold them."""

from __future__ import annotations

import numpy as np
import torch

from rtpllm.config import CacheConfig


def kv_bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                       dtype: torch.dtype) -> int:
    """K and V for every layer of one block."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * element


def num_blocks_for_device(cache: CacheConfig, bytes_per_block: int, device: torch.device,
                          peak_bytes_in_use: int = 0) -> int:
    """Blocks that fit in the budget: `num_blocks` if set, else `cpu_kv_cache_gib` on the CPU, else
    `gpu_memory_utilization` of the GPU's memory minus what the weights and a profiling pass
    (`peak_bytes_in_use`) took."""
    if cache.num_blocks is not None:
        return cache.num_blocks
    if device.type == "cuda":
        _, total = torch.cuda.mem_get_info(device)
        budget = int(total * cache.gpu_memory_utilization) - peak_bytes_in_use
        if budget < bytes_per_block:
            raise RuntimeError(
                f"gpu_memory_utilization: {cache.gpu_memory_utilization} of {total / 2**30:.1f} GiB leaves no "
                f"room for the KV cache after the model's {peak_bytes_in_use / 2**30:.1f} GiB; raise it")
    else:
        budget = int(cache.cpu_kv_cache_gib * 2**30)
    return max(1, budget // bytes_per_block)


def allocate_kv_caches(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                       head_dim: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """One tensor per layer, `[2, num_blocks, block_size, num_kv_heads, head_dim]` (K plane, V plane).

    Zero-filled: attention masks slots past a sequence's length, but a masked 0 * NaN would still
    poison the reference path's matmul, so never hand out uninitialized memory.
    """
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    if device.type == "cpu":
        return [_lazily_zeroed(shape, dtype) for _ in range(num_layers)]
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]


def _lazily_zeroed(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Zeros on the host that cost nothing until touched: numpy's calloc maps fresh zero pages,
    where torch.zeros writes every byte of the pool at start-up (seconds for a few GiB)."""
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)

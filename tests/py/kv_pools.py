"""KV pools shaped like the model runner's (one tensor per layer, [2, num_blocks, block_size,
num_kv_heads, head_dim]: K plane, then V plane) and their registration as an _C.KVLayout, for the
kvstore tests (CPU here, CUDA in tests/gpu)."""

from __future__ import annotations

import torch

from rtpllm import _C


def make_pool(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
              dtype: torch.dtype = torch.bfloat16, device: str = "cpu") -> list[torch.Tensor]:
    return [torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, device=device).to(dtype)
            for _ in range(num_layers)]


def layout_of(pool: list[torch.Tensor]) -> _C.KVLayout:
    """The C++ view of the pool: addresses only; the tensors stay the owners and must outlive it."""
    first = pool[0]
    _, num_blocks, block_size, num_kv_heads, head_dim = first.shape
    return _C.KVLayout(memory=_C.MemoryKind.CUDA if first.is_cuda else _C.MemoryKind.HOST,
                       device_index=first.device.index or 0, num_blocks=num_blocks, block_size=block_size,
                       num_kv_heads=num_kv_heads, head_dim=head_dim, element_bytes=first.element_size(),
                       block_stride_bytes=first.stride(1) * first.element_size(),
                       layers=[_C.KVLayerAddress(t[0].data_ptr(), t[1].data_ptr()) for t in pool])

def block_of(pool: list[torch.Tensor], block: int) -> torch.Tensor:
    """All K and V of one block, layer-major, K then V: the host tiers' byte order."""
    return torch.stack([t[kv, block] for t in pool for kv in (0, 1)])

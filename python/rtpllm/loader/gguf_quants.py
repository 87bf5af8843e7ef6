"""Vectorized torch dequantizers for the GGUF (ggml) tensor types we load.

Each quantized type packs 32 consecutive values of a row into one fixed-size block:
    Q8_0  (34 bytes): float16 scale d, 32 x int8 q          -> d * q
    Q4_0  (18 bytes): float16 scale d, 16 bytes of nibbles  -> d * (q - 8)
    Q4_1  (20 bytes): float16 scale d, float16 min m, 16 bytes of nibbles -> d * q + m
In the nibble bytes, byte i holds value i in its low 4 bits and value i + 16 in its high 4 bits.
The work runs on whatever device the raw bytes are on, so a GPU load dequantizes on the GPU; on
the CPU the C++ decoder (`_C.loader.dequantize_gguf`) does it in one pass over threads instead.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import torch
from gguf import GGMLQuantizationType

from rtpllm import _C

_BLOCK_VALUES = 32


def _blocks(raw: torch.Tensor, block_bytes: int) -> torch.Tensor:
    return raw.reshape(-1, block_bytes)


def _scale(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """float16 stored at byte `start` of each block, as float32 [num_blocks, 1]."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[num_blocks, 16] bytes -> [num_blocks, 32] values 0..15 in element order."""
    return torch.cat([packed & 0x0F, packed >> 4], dim=1)


def _dequantize_q8_0(raw: torch.Tensor) -> torch.Tensor:
    blocks = _blocks(raw, 34)
    return _scale(blocks, 0) * blocks[:, 2:].contiguous().view(torch.int8).float()


def _dequantize_q4_0(raw: torch.Tensor) -> torch.Tensor:
    blocks = _blocks(raw, 18)
    return _scale(blocks, 0) * (_nibbles(blocks[:, 2:]).to(torch.int8) - 8).float()


def _dequantize_q4_1(raw: torch.Tensor) -> torch.Tensor:
    blocks = _blocks(raw, 20)
    return _scale(blocks, 0) * _nibbles(blocks[:, 4:]).float() + _scale(blocks, 2)


_DEQUANTIZERS: dict[GGMLQuantizationType, tuple[int, int, Callable[[torch.Tensor], torch.Tensor]]] = {
    # type: (values per block, bytes per block, raw uint8 -> float32 values)
    GGMLQuantizationType.F32: (1, 4, lambda raw: raw.view(torch.float32)),
    GGMLQuantizationType.F16: (1, 2, lambda raw: raw.view(torch.float16).float()),
    GGMLQuantizationType.BF16: (1, 2, lambda raw: raw.view(torch.bfloat16).float()),
    GGMLQuantizationType.Q8_0: (_BLOCK_VALUES, 34, _dequantize_q8_0),
    GGMLQuantizationType.Q4_0: (_BLOCK_VALUES, 18, _dequantize_q4_0),
    GGMLQuantizationType.Q4_1: (_BLOCK_VALUES, 20, _dequantize_q4_1),
}
SUPPORTED_TYPES = tuple(_DEQUANTIZERS)
HOST_THREADS = min(8, os.cpu_count() or 1)


def dequantize(raw: torch.Tensor, qtype: GGMLQuantizationType, shape: Sequence[int],
               name: str = "tensor", host_decoder: bool = True) -> torch.Tensor:
    """Raw GGUF bytes (a uint8 tensor, any shape, contiguous) -> float32 tensor of `shape`
    (row-major, as Hugging Face lays out the weight). Raises ValueError naming `name` for an
    unsupported type or a byte count that does not fit the shape. Bytes on the host go through the
    C++ decoder unless `host_decoder=False` (tests compare it with the tensor-op path devices use)."""
    if qtype not in _DEQUANTIZERS:
        supported = ", ".join(t.name for t in SUPPORTED_TYPES)
        raise ValueError(f"GGUF tensor {name}: type {_type_name(qtype)} is not supported (supported: {supported})")
    values_per_block, bytes_per_block, decode = _DEQUANTIZERS[qtype]
    num_values = 1
    for dim in shape:
        num_values *= dim
    if raw.dtype != torch.uint8:
        raise ValueError(f"GGUF tensor {name}: expected raw bytes (uint8), got {raw.dtype}")
    if num_values % values_per_block or raw.numel() != num_values // values_per_block * bytes_per_block:
        raise ValueError(f"GGUF tensor {name}: {raw.numel()} bytes do not hold a {_type_name(qtype)} tensor of "
                         f"shape {tuple(shape)} (the file is corrupt or truncated)")
    raw = raw.contiguous().reshape(-1)
    if raw.device.type == "cpu" and host_decoder:
        out = torch.empty(num_values, dtype=torch.float32)
        _C.loader.dequantize_gguf(int(qtype), raw.data_ptr(), raw.numel(), out.data_ptr(), num_values, HOST_THREADS)
        return out.reshape(tuple(shape))
    return decode(raw).reshape(tuple(shape))


def _type_name(qtype: object) -> str:
    return getattr(qtype, "name", str(qtype))

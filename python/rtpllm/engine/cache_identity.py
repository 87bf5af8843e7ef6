"""The cache identity: the root of the block-hash chain (`CacheOptions.root_hash`).

KV copied out of the GPU pool (host memory, disk, later a remote store or a prefill peer) is
keyed by block hash, and a block's hash chains every earlier block's back to this root. So the
root must change whenever the same token ids would produce different KV bytes: other weights,
another dtype, block size or KV layout. Two models (or two configurations of one model) that
share a disk directory then never read each other's blocks.

The weights' identity is read cheaply, never the whole checkpoint: for a Hugging Face folder,
config.json and, per safetensors file, its name, size, JSON header and a few sampled 4 KiB
windows of its tensor data (fine-tunes of one architecture share headers byte for byte; their
weights differ everywhere); for a GGUF file, its size, leading metadata and the same samples.
"""

from __future__ import annotations

import hashlib
import os
import struct
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:  # the server imports this (pd/engine_side.py) and needs no torch
    import torch

_FORMAT_VERSION = b"rtpllm-kv-cache-identity-v1"
_SAMPLES_PER_FILE = 16
_SAMPLE_BYTES = 4096
_GGUF_HEAD_BYTES = 1 << 20  # header, metadata and (usually) the tensor infos


def cache_identity(model_path: str, *, kv_dtype: torch.dtype, block_size: int, num_layers: int,
                   num_kv_heads: int, head_dim: int) -> int:
    """A non-zero 64-bit root hash for this model's KV cache in this configuration."""
    h = hashlib.blake2b(digest_size=8)
    h.update(_FORMAT_VERSION)
    for file_path in _weight_files(model_path):
        _absorb_file(h, file_path)
    # The KV layout every tier stores: what one block's bytes mean.
    h.update(f"|dtype={kv_dtype}|block_size={block_size}|layers={num_layers}|kv_heads={num_kv_heads}"
             f"|head_dim={head_dim}|planes=K,V".encode())
    root = int.from_bytes(h.digest(), "little")
    return root or 1  # 0 is the "no identity" root


def _weight_files(model_path: str) -> list[str]:
    if os.path.isfile(model_path):
        return [model_path]
    names = sorted(n for n in os.listdir(model_path) if n.endswith(".safetensors") or n == "config.json")
    return [os.path.join(model_path, n) for n in names]


def _absorb_file(h: "hashlib._Hash", path: str) -> None:
    size = os.path.getsize(path)
    h.update(f"|{os.path.basename(path)}|{size}|".encode())
    with open(path, "rb") as f:
        if path.endswith(".json"):
            h.update(f.read())
            return
        if path.endswith(".safetensors") and size >= 8:
            (header_len,) = struct.unpack("<Q", f.read(8))
            head = min(header_len, size - 8)
        else:  # GGUF (or anything else): its leading bytes carry the metadata
            f.seek(0)
            head = min(size, _GGUF_HEAD_BYTES) - f.tell()
        h.update(f.read(head))
        for offset in _sample_offsets(f.tell(), size):
            f.seek(offset)
            h.update(f.read(_SAMPLE_BYTES))


def _sample_offsets(start: int, size: int) -> Iterable[int]:
    span = size - start
    if span <= 0:
        return []
    if span <= _SAMPLES_PER_FILE * _SAMPLE_BYTES:
        return range(start, size, _SAMPLE_BYTES)
    step = (span - _SAMPLE_BYTES) // (_SAMPLES_PER_FILE - 1)
    return [start + i * step for i in range(_SAMPLES_PER_FILE)]

"""The header of a GGUF file (llama.cpp format, versions 2 and 3): metadata and tensor directory.

The `gguf` package's reader builds a numpy view per string of the metadata: for a 49k-token
vocabulary with its merges, two seconds and more of start-up on a small machine. This parser reads
the header once into memory and walks it with `struct`: the large arrays the loader does not need
(merges, token types, scores) are skipped by their lengths, never decoded.

Layout (little-endian): magic "GGUF", u32 version, u64 tensor count, u64 metadata count; each
metadata entry is a string key, a u32 value type and the value (a string is a u64 length and
UTF-8 bytes; an array is a u32 element type, a u64 count and the elements); each tensor entry is
a string name, u32 dimension count, u64 dimensions (fastest first), u32 ggml type and a u64 offset
relative to the data section, which starts at the next multiple of `general.alignment` (32).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any, Iterable

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
# First read; a header that does not fit (a big vocabulary) is read whole on the second try.
_FIRST_READ_BYTES = 8 << 20

# GGUF value types -> struct format of a scalar (strings and arrays are handled apart).
_STRING, _ARRAY = 8, 9
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # row-major (Hugging Face order): the reverse of ggml's dimensions
    tensor_type: GGMLQuantizationType
    data_offset: int  # absolute offset in the file
    n_bytes: int


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict[str, Any]  # every key except the skipped ones; arrays as lists
    tensors: dict[str, GGUFTensorInfo]  # in file order


class _Truncated(Exception):
    pass


def read_gguf_header(path: str, skip: Iterable[str] = ()) -> GGUFHeader:
    """Parses the header of `path`. Metadata keys in `skip` are stepped over, not decoded.
    Raises FileNotFoundError for a missing file and ValueError naming the file (and the key or
    tensor) for a file that is not GGUF, is truncated, or describes tensors past its end."""
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name}: not found at {path}")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        data = f.read(_FIRST_READ_BYTES)
        try:
            return _parse(data, size, frozenset(skip), name)
        except _Truncated:
            if len(data) == size:
                raise ValueError(f"{name}: not a valid GGUF file (truncated header)") from None
            f.seek(0)
            data = f.read()
        try:
            return _parse(data, size, frozenset(skip), name)
        except _Truncated:
            raise ValueError(f"{name}: not a valid GGUF file (truncated header)") from None


def _parse(data: bytes, file_size: int, skip: frozenset, name: str) -> GGUFHeader:
    cursor = _Cursor(data)
    if cursor.take(4) != _MAGIC:
        raise ValueError(f"{name}: not a valid GGUF file (no GGUF magic)")
    version = cursor.scalar("I")
    if version not in (2, 3):
        raise ValueError(f"{name}: not a valid GGUF file (version {version}; 2 and 3 are supported)")
    num_tensors, num_keys = cursor.scalar("Q"), cursor.scalar("Q")
    if num_tensors > file_size or num_keys > file_size:
        raise ValueError(f"{name}: not a valid GGUF file (counts past the file's size)")
    metadata: dict[str, Any] = {}
    for _ in range(num_keys):
        key = cursor.string()
        value_type = cursor.scalar("I")
        try:
            value = cursor.value(value_type, decode=key not in skip)
        except ValueError as e:
            raise ValueError(f"{name}: not a valid GGUF file (metadata key {key!r}: {e})") from None
        if key not in skip:
            metadata[key] = value
    entries = []
    for _ in range(num_tensors):
        tensor_name = cursor.string()
        num_dims = cursor.scalar("I")
        if num_dims > 8:
            raise ValueError(f"{name}: not a valid GGUF file (tensor {tensor_name} has {num_dims} dimensions)")
        dims = struct.unpack_from(f"<{num_dims}Q", data, cursor.skip(8 * num_dims))
        type_id, offset = cursor.scalar("I"), cursor.scalar("Q")
        entries.append((tensor_name, dims, type_id, offset))
    alignment = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT)) or _DEFAULT_ALIGNMENT
    data_start = -(-cursor.position // alignment) * alignment
    tensors = {}
    for tensor_name, dims, type_id, offset in entries:
        try:
            tensor_type = GGMLQuantizationType(type_id)
        except ValueError:
            raise ValueError(f"{name}: tensor {tensor_name} has unknown ggml type {type_id}") from None
        block_values, block_bytes = GGML_QUANT_SIZES[tensor_type]
        num_values = 1
        for dim in dims:
            num_values *= dim
        n_bytes = num_values // block_values * block_bytes
        start = data_start + offset
        if start + n_bytes > file_size:
            raise ValueError(f"{name}: not a valid GGUF file (tensor {tensor_name} lies past its end: bytes "
                             f"{start}..{start + n_bytes} of {file_size}; truncated or corrupt)")
        tensors[tensor_name] = GGUFTensorInfo(tensor_name, tuple(reversed(dims)), tensor_type, start, n_bytes)
    return GGUFHeader(version, metadata, tensors)


class _Cursor:
    def __init__(self, data: bytes):
        self.data = data
        self.position = 0

    def skip(self, n: int) -> int:
        """Advances by `n` bytes; returns where they start."""
        start = self.position
        if start + n > len(self.data):
            raise _Truncated()
        self.position = start + n
        return start

    def take(self, n: int) -> bytes:
        start = self.skip(n)
        return self.data[start:start + n]

    def scalar(self, fmt: str):
        return struct.unpack_from("<" + fmt, self.data, self.skip(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.scalar("Q")).decode("utf-8", errors="replace")

    def value(self, value_type: int, decode: bool) -> Any:
        if value_type in _SCALARS:
            return self.scalar(_SCALARS[value_type])
        if value_type == _STRING:
            return self.string() if decode else self.skip(self.scalar("Q"))
        if value_type == _ARRAY:
            item_type, count = self.scalar("I"), self.scalar("Q")
            if item_type in _SCALARS:
                fmt = _SCALARS[item_type]
                start = self.skip(count * struct.calcsize(fmt))
                return list(struct.unpack_from(f"<{count}{fmt}", self.data, start)) if decode else None
            if item_type == _STRING:
                if not decode:
                    for _ in range(count):
                        self.skip(self.scalar("Q"))
                    return None
                return [self.string() for _ in range(count)]
            if item_type == _ARRAY:
                return [self.value(_ARRAY, decode) for _ in range(count)]
            raise ValueError(f"unknown array element type {item_type}")
        raise ValueError(f"unknown value type {value_type}")

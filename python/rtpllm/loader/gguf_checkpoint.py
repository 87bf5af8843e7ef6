"""Reading a GGUF file (llama.cpp format): metadata, architecture and tensor directory with our
header parser (gguf_header.py), the tensors' bytes with the C++ reader (straight to the device, in
file order), dequantized there with our own kernels; the tokenizer is stored in the metadata."""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator, Optional, Union

import torch

from rtpllm.loader.gguf_header import read_gguf_header
from rtpllm.loader.gguf_names import PERMUTED_QK_ARCHITECTURES, ROPE_FREQS_NAME, hf_name, unpermute_qk
from rtpllm import _C
from rtpllm.loader.gguf_quants import HOST_THREADS, dequantize
from rtpllm.loader.reader import LoaderSettings, read_file_ranges
from rtpllm.models.llama_arch import LlamaArch

# Raw tensor bytes are read and dequantized in batches of about this many bytes (bounds the memory
# held by raw copies on the device).
_READ_BATCH_BYTES = 1 << 30
# Metadata that only transformers' tokenizer builder needs; large arrays, not decoded here.
_SKIPPED_METADATA = ("tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")


class GGUFCheckpoint:
    def __init__(self, path: str):
        self.path = path
        self.name = os.path.basename(path)
        header = read_gguf_header(path, skip=_SKIPPED_METADATA)
        self.metadata = header.metadata
        self.tensors = header.tensors
        self.gguf_architecture = self.metadata.get("general.architecture")

    @property
    def total_bytes(self) -> int:
        return sum(tensor.n_bytes for tensor in self.tensors.values())

    def arch(self) -> LlamaArch:
        freq_factors = None
        if ROPE_FREQS_NAME in self.tensors:
            freq_factors = self._dequantized(ROPE_FREQS_NAME, torch.device("cpu")).tolist()
        return LlamaArch.from_gguf_metadata(self.metadata, self.tensors.keys(), freq_factors, source=self.name)

    def generation_config(self, arch: LlamaArch) -> dict:
        """bos/pad ids from the metadata; eos_token_id is every id that ends generation (see
        LlamaArch.from_gguf_metadata), an int when there is one, as in generation_config.json."""
        config = {}
        for key, name in (("bos_token_id", "bos_token_id"), ("padding_token_id", "pad_token_id")):
            value = self.metadata.get(f"tokenizer.ggml.{key}")
            if value is not None:
                config[name] = int(value)
        if arch.eos_token_ids:
            eos = list(arch.eos_token_ids)
            config["eos_token_id"] = eos[0] if len(eos) == 1 else eos
        return config

    def weights(self, arch: LlamaArch, device: Union[str, torch.device],
                settings: LoaderSettings = LoaderSettings()) -> Iterator[tuple[str, torch.Tensor]]:
        """(Hugging Face name, float32 tensor on `device`) for every weight, dequantized on `device`."""
        unpermute = self.gguf_architecture in PERMUTED_QK_ARCHITECTURES
        device = torch.device(device)
        names = [name for name in self.tensors if name != ROPE_FREQS_NAME]
        for batch in _batches(names, lambda name: int(self.tensors[name].n_bytes)):
            raw = self._read_raw(batch, device, settings)
            for gguf_name, tensor_bytes in zip(batch, raw):
                name = hf_name(gguf_name)
                tensor = self._dequantize(gguf_name, tensor_bytes)
                if unpermute and ".self_attn.q_proj." in name:
                    tensor = unpermute_qk(tensor, arch.num_heads)
                elif unpermute and ".self_attn.k_proj." in name:
                    tensor = unpermute_qk(tensor, arch.num_kv_heads)
                yield name, tensor

    def load_into(self, arch: LlamaArch, destination_of: Callable[[str], Optional[torch.Tensor]],
                  settings: LoaderSettings = LoaderSettings()) -> set[str]:
        """Dequantizes every weight straight into the host float32 tensor `destination_of(hf_name)`
        gives (None: skip it), q/k rows un-permuted on the way: no float32 copy of the model in
        between. Returns the Hugging Face names loaded; raises ValueError naming the tensor for a
        shape mismatch. For host float32 models only (devices go through `weights`)."""
        unpermute = self.gguf_architecture in PERMUTED_QK_ARCHITECTURES
        names = [name for name in self.tensors if name != ROPE_FREQS_NAME]
        loaded = set()
        for batch in _batches(names, lambda name: int(self.tensors[name].n_bytes)):
            raw = self._read_raw(batch, torch.device("cpu"), settings)
            for gguf_name, tensor_bytes in zip(batch, raw):
                name = hf_name(gguf_name)
                destination = destination_of(name)
                if destination is None:
                    continue
                info = self.tensors[gguf_name]
                if tuple(destination.shape) != info.shape:
                    raise ValueError(f"{name}: checkpoint shape {info.shape} does not match the model's "
                                     f"{tuple(destination.shape)} (GGUF tensor {gguf_name} in {self.name})")
                heads = None
                if unpermute and ".self_attn.q_proj." in name:
                    heads = arch.num_heads
                elif unpermute and ".self_attn.k_proj." in name:
                    heads = arch.num_kv_heads
                self._decode_into(gguf_name, tensor_bytes, destination, heads)
                loaded.add(name)
        return loaded

    def _decode_into(self, gguf_name: str, raw: torch.Tensor, destination: torch.Tensor, heads: Optional[int]) -> None:
        info = self.tensors[gguf_name]
        direct = (destination.device.type == "cpu" and destination.dtype == torch.float32
                  and destination.is_contiguous() and _C.loader.gguf_type_supported(int(info.tensor_type)))
        if not direct:
            tensor = self._dequantize(gguf_name, raw)
            destination.copy_(unpermute_qk(tensor, heads) if heads is not None else tensor)
            return
        row_values = destination[0].numel() if destination.dim() > 0 else 1
        order = _unpermute_row_order(destination.shape[0], heads) if heads is not None else None
        try:
            _C.loader.dequantize_gguf(int(info.tensor_type), raw.data_ptr(), raw.numel(), destination.data_ptr(),
                                      destination.numel(), HOST_THREADS, row_order=order,
                                      row_values=row_values if order is not None else 0)
        except ValueError as e:
            raise ValueError(f"GGUF tensor {gguf_name}: {e} (the file is corrupt or truncated)") from None

    def _read_raw(self, names: list[str], device: torch.device, settings: LoaderSettings) -> list[torch.Tensor]:
        ranges = [(int(self.tensors[n].data_offset), int(self.tensors[n].n_bytes)) for n in names]
        try:
            return read_file_ranges(self.path, ranges, device, settings)
        except ValueError as e:
            raise ValueError(f"{self.name}: tensor data out of the file's bounds ({e})") from None

    def _dequantize(self, gguf_name: str, raw: torch.Tensor) -> torch.Tensor:
        tensor = self.tensors[gguf_name]
        return dequantize(raw, tensor.tensor_type, tensor.shape, gguf_name)

    def _dequantized(self, gguf_name: str, device: torch.device) -> torch.Tensor:
        return self._dequantize(gguf_name, self._read_raw([gguf_name], device, LoaderSettings(progress=False))[0])


def _unpermute_row_order(rows: int, heads: int) -> list[int]:
    """Where each stored q/k row goes: llama.cpp stores row (head, i, half) of a head's
    (half, i) grid (see gguf_names.unpermute_qk)."""
    head_dim = rows // heads
    half = head_dim // 2
    return [head * head_dim + (row % 2) * half + row // 2 for head in range(heads) for row in range(head_dim)]


def _batches(names: list[str], nbytes) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for name in names:
        if batch and size + nbytes(name) > _READ_BATCH_BYTES:
            yield batch
            batch, size = [], 0
        batch.append(name)
        size += nbytes(name)
    if batch:
        yield batch

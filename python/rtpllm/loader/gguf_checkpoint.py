"""Reading a GGUF file (llama.cpp format): metadata, architecture and tensor directory with the
`gguf` package, the tensors' bytes with the C++ reader (straight to the device, in file order),
dequantized there with our own kernels; the tokenizer is stored in the metadata."""

from __future__ import annotations

import os
from typing import Any, Iterator, Union

import torch
from gguf import GGUFReader

from rtpllm.loader.gguf_names import PERMUTED_QK_ARCHITECTURES, ROPE_FREQS_NAME, hf_name, unpermute_qk
from rtpllm.loader.gguf_quants import dequantize
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
        try:
            self.reader = GGUFReader(path)
        except Exception as e:  # the reader raises bare ValueError/struct/numpy errors on bad bytes
            raise ValueError(f"{self.name}: not a valid GGUF file ({type(e).__name__}: {e})") from None
        self.metadata = self._read_metadata()
        self.tensors = {tensor.name: tensor for tensor in self.reader.tensors}
        self.gguf_architecture = self.metadata.get("general.architecture")

    def _read_metadata(self) -> dict[str, Any]:
        metadata = {}
        for key, field in self.reader.fields.items():
            if key.startswith("GGUF.") or key in _SKIPPED_METADATA:
                continue
            try:
                metadata[key] = field.contents()
            except Exception as e:
                raise ValueError(f"{self.name}: metadata key {key!r} is unreadable ({e})") from None
        return metadata

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

    def _read_raw(self, names: list[str], device: torch.device, settings: LoaderSettings) -> list[torch.Tensor]:
        ranges = [(int(self.tensors[n].data_offset), int(self.tensors[n].n_bytes)) for n in names]
        try:
            return read_file_ranges(self.path, ranges, device, settings)
        except ValueError as e:
            raise ValueError(f"{self.name}: tensor data out of the file's bounds ({e})") from None

    def _dequantize(self, gguf_name: str, raw: torch.Tensor) -> torch.Tensor:
        tensor = self.tensors[gguf_name]
        # ggml lists dimensions fastest-first; the row-major (Hugging Face) shape is the reverse.
        shape = [int(dim) for dim in reversed(tensor.shape.tolist())]
        return dequantize(raw, tensor.tensor_type, shape, gguf_name)

    def _dequantized(self, gguf_name: str, device: torch.device) -> torch.Tensor:
        return self._dequantize(gguf_name, self._read_raw([gguf_name], device, LoaderSettings(progress=False))[0])


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

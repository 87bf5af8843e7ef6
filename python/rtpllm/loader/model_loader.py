"""`load_model_and_tokenizer`: a Hugging Face folder or a GGUF file -> a ready model + tokenizer."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Union

import torch
from transformers import AutoTokenizer

from rtpllm.distributed.tp_group import TPGroup
from rtpllm.layers.attention_metadata import AttentionBackend
from rtpllm.loader.gguf_checkpoint import GGUFCheckpoint
from rtpllm.loader.gguf_tokenizer import load_gguf_tokenizer
from rtpllm.loader.hf_checkpoint import (CONFIG_FILE, check_tokenizer_files, iter_safetensors, read_generation_config,
                                         read_json, safetensors_files)
from rtpllm.models.llama import LlamaForCausalLM
from rtpllm.models.llama_arch import LlamaArch
from rtpllm.models.llama_shards import llama_tensor_shard

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class LoadedModel:
    model: LlamaForCausalLM  # weights loaded, in eval mode, on the requested device and dtype
    arch: LlamaArch
    tokenizer: Any  # a transformers fast tokenizer, chat template included when the model has one
    generation_config: dict  # generation_config.json, or the GGUF's bos/eos/pad ids; {} when absent


def load_model_and_tokenizer(path: str, dtype: torch.dtype = torch.float32,
                             device: Union[str, torch.device] = "cpu",
                             attn_backend: Optional[AttentionBackend] = None,
                             tokenizer_path: Optional[str] = None,
                             attn_backend_factory: Optional[Callable[[LlamaArch], AttentionBackend]] = None,
                             tensor_parallel: Optional[TPGroup] = None) -> LoadedModel:
    """Loads a Hugging Face model folder (config.json + safetensors) or a `.gguf` file.

    `attn_backend` defaults to the torch reference backend; `attn_backend_factory`, when given, builds
    one from the checkpoint's architecture instead (kernels need head counts before the weights load);
    `tokenizer_path` overrides where the tokenizer comes from (a folder `AutoTokenizer` reads).
    With `tensor_parallel`, the model is this rank's shard, and safetensors files are read only
    where the rank's slices lie (a GGUF file is dequantized whole, then sliced).
    Raises FileNotFoundError for a missing path or file and ValueError for a corrupt file or an
    unsupported model, naming the problem.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: must be one of {_DTYPES}, got {dtype!r}")
    device = torch.device(device)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model: {path} does not exist")
    if attn_backend is not None and attn_backend_factory is not None:
        raise ValueError("attn_backend: give either a backend or a factory, not both")

    def backend_for(arch: LlamaArch) -> Optional[AttentionBackend]:
        return attn_backend if attn_backend_factory is None else attn_backend_factory(arch)

    if os.path.isdir(path):
        loaded = _load_hf_folder(path, dtype, device, backend_for, tensor_parallel)
    elif path.endswith(".gguf"):
        loaded = _load_gguf(path, dtype, device, backend_for, tensor_parallel)
    else:
        raise ValueError(f"model: {path} is neither a Hugging Face model folder nor a .gguf file")
    if tokenizer_path is not None:
        loaded.tokenizer = _load_tokenizer(tokenizer_path)
    return loaded


BackendFor = Callable[[LlamaArch], Optional[AttentionBackend]]


def _load_hf_folder(folder: str, dtype: torch.dtype, device: torch.device, backend_for: BackendFor,
                    tp: Optional[TPGroup] = None) -> LoadedModel:
    arch = LlamaArch.from_hf_config(read_json(os.path.join(folder, CONFIG_FILE)), source=CONFIG_FILE)
    files = safetensors_files(folder)
    generation_config = read_generation_config(folder)
    check_tokenizer_files(folder)
    shard_of = None if tp is None else (lambda name: llama_tensor_shard(name, arch, tp.rank, tp.world_size))
    model = build_model(arch, dtype, device, iter_safetensors(files, shard_of), backend_for(arch), tp)
    return LoadedModel(model, arch, _load_tokenizer(folder), generation_config)


def _load_gguf(path: str, dtype: torch.dtype, device: torch.device, backend_for: BackendFor,
               tp: Optional[TPGroup] = None) -> LoadedModel:
    checkpoint = GGUFCheckpoint(path)
    arch = checkpoint.arch()
    model = build_model(arch, dtype, device, checkpoint.weights(arch, device), backend_for(arch), tp)
    try:
        tokenizer = load_gguf_tokenizer(path)
    except Exception as e:
        raise ValueError(f"{checkpoint.name}: cannot build the tokenizer from the GGUF metadata "
                         f"({type(e).__name__}: {e})") from None
    return LoadedModel(model, arch, tokenizer, checkpoint.generation_config(arch))


def build_model(arch: LlamaArch, dtype: torch.dtype, device: torch.device,
                weights: Iterable[tuple[str, torch.Tensor]],
                attn_backend: Optional[AttentionBackend] = None, tp: Optional[TPGroup] = None) -> LlamaForCausalLM:
    """Creates the model directly on `device` in `dtype` (no host copy of the weights, no
    throwaway initialization) and copies the checkpoint tensors in."""
    with torch.device(device):
        model = LlamaForCausalLM(arch, attn_backend=attn_backend, dtype=dtype, tp=tp)
    model.load_weights(weights)
    return model.eval()


def _load_tokenizer(folder: str):
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"tokenizer: {folder} does not exist")
    check_tokenizer_files(folder)
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        raise ValueError(f"tokenizer: cannot load the tokenizer in {folder} ({type(e).__name__}: {e})") from None

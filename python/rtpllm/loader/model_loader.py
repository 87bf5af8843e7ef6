"""`load_model_and_tokenizer`: a Hugging Face folder or a GGUF file -> a ready model + tokenizer."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Union

import torch

from rtpllm.config import LOAD_FORMATS
from rtpllm.distributed.tp_group import TPGroup
from rtpllm.engine.startup_phases import StartupPhases
from rtpllm.layers.attention_metadata import AttentionBackend
from rtpllm.loader.hf_checkpoint import (CONFIG_FILE, check_tokenizer_files, read_generation_config,
                                         read_json, read_weight_map, safetensors_files)
from rtpllm.loader.safetensors_loader import LoaderSettings, SafetensorsCheckpoint, load_into_model
from rtpllm.loader.tokenizer_loader import load_folder_tokenizer
from rtpllm.models.llama import LlamaForCausalLM
from rtpllm.models.llama_arch import LlamaArch

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Dummy weights: uniform in [-x, x], small enough that activations stay finite (vLLM's choice).
_DUMMY_RANGE = 1e-3


@dataclass
class LoadedModel:
    model: LlamaForCausalLM  # weights loaded, in eval mode, on the requested device and dtype
    arch: LlamaArch
    tokenizer: Any  # a transformers fast tokenizer, chat template included when the model has one (None: not loaded)
    generation_config: dict  # generation_config.json, or the GGUF's bos/eos/pad ids; {} when absent
    # Where the load's time went (config, model build, weights, tokenizer on its thread, ...).
    phases: StartupPhases = field(default_factory=lambda: StartupPhases("load"))


def load_model_and_tokenizer(path: str, dtype: torch.dtype = torch.float32,
                             device: Union[str, torch.device] = "cpu",
                             attn_backend: Optional[AttentionBackend] = None,
                             tokenizer_path: Optional[str] = None,
                             attn_backend_factory: Optional[Callable[[LlamaArch], AttentionBackend]] = None,
                             load_format: str = "auto", loader_settings: LoaderSettings = LoaderSettings(),
                             tensor_parallel: Optional[TPGroup] = None, load_tokenizer: bool = True) -> LoadedModel:
    """Loads a Hugging Face model folder (config.json + safetensors) or a `.gguf` file.

    `attn_backend` defaults to the torch reference backend; `attn_backend_factory`, when given, builds
    one from the checkpoint's architecture instead (kernels need head counts before the weights load);
    `tokenizer_path` overrides where the tokenizer comes from (a folder `AutoTokenizer` reads).
    `load_format="dummy"` reads the architecture and tokenizer but no weights: parameters get small
    random values (for benchmarks of everything but the weights).
    With `tensor_parallel`, the model is this rank's shard, and safetensors files are read only
    where the rank's slices lie (a GGUF file is dequantized whole, then sliced).
    Without `load_tokenizer`, `LoadedModel.tokenizer` is None (the engine loads its own when it
    needs one: loader/lazy_tokenizer.py).
    Raises FileNotFoundError for a missing path or file and ValueError for a corrupt file or an
    unsupported model, naming the problem.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: must be one of {_DTYPES}, got {dtype!r}")
    device = torch.device(device)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model: {path} does not exist")
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format: must be one of {LOAD_FORMATS}, got {load_format!r}")
    if attn_backend is not None and attn_backend_factory is not None:
        raise ValueError("attn_backend: give either a backend or a factory, not both")

    def backend_for(arch: LlamaArch) -> Optional[AttentionBackend]:
        return attn_backend if attn_backend_factory is None else attn_backend_factory(arch)

    if os.path.isdir(path):
        loaded = _load_hf_folder(path, dtype, device, backend_for, load_format, loader_settings, tensor_parallel,
                                 load_tokenizer)
    elif path.endswith(".gguf"):
        loaded = _load_gguf(path, dtype, device, backend_for, load_format, tensor_parallel, load_tokenizer)
    else:
        raise ValueError(f"model: {path} is neither a Hugging Face model folder nor a .gguf file")
    if tokenizer_path is not None and load_tokenizer:
        loaded.tokenizer = load_folder_tokenizer(tokenizer_path)
    return loaded


BackendFor = Callable[[LlamaArch], Optional[AttentionBackend]]


def _load_hf_folder(folder: str, dtype: torch.dtype, device: torch.device, backend_for: BackendFor,
                    load_format: str, settings: LoaderSettings, tp: Optional[TPGroup] = None,
                    load_tokenizer: bool = True) -> LoadedModel:
    phases = StartupPhases("load")
    with phases.phase("config"):
        arch = LlamaArch.from_hf_config(read_json(os.path.join(folder, CONFIG_FILE)), source=CONFIG_FILE)
        files = safetensors_files(folder) if load_format != "dummy" else []  # dummy needs no weight files
        generation_config = read_generation_config(folder)
        check_tokenizer_files(folder)
    # The tokenizer (and the transformers import it needs) loads on a thread while the C++ reader,
    # which does not hold the GIL, moves the weights.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rtpllm-tokenizer") as pool:
        tokenizer = pool.submit(_timed, phases, "tokenizer", load_folder_tokenizer, folder) if load_tokenizer else None
        with phases.phase("model build"):
            model = _empty_model(arch, dtype, device, backend_for(arch), tp)
        if load_format == "dummy":
            with phases.phase("dummy weights"):
                _fill_dummy(model)
        else:
            # Headers are read and checked (and the index against them) before any weight moves.
            with phases.phase("headers"):
                checkpoint = SafetensorsCheckpoint(files, read_weight_map(folder))
            # A tensor-parallel rank reads only its slices (row ranges, strided column slices).
            shard_of = model.checkpoint_shard if tp is not None else None
            with phases.phase(f"weights {checkpoint.total_bytes / 1e9:.2f} GB" + (" (this rank's slices)" if tp else "")):
                model.check_all_loaded(load_into_model(checkpoint, model.weight_destination, settings, shard_of))
        result = None
        if tokenizer is not None:
            with phases.phase("waiting for the tokenizer"):
                result = tokenizer.result()
        return LoadedModel(model.eval(), arch, result, generation_config, phases)


def _timed(phases: StartupPhases, name: str, load: Callable, *args):
    """Runs `load(*args)` (on a thread) and records its time as work done in parallel."""
    start = time.perf_counter()
    try:
        return load(*args)
    finally:
        phases.add_parallel(name, time.perf_counter() - start)


def _load_gguf(path: str, dtype: torch.dtype, device: torch.device, backend_for: BackendFor,
               load_format: str, tp: Optional[TPGroup] = None, load_tokenizer: bool = True) -> LoadedModel:
    # Imported here: the gguf package costs a Hugging Face folder's start-up nothing.
    from rtpllm.loader.gguf_checkpoint import GGUFCheckpoint
    from rtpllm.loader.gguf_tokenizer import load_gguf_tokenizer

    phases = StartupPhases("load")
    with phases.phase("gguf metadata"):
        checkpoint = GGUFCheckpoint(path)
        arch = checkpoint.arch()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rtpllm-tokenizer") as pool:
        # Overlaps the weights' reading and dequantizing.
        tokenizer = pool.submit(_timed, phases, "tokenizer", load_gguf_tokenizer, path) if load_tokenizer else None
        if load_format == "dummy":
            with phases.phase("model build and dummy weights"):
                model = _fill_dummy(_empty_model(arch, dtype, device, backend_for(arch), tp)).eval()
        else:
            with phases.phase(f"weights {checkpoint.total_bytes / 1e9:.2f} GB (read and dequantize)"):
                if device.type == "cpu" and dtype == torch.float32 and tp is None:
                    # Decoded straight into the parameters, on the host's threads.
                    model = _empty_model(arch, dtype, device, backend_for(arch))
                    model.check_all_loaded(checkpoint.load_into(arch, model.weight_destination))
                    model.eval()
                else:
                    model = build_model(arch, dtype, device, checkpoint.weights(arch, device), backend_for(arch), tp)
        result = None
        try:
            if tokenizer is not None:
                with phases.phase("waiting for the tokenizer"):
                    result = tokenizer.result()
        except Exception as e:
            raise ValueError(f"{checkpoint.name}: cannot build the tokenizer from the GGUF metadata "
                             f"({type(e).__name__}: {e})") from None
        return LoadedModel(model, arch, result, checkpoint.generation_config(arch), phases)


def _empty_model(arch: LlamaArch, dtype: torch.dtype, device: torch.device,
                 attn_backend: Optional[AttentionBackend], tp: Optional[TPGroup] = None) -> LlamaForCausalLM:
    """The model (this rank's shard under `tp`) directly on `device` in `dtype`, parameters
    uninitialized (no host copy, no throwaway initialization)."""
    with torch.device(device):
        return LlamaForCausalLM(arch, attn_backend=attn_backend, dtype=dtype, tp=tp)


@torch.no_grad()
def _fill_dummy(model: LlamaForCausalLM) -> LlamaForCausalLM:
    # A fixed seed of its own: dummy runs are reproducible without touching the global generator.
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(0)
    for param in model.parameters():
        param.uniform_(-_DUMMY_RANGE, _DUMMY_RANGE, generator=generator)
    return model


def build_model(arch: LlamaArch, dtype: torch.dtype, device: torch.device,
                weights: Iterable[tuple[str, torch.Tensor]],
                attn_backend: Optional[AttentionBackend] = None, tp: Optional[TPGroup] = None) -> LlamaForCausalLM:
    """Creates the model on `device` in `dtype` and copies the (name, tensor) pairs in."""
    model = _empty_model(arch, dtype, device, attn_backend, tp)
    model.load_weights(weights)
    return model.eval()

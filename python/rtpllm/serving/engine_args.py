"""Command-line engine options, derived from the config dataclasses (the single source of truth).

Every field of ModelConfig, CacheConfig, SchedulerConfig, ParallelConfig and DeviceConfig, plus
EngineConfig's own fields, becomes `--field-name` (vLLM's spelling: `--max-num-seqs`,
`--enable-prefix-caching/--no-enable-prefix-caching`, ...). Unset flags stay None, which
`EngineConfig.from_kwargs` reads as "keep the dataclass default", so defaults live in one place.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from rtpllm.config import (KV_COPY_METHODS, LOAD_FORMATS, ROLES, CacheConfig, DeviceConfig, EngineConfig, ModelConfig,
                           ParallelConfig, PDConfig, SchedulerConfig)

_CONFIG_CLASSES = (ModelConfig, CacheConfig, SchedulerConfig, ParallelConfig, DeviceConfig, PDConfig, EngineConfig)

_HELP = {
    "model": "Hugging Face checkpoint folder or .gguf file (default: the built-in SmolLM2-135M-Instruct).",
    "tokenizer": "Tokenizer folder, when it differs from the model's.",
    "dtype": "Weight and activation precision (auto: float32 on the CPU, bfloat16 on a GPU).",
    "max_model_len": "Context length: prompt plus output tokens (default: the model's).",
    "seed": "Seed of the engine-wide sampling generator.",
    "load_format": "How to get the weights: auto (read the checkpoint) or dummy (random values, no reading).",
    "served_model_name": "The model name clients send and /v1/models lists (default: the path's basename).",
    "block_size": "Tokens per KV cache block (a power of two).",
    "gpu_memory_utilization": "Fraction of GPU memory for weights, activations and the KV cache.",
    "cpu_kv_cache_gib": "KV cache size on the CPU, in GiB.",
    "num_blocks": "KV cache blocks, overriding the memory-based sizing.",
    "enable_prefix_caching": "Reuse the KV blocks of shared prompt prefixes.",
    "kv_host_cache_gib": "Host-memory KV tier below the GPU pool, in GiB (default: min(4, 1/8 of available "
                         "memory); 0 turns it off).",
    "kv_disk_cache_dir": "Directory of the local-disk KV tier (kept across restarts; default: no disk tier).",
    "kv_disk_cache_gib": "Size cap of the disk KV tier, in GiB.",
    "kv_load_timeout_s": "Seconds a KV load from the tiers may take before its tokens are recomputed.",
    "kv_store": "HOST:PORT of a shared KV store (rtpllm kvstore serve), a tier after host and disk that "
                "instances share (default: none).",
    "kv_copy_method": "CUDA copies between the KV pool and host memory: kernel (lowest latency), staged (device "
                      "gather + DMA: leaves the SMs to the model), hybrid (loads kernel, saves staged; the default) or memcpy.",
    "max_num_batched_tokens": "Token budget of one scheduler step.",
    "max_num_seqs": "Most sequences in one step's batch.",
    "enable_chunked_prefill": "Split long prompts across steps, batched with decodes.",
    "tensor_parallel_size": "GPUs to shard the model over (with --device cpu: processes).",
    "device": "Where to run the model.",
    "enforce_eager": "Turn CUDA graphs off.",
    "max_queued_requests": "Sequences waiting for a batch slot beyond which the server answers 503 at once "
                           "(default: no limit).",
    "speculative_config": ('Speculative decoding as JSON, e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\' '
                           '(methods: ngram, draft_model, eagle3; "model": the draft/EAGLE-3 checkpoint).'),
    "role": "Prefill-decode disaggregation: both (an ordinary instance), prefill or decode (behind "
            "`rtpllm router --prefill ... --decode ...`).",
    "pd_timeout_s": "Bound on every prefill-decode wait (the KV's arrival, one transfer, a connect), in seconds.",
    "pd_transfer_host": "Decode: the host its KV transfer engine listens on and advertises to prefill instances.",
    "pd_transfer_port": "Decode: the KV transfer engine's port (0: any free port); tensor-parallel rank r uses port + r.",
    "pd_direct_copy": "On a GPU, both roles: KV writes to a decode instance on this host by our copy kernel into "
                      "its pool mapped over CUDA IPC (one kernel per layer, any block order) instead of UCX's CUDA "
                      "IPC transport (one copy per run of blocks). Experimental: not yet run on a GPU.",
}
_CHOICES = {"dtype": ("auto", "float32", "float16", "bfloat16"), "device": ("auto", "cpu", "cuda"),
            "load_format": LOAD_FORMATS, "kv_copy_method": KV_COPY_METHODS, "role": ROLES}


def _option_fields() -> list[tuple[str, type]]:
    """(field name, value type) for every leaf option, in declaration order."""
    nested = {f.name for f in dataclasses.fields(EngineConfig)
              if dataclasses.is_dataclass(typing.get_type_hints(EngineConfig)[f.name])}
    options = []
    for klass in _CONFIG_CLASSES:
        hints = typing.get_type_hints(klass)
        for f in dataclasses.fields(klass):
            if klass is EngineConfig and f.name in nested:
                continue
            options.append((f.name, _value_type(hints[f.name])))
    return options


def _value_type(hint: Any) -> type:
    """`Optional[int]` -> int; the CLI only ever holds plain values (a nested config as a JSON string)."""
    if dataclasses.is_dataclass(hint):
        return str
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union and len(args) == 1:
        return _value_type(args[0])
    return hint


def add_engine_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("engine options")
    for name, value_type in _option_fields():
        flag = "--" + name.replace("_", "-")
        help_text = _HELP.get(name)
        if value_type is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            group.add_argument(flag, dest=name, type=value_type, default=None, choices=_CHOICES.get(name),
                               help=help_text)
    return parser


def engine_config_from_args(args: argparse.Namespace, **overrides: Any) -> EngineConfig:
    """The EngineConfig the parsed flags describe; `overrides` win over flags (for fixed settings)."""
    values = {name: getattr(args, name) for name, _ in _option_fields() if hasattr(args, name)}
    values.update(overrides)
    return EngineConfig.from_kwargs(**values)


def engine_kwargs_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The set flags as `LLM(...)` keyword arguments (unset ones left to the defaults)."""
    return {name: getattr(args, name) for name, _ in _option_fields()
            if getattr(args, name, None) is not None and name != "model"}

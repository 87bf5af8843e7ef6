"""The shape and switches of one Llama-family model, read from an HF config.json or GGUF metadata.

One frozen dataclass covers Llama 2/3, Mistral, Qwen2 and Qwen3: they differ only in the
switches below (biases, q/k norm, tied embeddings, RoPE scaling). Anything in a config that
would change the math and that we do not implement is rejected by name rather than ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Collection, Mapping, Optional, Sequence

from rtpllm.layers.rotary import RopeConfig

# HF `architectures` entry -> its `model_type`.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
# GGUF `general.architecture` -> the HF architecture with the same math.
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

_MISSING = object()


@dataclass(frozen=True)
class LlamaArch:
    architecture: str  # a key of SUPPORTED_ARCHITECTURES
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope: RopeConfig
    # The longest context served exactly. For a sliding-window model this is capped at the window:
    # until the context outgrows the window, full attention and sliding attention are the same.
    max_position_embeddings: int
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on each q and k head, before RoPE
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"architecture: {self.architecture!r} is not supported "
                             f"(supported: {sorted(SUPPORTED_ARCHITECTURES)})")
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "vocab_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads: {self.num_kv_heads} does not divide num_heads={self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim: must be even for RoPE, got {self.head_dim}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps: must be positive, got {self.rms_norm_eps}")
        for token_id in ((self.bos_token_id,) if self.bos_token_id is not None else ()) + self.eos_token_ids:
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(f"special token id {token_id} is outside the vocabulary [0, {self.vocab_size})")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], source: str = "config.json") -> "LlamaArch":
        """Parses a Hugging Face config dict. Errors name `source` and the offending key."""
        fields = _Fields(config, source)
        architectures = fields.get("architectures", None)
        if not isinstance(architectures, list) or len(architectures) != 1:
            raise ValueError(f"{source}: architectures must list exactly one model class, got {architectures!r}")
        architecture = architectures[0]
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"{source}: architecture {architecture!r} is not supported "
                             f"(supported: {sorted(SUPPORTED_ARCHITECTURES)})")
        _reject_unsupported_hf_features(fields, architecture)

        hidden_size = fields.positive_int("hidden_size")
        num_heads = fields.positive_int("num_attention_heads")
        head_dim = fields.get("head_dim", None)
        if head_dim is None:
            if hidden_size % num_heads:
                raise ValueError(f"{source}: head_dim is not given and hidden_size={hidden_size} is not a "
                                 f"multiple of num_attention_heads={num_heads}")
            head_dim = hidden_size // num_heads
        attention_bias = bool(fields.get("attention_bias", False))
        max_positions = fields.positive_int("max_position_embeddings")
        sliding_window = fields.get("sliding_window", None)
        if architecture == "MistralForCausalLM" and sliding_window is not None:
            max_positions = min(max_positions, int(sliding_window))
        kv_heads = fields.get("num_key_value_heads", None)
        return cls(
            architecture=architecture,
            hidden_size=hidden_size,
            intermediate_size=fields.positive_int("intermediate_size"),
            num_layers=fields.positive_int("num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=num_heads if kv_heads is None else kv_heads,
            head_dim=head_dim,
            vocab_size=fields.positive_int("vocab_size"),
            rms_norm_eps=float(fields.get("rms_norm_eps", 1e-6)),
            rope=_hf_rope(fields),
            max_position_embeddings=max_positions,
            # Qwen2 always has q/k/v biases and never an o_proj bias; Llama and Qwen3 put
            # `attention_bias` on all four projections; Mistral has none.
            qkv_bias=architecture == "Qwen2ForCausalLM" or (attention_bias and architecture != "MistralForCausalLM"),
            o_bias=attention_bias and architecture in ("LlamaForCausalLM", "Qwen3ForCausalLM"),
            mlp_bias=architecture == "LlamaForCausalLM" and bool(fields.get("mlp_bias", False)),
            qk_norm=architecture == "Qwen3ForCausalLM",
            tie_word_embeddings=bool(fields.get("tie_word_embeddings", False)),
            bos_token_id=fields.get("bos_token_id", None),
            eos_token_ids=_as_id_tuple(fields.get("eos_token_id", None), source, "eos_token_id"),
        )

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any], tensor_names: Collection[str],
                           rope_freq_factors: Optional[Sequence[float]] = None,
                           source: str = "GGUF") -> "LlamaArch":
        """Parses GGUF key/values (decoded to Python values). Which optional weights exist
        (output.weight, q/k/v biases, q/k norms) is read from `tensor_names`;
        `rope_freq_factors` is the content of `rope_freqs.weight` when the file has one."""
        fields = _Fields(metadata, source)
        gguf_arch = fields.get("general.architecture", None)
        if gguf_arch not in GGUF_ARCHITECTURES:
            raise ValueError(f"{source}: general.architecture {gguf_arch!r} is not supported "
                             f"(supported: {sorted(GGUF_ARCHITECTURES)})")
        prefix = f"{gguf_arch}."
        hidden_size = fields.positive_int(prefix + "embedding_length")
        num_heads = fields.positive_int(prefix + "attention.head_count")
        head_dim = fields.get(prefix + "attention.key_length", hidden_size // num_heads)
        value_dim = fields.get(prefix + "attention.value_length", head_dim)
        rotary_dim = fields.get(prefix + "rope.dimension_count", head_dim)
        if value_dim != head_dim or rotary_dim != head_dim:
            raise ValueError(f"{source}: key_length={head_dim}, value_length={value_dim} and "
                             f"rope.dimension_count={rotary_dim} must be equal (partial RoPE is not supported)")
        tokens = fields.get("tokenizer.ggml.tokens", None)
        vocab_size = fields.get(prefix + "vocab_size", len(tokens) if tokens is not None else None)
        if vocab_size is None:
            raise ValueError(f"{source}: neither {prefix}vocab_size nor tokenizer.ggml.tokens is present")
        num_kv_heads = fields.get(prefix + "attention.head_count_kv", num_heads)
        if isinstance(num_kv_heads, list) or isinstance(fields.get(prefix + "feed_forward_length"), list):
            raise ValueError(f"{source}: per-layer head counts or MLP sizes are not supported")
        # llama.cpp ends generation at EOS and also at end-of-turn / end-of-message tokens
        # (Llama 3's <|eot_id|>, <|eom_id|>), which chat models emit instead of EOS.
        eos_ids = []
        for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
            value = fields.get(f"tokenizer.ggml.{key}", None)
            if value is not None and int(value) not in eos_ids:
                eos_ids.append(int(value))
        return cls(
            architecture=GGUF_ARCHITECTURES[gguf_arch],
            hidden_size=hidden_size,
            intermediate_size=fields.positive_int(prefix + "feed_forward_length"),
            num_layers=fields.positive_int(prefix + "block_count"),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            vocab_size=vocab_size,
            rms_norm_eps=float(fields.get(prefix + "attention.layer_norm_rms_epsilon", 1e-5)),
            rope=_gguf_rope(fields, prefix, rope_freq_factors),
            max_position_embeddings=fields.positive_int(prefix + "context_length"),
            qkv_bias="blk.0.attn_q.bias" in tensor_names,
            o_bias="blk.0.attn_output.bias" in tensor_names,
            mlp_bias="blk.0.ffn_up.bias" in tensor_names,
            qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
            tie_word_embeddings="output.weight" not in tensor_names,
            bos_token_id=fields.get("tokenizer.ggml.bos_token_id", None),
            eos_token_ids=tuple(eos_ids),
        )


class _Fields:
    """A config mapping whose errors name the source file and the key."""

    def __init__(self, values: Mapping[str, Any], source: str):
        if not isinstance(values, Mapping):
            raise ValueError(f"{source}: expected a JSON object, got {type(values).__name__}")
        self.values = values
        self.source = source

    def get(self, key: str, default: Any = _MISSING) -> Any:
        value = self.values.get(key, default)
        if value is _MISSING:
            raise ValueError(f"{self.source}: required key {key!r} is missing")
        return value

    def positive_int(self, key: str) -> int:
        value = self.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{self.source}: {key} must be a positive integer, got {value!r}")
        return value


def _reject_unsupported_hf_features(fields: _Fields, architecture: str) -> None:
    source = fields.source
    act = fields.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{source}: hidden_act {act!r} is not supported (only 'silu')")
    if fields.get("quantization_config", None) is not None:
        raise ValueError(f"{source}: quantization_config is not supported (load an unquantized "
                         "checkpoint or a GGUF file)")
    if fields.get("use_sliding_window", False):
        raise ValueError(f"{source}: use_sliding_window=true is not supported")
    layer_types = fields.get("layer_types", None) or []
    other = sorted({t for t in layer_types if t != "full_attention"})
    if other:
        raise ValueError(f"{source}: layer_types {other} are not supported (only full_attention)")
    if architecture != "LlamaForCausalLM" and fields.get("mlp_bias", False):
        raise ValueError(f"{source}: mlp_bias is not supported for {architecture}")


def _hf_rope(fields: _Fields) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters` (theta inside); older configs and most hub
    # checkpoints write `rope_theta` plus an optional `rope_scaling`, whose kind is `rope_type`
    # (or `type` in older files).
    source = fields.source
    params = fields.get("rope_parameters", None) or fields.get("rope_scaling", None) or {}
    if not isinstance(params, Mapping):
        raise ValueError(f"{source}: rope_scaling must be an object, got {params!r}")
    theta = float(params.get("rope_theta") or fields.get("rope_theta", None) or 10000.0)
    kind = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", fields.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(f"{source}: partial_rotary_factor={partial} is not supported (only 1.0)")
    if kind in (None, "default"):
        return RopeConfig(theta=theta)
    if kind == "linear":
        return RopeConfig(theta=theta, scaling="linear", factor=float(_rope_key(params, "factor", source)))
    if kind == "llama3":
        return RopeConfig(theta=theta, scaling="llama3",
                          factor=float(_rope_key(params, "factor", source)),
                          low_freq_factor=float(_rope_key(params, "low_freq_factor", source)),
                          high_freq_factor=float(_rope_key(params, "high_freq_factor", source)),
                          original_max_position_embeddings=int(
                              _rope_key(params, "original_max_position_embeddings", source)))
    raise ValueError(f"{source}: rope type {kind!r} is not supported (supported: default, linear, llama3)")


def _rope_key(params: Mapping[str, Any], key: str, source: str) -> Any:
    if key not in params:
        raise ValueError(f"{source}: rope scaling is missing {key!r}")
    return params[key]


def _gguf_rope(fields: _Fields, prefix: str, freq_factors: Optional[Sequence[float]]) -> RopeConfig:
    theta = float(fields.get(prefix + "rope.freq_base", 10000.0))
    kind = fields.get(prefix + "rope.scaling.type", "none")
    factors = tuple(float(f) for f in freq_factors) if freq_factors is not None else None
    if kind == "none":
        return RopeConfig(theta=theta, freq_factors=factors)
    if kind == "linear":
        factor = float(fields.get(prefix + "rope.scaling.factor"))
        return RopeConfig(theta=theta, scaling="linear", factor=factor, freq_factors=factors)
    raise ValueError(f"{fields.source}: {prefix}rope.scaling.type {kind!r} is not supported (supported: none, linear)")


def _as_id_tuple(value: Any, source: str, key: str) -> tuple[int, ...]:
    if value is None:
        return ()
    ids = value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"{source}: {key} must be an integer or a list of integers, got {value!r}")
    return tuple(ids)

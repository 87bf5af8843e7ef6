"""Published model shapes (from each model's config.json) for random-weight checkpoints, and their
tiny counterparts with the same switches for tests."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


@dataclass(frozen=True)
class ModelShape:
    architecture: str  # HF architectures[0]
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: Optional[dict[str, Any]] = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    add_bos: bool = True  # whether the tokenizer prepends BOS (Llama, Mistral) or not (Qwen)

    @property
    def num_parameters(self) -> int:
        attention = self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * self.hidden_size * self.intermediate_size
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attention + mlp + 2 * self.hidden_size) + embeddings + self.hidden_size

    def hf_config(self, bos_token_id: Optional[int], eos_token_ids: list[int]) -> dict[str, Any]:
        """config.json in the layout published checkpoints use (rope_theta + rope_scaling)."""
        config: dict[str, Any] = {
            "architectures": [self.architecture], "model_type": self.model_type, "hidden_act": "silu",
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim, "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings, "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling, "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings, "bos_token_id": bos_token_id,
            "eos_token_id": eos_token_ids, "torch_dtype": "bfloat16", "initializer_range": 0.02,
            "attention_dropout": 0.0, "use_cache": True,
        }
        if self.model_type == "llama":
            config.update(attention_bias=False, mlp_bias=False)
        elif self.model_type in ("qwen2", "qwen3"):
            config.update(use_sliding_window=False, sliding_window=None, max_window_layers=self.num_layers)
            if self.model_type == "qwen3":
                config["attention_bias"] = False
        elif self.model_type == "mistral":
            config["sliding_window"] = None
        return config

    def tiny(self) -> "ModelShape":
        """Two small layers keeping this shape's switches and (up to 4:1) its GQA ratio."""
        ratio = min(self.num_heads // self.num_kv_heads, 4)
        return dataclasses.replace(self, hidden_size=128, intermediate_size=256, num_layers=2,
                                   num_heads=2 * ratio, num_kv_heads=2, head_dim=32, vocab_size=1024,
                                   max_position_embeddings=4096)


SHAPES: dict[str, ModelShape] = {
    "llama-2-7b": ModelShape("LlamaForCausalLM", "llama", 4096, 11008, 32, 32, 32, 128, 32000, 4096, 10000.0),
    "llama-3.1-8b": ModelShape("LlamaForCausalLM", "llama", 4096, 14336, 32, 32, 8, 128, 128256, 131072,
                               500000.0, _LLAMA3_ROPE),
    "llama-3.2-1b": ModelShape("LlamaForCausalLM", "llama", 2048, 8192, 16, 32, 8, 64, 128256, 131072, 500000.0,
                               {**_LLAMA3_ROPE, "factor": 32.0}, tie_word_embeddings=True),
    "mistral-7b": ModelShape("MistralForCausalLM", "mistral", 4096, 14336, 32, 32, 8, 128, 32768, 32768,
                             1000000.0),
    "qwen2.5-7b": ModelShape("Qwen2ForCausalLM", "qwen2", 3584, 18944, 28, 28, 4, 128, 152064, 32768, 1000000.0,
                             rms_norm_eps=1e-6, add_bos=False),
    "qwen2.5-0.5b": ModelShape("Qwen2ForCausalLM", "qwen2", 896, 4864, 24, 14, 2, 64, 151936, 32768, 1000000.0,
                               rms_norm_eps=1e-6, tie_word_embeddings=True, add_bos=False),
    "qwen3-8b": ModelShape("Qwen3ForCausalLM", "qwen3", 4096, 12288, 36, 32, 8, 128, 151936, 40960, 1000000.0,
                           rms_norm_eps=1e-6, add_bos=False),
    "qwen3-0.6b": ModelShape("Qwen3ForCausalLM", "qwen3", 1024, 3072, 28, 16, 8, 128, 151936, 40960, 1000000.0,
                             rms_norm_eps=1e-6, tie_word_embeddings=True, add_bos=False),
}


def tensor_specs(shape: ModelShape) -> list[tuple[str, tuple[int, ...], str]]:
    """(Hugging Face name, shape, kind) of every tensor, kind being "matrix", "norm" or "bias"."""
    h, q, kv = shape.hidden_size, shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    specs = [("model.embed_tokens.weight", (shape.vocab_size, h), "matrix")]
    for i in range(shape.num_layers):
        p = f"model.layers.{i}"
        specs += [(f"{p}.input_layernorm.weight", (h,), "norm"),
                  (f"{p}.self_attn.q_proj.weight", (q, h), "matrix"),
                  (f"{p}.self_attn.k_proj.weight", (kv, h), "matrix"),
                  (f"{p}.self_attn.v_proj.weight", (kv, h), "matrix"),
                  (f"{p}.self_attn.o_proj.weight", (h, q), "matrix")]
        if shape.model_type == "qwen2":
            specs += [(f"{p}.self_attn.{proj}.bias", (size,), "bias")
                      for proj, size in (("q_proj", q), ("k_proj", kv), ("v_proj", kv))]
        if shape.model_type == "qwen3":
            specs += [(f"{p}.self_attn.q_norm.weight", (shape.head_dim,), "norm"),
                      (f"{p}.self_attn.k_norm.weight", (shape.head_dim,), "norm")]
        specs += [(f"{p}.post_attention_layernorm.weight", (h,), "norm"),
                  (f"{p}.mlp.gate_proj.weight", (shape.intermediate_size, h), "matrix"),
                  (f"{p}.mlp.up_proj.weight", (shape.intermediate_size, h), "matrix"),
                  (f"{p}.mlp.down_proj.weight", (h, shape.intermediate_size), "matrix")]
    specs.append(("model.norm.weight", (h,), "norm"))
    if not shape.tie_word_embeddings:
        specs.append(("lm_head.weight", (shape.vocab_size, h), "matrix"))
    return specs

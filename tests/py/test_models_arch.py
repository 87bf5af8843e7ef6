"""LlamaArch parsing: real-world config shapes, GGUF metadata, RoPE frequencies against
transformers, and a clear error for everything we do not support."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from rtpllm.layers.rotary import RopeConfig, rope_inv_freq
from rtpllm.models.llama_arch import LlamaArch

# Llama-3.1-8B's config.json as published (the pre-transformers-5 layout: rope_theta + rope_scaling).
LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "vocab_size": 128256,
}


def _config(**changes):
    return {**LLAMA_31_8B, **changes}


def test_llama_31_config():
    arch = LlamaArch.from_hf_config(LLAMA_31_8B)
    assert (arch.num_layers, arch.num_heads, arch.num_kv_heads, arch.head_dim) == (32, 32, 8, 128)
    assert (arch.q_size, arch.kv_size) == (4096, 1024)
    assert arch.rope == RopeConfig(theta=500000.0, scaling="llama3", factor=8.0, low_freq_factor=1.0,
                                   high_freq_factor=4.0, original_max_position_embeddings=8192)
    assert arch.eos_token_ids == (128001, 128008, 128009) and arch.bos_token_id == 128000
    assert not (arch.qkv_bias or arch.o_bias or arch.qk_norm or arch.tie_word_embeddings)


def test_variant_switches():
    qwen2 = LlamaArch.from_hf_config(_config(architectures=["Qwen2ForCausalLM"], rope_scaling=None))
    assert qwen2.qkv_bias and not qwen2.o_bias and not qwen2.qk_norm
    qwen3 = LlamaArch.from_hf_config(_config(architectures=["Qwen3ForCausalLM"], head_dim=64, attention_bias=True))
    assert qwen3.qk_norm and qwen3.qkv_bias and qwen3.o_bias and qwen3.head_dim == 64
    llama_bias = LlamaArch.from_hf_config(_config(attention_bias=True, mlp_bias=True))
    assert llama_bias.qkv_bias and llama_bias.o_bias and llama_bias.mlp_bias
    old_linear = LlamaArch.from_hf_config(_config(rope_scaling={"type": "linear", "factor": 4.0}))
    assert old_linear.rope == RopeConfig(theta=500000.0, scaling="linear", factor=4.0)
    mha = LlamaArch.from_hf_config(_config(num_key_value_heads=None, head_dim=None, rope_scaling=None))
    assert mha.num_kv_heads == 32 and mha.head_dim == 128 and mha.rope.scaling == "none"


def test_mistral_sliding_window_caps_the_context():
    mistral = LlamaArch.from_hf_config(_config(architectures=["MistralForCausalLM"], sliding_window=4096,
                                               max_position_embeddings=32768, rope_scaling=None))
    assert mistral.max_position_embeddings == 4096
    no_window = LlamaArch.from_hf_config(_config(architectures=["MistralForCausalLM"], sliding_window=None,
                                                 max_position_embeddings=32768, rope_scaling=None))
    assert no_window.max_position_embeddings == 32768


@pytest.mark.parametrize("changes, message", [
    (dict(architectures=["GPT2LMHeadModel"]), "architecture 'GPT2LMHeadModel' is not supported"),
    (dict(architectures=None), "architectures must list exactly one"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope type 'dynamic' is not supported"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope scaling is missing 'low_freq_factor'"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    (dict(architectures=["Qwen2ForCausalLM"], use_sliding_window=True), "use_sliding_window"),
    (dict(layer_types=["full_attention", "sliding_attention"]), r"layer_types \['sliding_attention'\]"),
    (dict(quantization_config={"quant_method": "awq"}), "quantization_config is not supported"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5 is not supported"),
    (dict(num_key_value_heads=5), "num_kv_heads: 5 does not divide num_heads=32"),
    (dict(hidden_size=True), "hidden_size must be a positive integer"),
    (dict(num_hidden_layers=0), "num_hidden_layers must be a positive integer"),
    (dict(eos_token_id="</s>"), "eos_token_id must be an integer or a list"),
    (dict(eos_token_id=[200000]), "special token id 200000 is outside the vocabulary"),
])
def test_unsupported_or_invalid_configs_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        LlamaArch.from_hf_config(_config(**changes))


def test_missing_key_is_named():
    config = dict(LLAMA_31_8B)
    del config["intermediate_size"]
    with pytest.raises(ValueError, match="config.json: required key 'intermediate_size' is missing"):
        LlamaArch.from_hf_config(config)


@pytest.mark.parametrize("rope_parameters", [
    {"rope_type": "default", "rope_theta": 10000.0},
    {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192, "rope_theta": 500000.0},
], ids=lambda p: p["rope_type"])
def test_rope_frequencies_match_transformers(rope_parameters):
    config = transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_parameters=rope_parameters)
    kind = rope_parameters["rope_type"]
    if kind == "default":
        expected = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding.compute_default_rope_parameters(
            config)[0]
    else:
        expected = ROPE_INIT_FUNCTIONS[kind](config, torch.device("cpu"))[0]
    rope = LlamaArch.from_hf_config({**LLAMA_31_8B, "rope_scaling": None, "rope_theta": None,
                                     "rope_parameters": rope_parameters}).rope
    assert torch.allclose(rope_inv_freq(rope, 128), expected, rtol=1e-6, atol=0)


def test_gguf_freq_factors_divide_the_frequencies():
    factors = tuple(1.0 + i for i in range(64))
    plain = rope_inv_freq(RopeConfig(theta=500000.0), 128)
    scaled = rope_inv_freq(RopeConfig(theta=500000.0, freq_factors=factors), 128)
    assert torch.allclose(scaled, plain / torch.tensor(factors))
    with pytest.raises(ValueError, match="expected 64 factors"):
        rope_inv_freq(RopeConfig(freq_factors=(1.0, 2.0)), 128)


QWEN3_GGUF = {
    "general.architecture": "qwen3", "qwen3.block_count": 28, "qwen3.context_length": 40960,
    "qwen3.embedding_length": 1024, "qwen3.feed_forward_length": 3072, "qwen3.attention.head_count": 16,
    "qwen3.attention.head_count_kv": 8, "qwen3.attention.key_length": 128, "qwen3.attention.value_length": 128,
    "qwen3.rope.freq_base": 1000000.0, "qwen3.attention.layer_norm_rms_epsilon": 1e-6,
    "tokenizer.ggml.tokens": ["x"] * 151936, "tokenizer.ggml.eos_token_id": 151645,
}
QWEN3_TENSORS = {"token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"}


def test_gguf_metadata():
    arch = LlamaArch.from_gguf_metadata(QWEN3_GGUF, QWEN3_TENSORS)
    assert arch.architecture == "Qwen3ForCausalLM" and arch.qk_norm and arch.tie_word_embeddings
    assert (arch.head_dim, arch.q_size, arch.vocab_size, arch.eos_token_ids) == (128, 2048, 151936, (151645,))
    assert arch.rope == RopeConfig(theta=1000000.0)
    llama3_chat = LlamaArch.from_gguf_metadata({**QWEN3_GGUF, "tokenizer.ggml.eot_token_id": 151643}, QWEN3_TENSORS)
    assert llama3_chat.eos_token_ids == (151645, 151643)


@pytest.mark.parametrize("changes, message", [
    ({"general.architecture": "gemma2"}, "general.architecture 'gemma2' is not supported"),
    ({"qwen3.rope.scaling.type": "yarn"}, "rope.scaling.type 'yarn' is not supported"),
    ({"qwen3.rope.dimension_count": 64}, "partial RoPE is not supported"),
    ({"qwen3.attention.head_count_kv": [8] * 28}, "per-layer head counts"),
    ({"qwen3.block_count": None}, "qwen3.block_count must be a positive integer"),
])
def test_unsupported_gguf_metadata_is_named(changes, message):
    with pytest.raises(ValueError, match=message):
        LlamaArch.from_gguf_metadata({**QWEN3_GGUF, **changes}, QWEN3_TENSORS, source="model.gguf")

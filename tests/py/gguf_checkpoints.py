"""Converts a tiny Hugging Face checkpoint (see checkpoints.py) into a GGUF file the way llama.cpp's
converter does, so the GGUF loader can be checked against the same weights in transformers.

Written independently of the loader: the tensor names, the q/k row permutation and Llama 3.1's
`rope_freqs` come from llama.cpp's conventions, not from rtpllm.loader.
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional

import gguf
import numpy as np
from safetensors import safe_open

from rtpllm.loader.hf_checkpoint import safetensors_files

_GGUF_ARCH = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
              "Qwen3ForCausalLM": "qwen3"}
_LAYER_PARTS = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_TOP_LEVEL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}


def gguf_name(name: str) -> str:
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name]
    _, _, layer, rest = name.split(".", 3)
    part, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_LAYER_PARTS[part]}.{kind}"


def llama_cpp_permute(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's converter: each head's rows go from (first half, second half) to interleaved pairs."""
    return (weights.reshape(num_heads, 2, weights.shape[0] // num_heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _llama3_rope_factors(config: dict, head_dim: int) -> np.ndarray:
    rope = config["rope_parameters"]
    base, factor = rope["rope_theta"], rope["factor"]
    low_wavelen = rope["original_max_position_embeddings"] / rope["low_freq_factor"]
    high_wavelen = rope["original_max_position_embeddings"] / rope["high_freq_factor"]
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi / (1.0 / base ** (i / head_dim))
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (rope["original_max_position_embeddings"] / wavelen - rope["low_freq_factor"]) / (
                rope["high_freq_factor"] - rope["low_freq_factor"])
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def write_gguf(hf_path: str, out_path: str, matrix_type: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
               type_overrides: Optional[dict[str, gguf.GGMLQuantizationType]] = None,
               architecture_override: Optional[str] = None) -> str:
    """Writes `out_path` from checkpoint folder `hf_path`. 2-D weights use `matrix_type`, norms and
    biases F32 (as llama.cpp does); `type_overrides` maps GGUF tensor names to another type, whose
    bytes are random when gguf-py cannot quantize to it."""
    with open(os.path.join(hf_path, "config.json")) as f:
        config = json.load(f)
    arch = architecture_override or _GGUF_ARCH[config["architectures"][0]]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer = gguf.GGUFWriter(out_path, arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    if config["rope_parameters"].get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config["rope_parameters"]["factor"])
    _add_tokenizer(writer, hf_path, config)

    overrides = type_overrides or {}
    if config["rope_parameters"].get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", _llama3_rope_factors(config, head_dim))
    for path in safetensors_files(hf_path):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name).float().numpy()
                if arch == "llama" and ".q_proj." in name:
                    tensor = llama_cpp_permute(tensor, heads)
                elif arch == "llama" and ".k_proj." in name:
                    tensor = llama_cpp_permute(tensor, kv_heads)
                target = gguf_name(name)
                qtype = overrides.get(target, matrix_type if tensor.ndim == 2 else gguf.GGMLQuantizationType.F32)
                _add_tensor(writer, target, tensor, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path


def _add_tensor(writer: gguf.GGUFWriter, name: str, tensor: np.ndarray, qtype: gguf.GGMLQuantizationType) -> None:
    if qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, tensor)
    elif qtype == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, tensor.astype(np.float16))
    else:
        try:
            data = gguf.quants.quantize(tensor, qtype)
        except NotImplementedError:
            block_values, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
            rows = tensor.reshape(-1, tensor.shape[-1])
            data = np.random.default_rng(0).integers(
                0, 256, (rows.shape[0], rows.shape[1] // block_values * block_bytes), dtype=np.uint8)
        writer.add_tensor(name, data, raw_dtype=qtype)


def _add_tokenizer(writer: gguf.GGUFWriter, hf_path: str, config: dict) -> None:
    with open(os.path.join(hf_path, "tokenizer.json")) as f:
        spec = json.load(f)
    vocab = dict(spec["model"]["vocab"])
    special = {token["content"]: token["id"] for token in spec["added_tokens"]}
    tokens = [None] * (len(vocab) + len(special))
    for token, index in {**vocab, **special}.items():
        tokens[index] = token
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([" ".join(pair) for pair in spec["model"]["merges"]])
    eos = config["eos_token_id"]
    writer.add_eos_token_id(eos[0] if isinstance(eos, list) else eos)
    if config.get("bos_token_id") is not None:
        writer.add_bos_token_id(config["bos_token_id"])
    writer.add_add_bos_token(config.get("bos_token_id") is not None)
    with open(os.path.join(hf_path, "chat_template.jinja")) as f:
        writer.add_chat_template(f.read())


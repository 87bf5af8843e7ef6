"""Tiny random-weight Hugging Face checkpoints of every supported model variant, for tests.

    from checkpoints import VARIANTS, checkpoint_path, load_hf_reference
    path = checkpoint_path("qwen3")          # built on first use, then cached for the session
    reference = load_hf_reference(path)      # the same checkpoint in transformers, float32, eval

Each folder is what `save_pretrained` writes (config.json, safetensors, generation_config.json)
plus a real byte-level BPE tokenizer with a ChatML chat template. Weights are drawn from a fixed
seed, and norms and biases are randomized too (transformers initializes them to constants, which
would hide a loader that skipped them). Matrices use a large init scale so that logits are
peaked and greedy decoding does not hinge on near-ties.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers

from rtpllm.tools.bpe_tokenizer import EOS_TOKEN, IM_END, build_bpe_tokenizer

TOKENIZER_VOCAB = 512
transformers.utils.logging.disable_progress_bar()


@dataclass(frozen=True)
class Variant:
    config_class: str  # a transformers config class name
    config: dict[str, Any]
    add_bos: bool = True  # Llama-style tokenizers prepend BOS; Qwen's do not
    vocab_size: int = TOKENIZER_VOCAB  # may exceed the tokenizer's size, as padded real vocabularies do
    save_dtype: torch.dtype = torch.float32
    max_shard_size: str = "1GB"  # small values force a sharded checkpoint with an index
    seed: int = 0
    tags: tuple[str, ...] = field(default_factory=tuple)


_COMMON = dict(num_hidden_layers=2, initializer_range=0.15, rms_norm_eps=1e-6, max_position_embeddings=1024)

VARIANTS: dict[str, Variant] = {
    # Llama 3.1 rope scaling, with a small original context so that the scaling bends real frequencies.
    "llama3": Variant("LlamaConfig", dict(
        hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
        rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                               high_freq_factor=4.0, original_max_position_embeddings=64)),
        seed=1),
    # Mistral: GQA 4:1 and a sliding window (which caps the servable context).
    "mistral": Variant("MistralConfig", dict(
        hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=1,
        sliding_window=512), seed=2),
    # Qwen2: q/k/v biases, a padded vocabulary, no BOS.
    "qwen2": Variant("Qwen2Config", dict(
        hidden_size=96, intermediate_size=192, num_attention_heads=6, num_key_value_heads=2),
        add_bos=False, vocab_size=TOKENIZER_VOCAB + 8, seed=3),
    # Qwen3: per-head q/k RMSNorm, tied embeddings, head_dim 64 with num_heads * head_dim != hidden_size.
    "qwen3": Variant("Qwen3Config", dict(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        tie_word_embeddings=True), add_bos=False, seed=4),
    # 9 query heads sharing 3 KV heads (SmolLM2's ratio), head_dim 64.
    "gqa9x3": Variant("LlamaConfig", dict(
        hidden_size=144, intermediate_size=192, num_attention_heads=9, num_key_value_heads=3, head_dim=64),
        seed=5),
    # head_dim 128, linear rope scaling, all attention biases, stored as bf16 safetensors shards.
    "hd128_sharded": Variant("LlamaConfig", dict(
        hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1, head_dim=128,
        attention_bias=True, rope_scaling=dict(rope_type="linear", factor=2.0)),
        save_dtype=torch.bfloat16, max_shard_size="150KB", seed=6),
}

_cache_root: str | None = None
_paths: dict[str, str] = {}
_tokenizers: dict[bool, Any] = {}


def checkpoint_path(name: str) -> str:
    """The folder of variant `name`, built on first use in a per-session temporary directory."""
    if name not in VARIANTS:
        raise KeyError(f"unknown checkpoint variant {name!r}; known: {sorted(VARIANTS)}")
    if name not in _paths:
        path = os.path.join(_root(), name)
        build_checkpoint(VARIANTS[name], path)
        _paths[name] = path
    return _paths[name]


def load_hf_reference(path: str) -> torch.nn.Module:
    """The transformers model of a checkpoint folder in float32, eval mode, SDPA attention."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


def tokenizer_for(add_bos: bool):
    if add_bos not in _tokenizers:
        _tokenizers[add_bos] = build_bpe_tokenizer(TOKENIZER_VOCAB, add_bos=add_bos)
    return _tokenizers[add_bos]


def build_checkpoint(variant: Variant, path: str) -> None:
    tokenizer = tokenizer_for(variant.add_bos)
    config_class = getattr(transformers, variant.config_class)
    config = config_class(
        **_COMMON, **variant.config, vocab_size=variant.vocab_size,
        bos_token_id=tokenizer.bos_token_id if variant.add_bos else None,
        eos_token_id=[tokenizer.convert_tokens_to_ids(EOS_TOKEN), tokenizer.convert_tokens_to_ids(IM_END)],
        pad_token_id=tokenizer.convert_tokens_to_ids(EOS_TOKEN))
    torch.manual_seed(variant.seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.2 * torch.randn_like(param))
    model.to(variant.save_dtype).save_pretrained(path, max_shard_size=variant.max_shard_size)
    tokenizer.save_pretrained(path)


def _root() -> str:
    global _cache_root
    if _cache_root is None:
        _cache_root = tempfile.mkdtemp(prefix="rtpllm-checkpoints-")
        atexit.register(shutil.rmtree, _cache_root, True)
    return _cache_root

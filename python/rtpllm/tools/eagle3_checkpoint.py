"""Writes a random-weight EAGLE-3 head for a target checkpoint, in the layout vLLM and SGLang load
(see rtpllm/spec/eagle3.py), for tests and benchmarks:

    python -m rtpllm.tools.eagle3_checkpoint --target /path/to/target --out /tmp/eagle3 [--draft-vocab 256]
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Optional, Sequence

import torch
from safetensors.torch import save_file


def write_eagle3_checkpoint(out: str, target_config: dict, *, draft_vocab_size: Optional[int] = None,
                            aux_layer_ids: Optional[Sequence[int]] = None, intermediate_size: Optional[int] = None,
                            with_embedding: bool = False, norm_before_residual: bool = False, seed: int = 0,
                            std: float = 0.02, dtype: torch.dtype = torch.float32) -> str:
    """One EAGLE-3 decoder layer sized for `target_config` (a Hugging Face config dict). The draft
    vocabulary is every `vocab // draft_vocab`-th target id (d2t holds the offsets)."""
    hidden = target_config["hidden_size"]
    vocab = target_config["vocab_size"]
    heads = target_config["num_attention_heads"]
    kv_heads = target_config.get("num_key_value_heads", heads)
    head_dim = target_config.get("head_dim") or hidden // heads
    inter = intermediate_size or target_config["intermediate_size"]
    draft_vocab = draft_vocab_size or vocab
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=std):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    def norm_weight(n):
        return (1.0 + 0.1 * torch.randn(n, generator=gen)).to(dtype)

    stride = vocab // draft_vocab
    targets = torch.arange(draft_vocab, dtype=torch.int64) * stride
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[targets] = True
    tensors = {
        "fc.weight": rand(hidden, 3 * hidden),
        "midlayer.self_attn.q_proj.weight": rand(heads * head_dim, 2 * hidden),
        "midlayer.self_attn.k_proj.weight": rand(kv_heads * head_dim, 2 * hidden),
        "midlayer.self_attn.v_proj.weight": rand(kv_heads * head_dim, 2 * hidden),
        "midlayer.self_attn.o_proj.weight": rand(hidden, heads * head_dim),
        "midlayer.mlp.gate_proj.weight": rand(inter, hidden),
        "midlayer.mlp.up_proj.weight": rand(inter, hidden),
        "midlayer.mlp.down_proj.weight": rand(hidden, inter),
        "midlayer.input_layernorm.weight": norm_weight(hidden),
        "midlayer.hidden_norm.weight": norm_weight(hidden),
        "midlayer.post_attention_layernorm.weight": norm_weight(hidden),
        "norm.weight": norm_weight(hidden),
        "lm_head.weight": rand(draft_vocab, hidden),
        "d2t": targets - torch.arange(draft_vocab, dtype=torch.int64),
        "t2d": t2d,
    }
    if with_embedding:
        tensors["embed_tokens.weight"] = rand(vocab, hidden)
    config = {
        "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": hidden, "intermediate_size": inter, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim, "num_hidden_layers": 1,
        "max_position_embeddings": target_config.get("max_position_embeddings", 2048),
        "rms_norm_eps": target_config.get("rms_norm_eps", 1e-5),
        "rope_theta": target_config.get("rope_theta", 10000.0), "rope_scaling": target_config.get("rope_scaling"),
        "vocab_size": vocab, "draft_vocab_size": draft_vocab, "target_hidden_size": hidden,
        "norm_before_residual": norm_before_residual, "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if aux_layer_ids is not None:
        config["eagle_aux_hidden_state_layer_ids"] = list(aux_layer_ids)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, "model.safetensors"))
    return out


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="the target checkpoint folder (its config.json)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--draft-vocab", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    args = parser.parse_args(argv)
    with open(os.path.join(args.target, "config.json")) as f:
        target = json.load(f)
    write_eagle3_checkpoint(args.out, target, draft_vocab_size=args.draft_vocab, seed=args.seed,
                            dtype=getattr(torch, args.dtype))
    print(args.out)


if __name__ == "__main__":
    main()

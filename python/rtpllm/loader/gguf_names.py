"""GGUF (llama.cpp) tensor names and layouts -> Hugging Face checkpoint names and layouts.

The model's `load_weights` takes Hugging Face names, so a GGUF file is loaded by renaming each
tensor here and undoing the one layout change llama.cpp makes: for the `llama` architecture its
converter reorders the rows of each q and k head from the "rotate half" RoPE layout to the
interleaved one.
"""

from __future__ import annotations

import re

import torch

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
# Not weights: Llama 3.1's per-frequency RoPE divisors, read into the architecture instead.
ROPE_FREQS_NAME = "rope_freqs.weight"
# Architectures whose converter permutes q/k rows (see `unpermute_qk`).
PERMUTED_QK_ARCHITECTURES = ("llama",)


def hf_name(gguf_name: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; raises ValueError for a
    tensor this model family does not have."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_TENSOR.match(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
    raise ValueError(f"GGUF tensor {gguf_name}: not a tensor of a Llama-family model")


def unpermute_qk(tensor: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverts llama.cpp's q/k reordering of a weight [num_heads * head_dim, in] or a bias
    [num_heads * head_dim]. llama.cpp stores each head's rows as interleaved pairs
    (x0, x_half, x1, x_half+1, ...); Hugging Face keeps the first half, then the second half."""
    rows = tensor.shape[0]
    head_dim = rows // num_heads
    rest = tensor.shape[1:]
    return tensor.reshape(num_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest)

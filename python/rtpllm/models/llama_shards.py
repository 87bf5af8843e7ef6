"""Tensor parallelism for the Llama family: which slice of which checkpoint tensor a rank holds.

    llama_tensor_shard(name, arch, rank, world_size) -> TensorShard | None   (None: every rank
                                                                             holds it whole)
This is the one map from Hugging Face tensor names to shards. The model sizes its layers with the
same functions and slices in `load_weights`; a reader may instead read only the shard's rows
(`TensorShard.index`, e.g. safetensors' `get_slice`), and hand those over: `load_weights`
takes either.

Megatron-style split: q/k/v and gate/up are column-parallel (each rank computes its heads and
its part of the intermediate dimension, no communication), o_proj and down_proj row-parallel
(each rank multiplies its slice of the input dimension; an all-reduce sums the partial outputs;
their biases are added once, after it), the embedding and lm_head split the vocabulary.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

from rtpllm.distributed.partition import TensorShard, split_evenly, split_heads, split_vocab
from rtpllm.models.llama_arch import LlamaArch

_LAYER_TENSOR = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.([a-z_]+)\.(weight|bias)$")


def check_tensor_parallel(arch: LlamaArch, world_size: int) -> None:
    """Raises ValueError naming tensor_parallel_size when this model cannot be split that way."""
    split_evenly(arch.num_heads, 0, world_size, "num_attention_heads")
    split_heads(arch.num_kv_heads, 0, world_size, "num_key_value_heads")
    split_evenly(arch.intermediate_size, 0, world_size, "intermediate_size")


def q_rows(arch: LlamaArch, rank: int, world_size: int) -> TensorShard:
    return split_heads(arch.num_heads, rank, world_size, "num_attention_heads").scaled(arch.head_dim)


def kv_rows(arch: LlamaArch, rank: int, world_size: int) -> TensorShard:
    return split_heads(arch.num_kv_heads, rank, world_size, "num_key_value_heads").scaled(arch.head_dim)


def mlp_rows(arch: LlamaArch, rank: int, world_size: int) -> TensorShard:
    return split_evenly(arch.intermediate_size, rank, world_size, "intermediate_size")


def vocab_rows(arch: LlamaArch, rank: int, world_size: int) -> TensorShard:
    return split_vocab(arch.vocab_size, rank, world_size)


def rank_local_arch(arch: LlamaArch, rank: int, world_size: int) -> LlamaArch:
    """The architecture as one rank's attention sees it (its q and KV head counts): what the
    attention backend and the KV pool are sized by."""
    if world_size == 1:
        return arch
    return dataclasses.replace(arch, num_heads=q_rows(arch, rank, world_size).length // arch.head_dim,
                               num_kv_heads=kv_rows(arch, rank, world_size).length // arch.head_dim)


def llama_tensor_shard(name: str, arch: LlamaArch, rank: int, world_size: int) -> Optional[TensorShard]:
    """The part of checkpoint tensor `name` that rank `rank` of `world_size` holds; None when it
    holds the whole tensor (norms, row-parallel biases, and everything at world_size 1)."""
    if world_size == 1:
        return None
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return vocab_rows(arch, rank, world_size)
    match = _LAYER_TENSOR.match(name)
    if match is None:
        return None
    _, projection, kind = match.groups()
    if projection == "q_proj":
        return q_rows(arch, rank, world_size)
    if projection in ("k_proj", "v_proj"):
        return kv_rows(arch, rank, world_size)
    if projection in ("gate_proj", "up_proj"):
        return mlp_rows(arch, rank, world_size)
    if projection == "o_proj" and kind == "weight":
        return q_rows(arch, rank, world_size).along(1)
    if projection == "down_proj" and kind == "weight":
        return mlp_rows(arch, rank, world_size).along(1)
    return None  # q_norm / k_norm (per head_dim), row-parallel biases

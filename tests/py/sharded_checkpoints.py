"""Sharded safetensors copies of a tiny test checkpoint (tests/py/checkpoints.py), in any dtype,
with q|k|v and gate|up stored separately (as Hugging Face does) or fused (as some exports do).

    folder, shard_paths = sharded_checkpoint(tmp_path, torch.bfloat16, fused=True)
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from checkpoints import checkpoint_path
from safetensors.torch import load_file, save_file

BASE_VARIANT = "gqa9x3"  # GQA 9:3, head_dim 64: fused qkv rows of unequal sizes


def fuse(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same weights with q|k|v and gate|up stored as one tensor each (as some exports do)."""
    fused = {}
    for name, tensor in state.items():
        if ".q_proj." in name:
            parts = [state[name.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            fused[name.replace("q_proj", "qkv_proj")] = torch.cat(parts)
        elif ".gate_proj." in name:
            fused[name.replace("gate_proj", "gate_up_proj")] = torch.cat([tensor, state[name.replace("gate", "up")]])
        elif not any(f".{p}." in name for p in ("k_proj", "v_proj", "up_proj")):
            fused[name] = tensor
    return fused


def write_sharded(folder, state: dict[str, torch.Tensor], shard_bytes: int = 120_000) -> list[str]:
    """Writes `state` as HF-style shards with an index; returns the shard paths."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for shard_name, shard in zip(names, shards):
        save_file(shard, os.path.join(folder, shard_name), metadata={"format": "pt"})
        weight_map.update({name: shard_name for name in shard})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return [os.path.join(folder, n) for n in names]


def sharded_checkpoint(tmp_path, dtype: torch.dtype, fused: bool):
    """A copy of the base test checkpoint in `dtype`, sharded, fused or not."""
    base = checkpoint_path(BASE_VARIANT)
    folder = tmp_path / f"ckpt-{dtype}-{fused}"
    shutil.copytree(base, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    state = {}
    for name in sorted(os.listdir(base)):
        if name.endswith(".safetensors"):
            state.update(load_file(os.path.join(base, name)))
    state = {name: tensor.to(dtype) for name, tensor in state.items()}
    if fused:
        state = fuse(state)
    files = write_sharded(str(folder), state)
    assert len(files) > 2
    return folder, files

"""Reading a Hugging Face model folder: config.json, safetensors weights (one file or sharded
with model.safetensors.index.json), the tokenizer files and generation_config.json."""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Callable, Iterator, Optional

import torch
from safetensors import SafetensorError, safe_open

from rtpllm.loader.tokenizer_loader import check_tokenizer_files  # noqa: F401 - re-exported

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"


def read_json(path: str) -> Any:
    """Parses a JSON file; a missing file raises FileNotFoundError, bad JSON ValueError, both naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{os.path.basename(path)}: not found at {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{os.path.basename(path)}: not valid JSON ({e}) in {path}") from None


def read_generation_config(folder: str) -> dict:
    path = os.path.join(folder, GENERATION_CONFIG_FILE)
    if not os.path.isfile(path):
        return {}
    config = read_json(path)
    if not isinstance(config, dict):
        raise ValueError(f"{GENERATION_CONFIG_FILE}: expected a JSON object in {path}")
    return config


def safetensors_files(folder: str) -> list[str]:
    """The weight files of the folder, in a stable order. Prefers the index when present."""
    weight_map = read_weight_map(folder)
    if weight_map is not None:
        return [os.path.join(folder, name) for name in sorted(set(weight_map.values()))]
    single = os.path.join(folder, SINGLE_WEIGHTS_FILE)
    if os.path.isfile(single):
        return [single]
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if files:
        return files
    other = [os.path.basename(p) for pattern in ("*.bin", "*.pt") for p in glob.glob(os.path.join(folder, pattern))]
    hint = f" (found {other}: only safetensors weights are supported)" if other else ""
    raise FileNotFoundError(f"weights: no {SINGLE_WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE} in {folder}{hint}")


def read_weight_map(folder: str) -> Optional[dict[str, str]]:
    """The index's tensor name -> shard file map, or None without an index. Raises
    FileNotFoundError naming a shard the index lists but the folder lacks (and a tensor in it)."""
    index_path = os.path.join(folder, WEIGHTS_INDEX_FILE)
    if not os.path.isfile(index_path):
        return None
    index = read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{WEIGHTS_INDEX_FILE}: has no 'weight_map' object in {index_path}")
    if not all(isinstance(shard, str) for shard in weight_map.values()):
        raise ValueError(f"{WEIGHTS_INDEX_FILE}: 'weight_map' values must be file names in {index_path}")
    for name, shard in weight_map.items():
        if not os.path.isfile(os.path.join(folder, shard)):
            raise FileNotFoundError(f"{WEIGHTS_INDEX_FILE}: missing shard {shard} (it holds tensor {name}) "
                                    f"in {folder}")
    return weight_map


def iter_safetensors(files: list[str], shard_of: Optional[Callable[[str], Any]] = None
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (name, CPU tensor) for every tensor of every file, reading one tensor at a time
    (memory-mapped), so peak host memory stays near one tensor. `shard_of(name)` (tensor
    parallelism) names the slice to read of a tensor (a TensorShard; None: all of it)."""
    for path in files:
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():
                    shard = shard_of(name) if shard_of is not None else None
                    if shard is None:
                        yield name, f.get_tensor(name)
                    else:
                        part = f.get_slice(name)
                        yield name, part[shard.index(len(part.get_shape()))]
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{os.path.basename(path)}: not a valid safetensors file ({e}) in {path}") from None



"""Writes a random-weight Hugging Face checkpoint of a real model's shape, for benchmarks.

    python -m rtpllm.tools.random_checkpoint --shape llama-3.1-8b --out /tmp/llama-3.1-8b
    python -m rtpllm.tools.random_checkpoint --shape qwen3-8b --tiny --out /tmp/qwen3-tiny
    python -m rtpllm.tools.random_checkpoint --shape llama-3.1-8b --tiny --vocab-size 128256 --out /tmp/tiny-l3vocab
    python -m rtpllm.tools.random_checkpoint --shape llama-3.1-8b --no-weights --out /tmp/llama-3.1-8b-tok

The folder has config.json, generation_config.json, bf16 safetensors shards with
model.safetensors.index.json, and a byte-level BPE tokenizer covering the whole vocabulary, so
`AutoTokenizer`, transformers and rtp-llm all load it. Weights are drawn on the GPU when there is
one and shards are written in parallel, so the disk is the limit (16 GB in about a minute on a
16-core GPU machine with a fast disk). The same seed always gives the same weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch
import transformers
from safetensors.torch import save_file

from rtpllm.tools.bpe_tokenizer import BOS_TOKEN, EOS_TOKEN, IM_END, build_bpe_tokenizer
from rtpllm.tools.checkpoint_shapes import SHAPES, ModelShape, tensor_specs

_MATRIX_STD = 0.02  # the initializer_range of these models; keeps activations in a realistic range
_DTYPE = torch.bfloat16


def plan_shards(specs: list[tuple[str, tuple[int, ...], str]], max_shard_bytes: int) -> list[list[int]]:
    """Groups tensor indices, in order, into shards of at most `max_shard_bytes` (a bigger tensor
    gets a shard of its own)."""
    element_size = torch.finfo(_DTYPE).bits // 8
    shards: list[list[int]] = [[]]
    size = 0
    for index, (_, shape, _) in enumerate(specs):
        nbytes = element_size * torch.Size(shape).numel()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(index)
        size += nbytes
    return shards


def random_tensor(shape: tuple[int, ...], kind: str, seed: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(seed)
    tensor = torch.empty(shape, dtype=_DTYPE, device=device)
    if kind == "norm":
        return tensor.normal_(1.0, 0.02, generator=generator)
    return tensor.normal_(0.0, _MATRIX_STD if kind == "matrix" else 0.01, generator=generator)


def write_random_checkpoint(shape: ModelShape, out: str, seed: int = 0, max_shard_bytes: int = 4 << 30,
                            device: Optional[torch.device] = None, workers: int = 4, weights: bool = True) -> dict:
    """Writes the checkpoint folder; returns a summary (parameters, bytes, seconds). Without
    `weights`, only the configs and the tokenizer (for start-up and tokenizer measurements)."""
    if os.path.exists(out) and os.listdir(out):
        raise FileExistsError(f"out: {out} exists and is not empty")
    os.makedirs(out, exist_ok=True)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()

    tokenizer = build_bpe_tokenizer(shape.vocab_size, add_bos=shape.add_bos)
    tokenizer.save_pretrained(out)
    bos = tokenizer.convert_tokens_to_ids(BOS_TOKEN) if shape.add_bos else None
    eos = [tokenizer.convert_tokens_to_ids(EOS_TOKEN), tokenizer.convert_tokens_to_ids(IM_END)]
    # transformers reads the version to decide which tokenizer fix-ups an old checkpoint needs.
    config = {**shape.hf_config(bos, eos), "transformers_version": transformers.__version__}
    _write_json(os.path.join(out, "config.json"), config)
    _write_json(os.path.join(out, "generation_config.json"),
                {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos[0]})

    if not weights:
        return {"parameters": shape.num_parameters, "bytes": 0, "shards": 0,
                "seconds": time.perf_counter() - start, "device": "none"}
    specs = tensor_specs(shape)
    shards = plan_shards(specs, max_shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    def write_shard(shard: int) -> int:
        tensors = {}
        for index in shards[shard]:
            name, tensor_shape, kind = specs[index]
            tensors[name] = random_tensor(tensor_shape, kind, seed * 1_000_003 + index, device).cpu()
        save_file(tensors, os.path.join(out, names[shard]), metadata={"format": "pt"})
        return sum(t.numel() * t.element_size() for t in tensors.values())

    # Threads overlap one shard's drawing and device-to-host copy with another's disk write.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        total_bytes = sum(pool.map(write_shard, range(len(shards))))
    weight_map = {specs[index][0]: names[shard] for shard, indices in enumerate(shards) for index in indices}
    _write_json(os.path.join(out, "model.safetensors.index.json"),
                {"metadata": {"total_size": total_bytes}, "weight_map": weight_map})
    return {"parameters": shape.num_parameters, "bytes": total_bytes, "shards": len(shards),
            "seconds": time.perf_counter() - start, "device": str(device)}


def _write_json(path: str, value: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)
        f.write("\n")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rtpllm.tools.random_checkpoint",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--shape", required=True, choices=sorted(SHAPES), help="which published model's shape")
    parser.add_argument("--out", required=True, help="output folder (must be new or empty)")
    parser.add_argument("--tiny", action="store_true", help="2 small layers with the same switches (for tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-shard-gb", type=float, default=4.0, help="largest shard size in GiB")
    parser.add_argument("--device", default=None, help="where to draw weights (default: cuda if available)")
    parser.add_argument("--workers", type=int, default=4, help="shards written in parallel")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="override the shape's vocabulary (e.g. --tiny with a Llama-3-sized tokenizer)")
    parser.add_argument("--no-weights", action="store_true",
                        help="write only config.json, generation_config.json and the tokenizer")
    args = parser.parse_args(argv)
    if args.max_shard_gb <= 0:
        parser.error(f"--max-shard-gb must be positive, got {args.max_shard_gb}")
    shape = SHAPES[args.shape].tiny() if args.tiny else SHAPES[args.shape]
    if args.vocab_size is not None:
        shape = dataclasses.replace(shape, vocab_size=args.vocab_size)
    summary = write_random_checkpoint(shape, args.out, seed=args.seed,
                                      max_shard_bytes=int(args.max_shard_gb * (1 << 30)),
                                      device=torch.device(args.device) if args.device else None,
                                      workers=args.workers, weights=not args.no_weights)
    gigabytes = summary["bytes"] / 1e9
    print(f"{args.out}: {summary['parameters'] / 1e6:,.1f}M parameters, {gigabytes:.3f} GB in {summary['shards']} "
          f"shards, {summary['seconds']:.1f} s ({gigabytes / summary['seconds']:.2f} GB/s, weights drawn on "
          f"{summary['device']})")


if __name__ == "__main__":
    main()

"""The random-checkpoint tool: its folders load in rtp-llm and in transformers with the same
logits, the tokenizer covers the whole vocabulary, and the same seed writes the same weights."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers

from paged_batch import PagedKV, reference_logits
from rtpllm.loader import load_model_and_tokenizer
from rtpllm.tools.checkpoint_shapes import SHAPES, tensor_specs
from rtpllm.tools.random_checkpoint import main, plan_shards

TINY_SHARD_GB = "0.0005"  # ~0.5 MB: forces several shards even for a tiny model


@pytest.mark.parametrize("shape", ["llama-3.1-8b", "qwen2.5-7b", "qwen3-0.6b", "mistral-7b"])
def test_tiny_checkpoint_loads_in_rtpllm_and_transformers(shape, tmp_path, capsys):
    out = str(tmp_path / shape)
    main(["--shape", shape, "--tiny", "--out", out, "--max-shard-gb", TINY_SHARD_GB, "--device", "cpu"])
    assert out in capsys.readouterr().out
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        assert len(set(json.load(f)["weight_map"].values())) > 1
    loaded = load_model_and_tokenizer(out)
    tiny = SHAPES[shape].tiny()
    assert loaded.arch.architecture == tiny.architecture and loaded.arch.vocab_size == tiny.vocab_size
    assert loaded.arch.tie_word_embeddings == tiny.tie_word_embeddings
    assert len(loaded.tokenizer) == tiny.vocab_size  # every id a random model may sample decodes
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("rtp-llm benchmarks", add_special_tokens=False)) == \
        "rtp-llm benchmarks"

    prompt = loaded.tokenizer.encode("The quick brown fox jumps over the lazy dog")
    reference = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = PagedKV(loaded.arch, num_blocks=8, block_size=16).run(loaded.model, {0: prompt})[0]
    assert (ours - reference_logits(reference, prompt)).abs().max().item() < 1e-4


def test_same_seed_same_weights_and_full_size_parameter_counts(tmp_path):
    for name in ("a", "b"):
        main(["--shape", "qwen3-8b", "--tiny", "--out", str(tmp_path / name), "--device", "cpu", "--seed", "3"])
    first = (tmp_path / "a" / "model-00001-of-00001.safetensors").read_bytes()
    assert first == (tmp_path / "b" / "model-00001-of-00001.safetensors").read_bytes()
    assert round(SHAPES["llama-3.1-8b"].num_parameters / 1e9, 2) == 8.03
    assert round(SHAPES["qwen3-8b"].num_parameters / 1e9, 2) == 8.19


def test_shard_plan_respects_the_size_limit():
    specs = tensor_specs(SHAPES["llama-3.1-8b"])
    shards = plan_shards(specs, 4 << 30)
    assert [i for shard in shards for i in shard] == list(range(len(specs)))
    sizes = [sum(2 * torch.Size(specs[i][1]).numel() for i in shard) for shard in shards]
    assert len(shards) == 4 and max(sizes) <= 4 << 30


def test_refuses_a_non_empty_output_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        main(["--shape", "llama-3.2-1b", "--tiny", "--out", str(tmp_path), "--device", "cpu"])

"""Loading Hugging Face folders: what comes back, and every way a folder can be broken."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from checkpoints import checkpoint_path
from rtpllm.loader import load_model_and_tokenizer


@pytest.fixture
def qwen3_copy(tmp_path):
    """A private copy of the tied Qwen3 checkpoint that a test may break."""
    return shutil.copytree(checkpoint_path("qwen3"), tmp_path / "qwen3")


def _edit_config(folder, **changes):
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


def test_folder_loads_model_tokenizer_and_generation_config():
    loaded = load_model_and_tokenizer(checkpoint_path("qwen3"))
    assert loaded.arch.architecture == "Qwen3ForCausalLM" and loaded.arch.qk_norm
    assert loaded.arch.tie_word_embeddings and loaded.model.lm_head is None
    assert loaded.generation_config["eos_token_id"] == [509, 511]
    assert loaded.arch.eos_token_ids == (509, 511)
    chat = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                                tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("Hello, wörld")) == "Hello, wörld"
    assert not loaded.model.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in loaded.model.parameters())


def test_sharded_bf16_checkpoint_fills_fused_projections():
    path = checkpoint_path("hd128_sharded")
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    model = load_model_and_tokenizer(path).model
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]

    def stored(name):
        with safe_open(os.path.join(path, weight_map[name]), framework="pt") as f:
            return f.get_tensor(name).float()

    prefix = "model.layers.1.self_attn"
    expected_bias = torch.cat([stored(f"{prefix}.{p}.bias") for p in ("q_proj", "k_proj", "v_proj")])
    assert torch.equal(model.model.layers[1].self_attn.qkv_proj.bias, expected_bias)
    expected_up = stored("model.layers.0.mlp.up_proj.weight")
    assert torch.equal(model.model.layers[0].mlp.gate_up_proj.weight[256:], expected_up)


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist does not exist"):
        load_model_and_tokenizer(str(tmp_path / "does-not-exist"))


def test_missing_config_json(qwen3_copy):
    os.remove(qwen3_copy / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json: not found"):
        load_model_and_tokenizer(str(qwen3_copy))


def test_corrupt_config_json(qwen3_copy):
    (qwen3_copy / "config.json").write_text('{"architectures": ["Qwen3ForCausalLM"], "hidden_size": 6')
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        load_model_and_tokenizer(str(qwen3_copy))


def test_unsupported_architecture(qwen3_copy):
    _edit_config(qwen3_copy, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match="architecture 'GPT2LMHeadModel' is not supported"):
        load_model_and_tokenizer(str(qwen3_copy))


def test_unsupported_rope_scaling(qwen3_copy):
    _edit_config(qwen3_copy, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6})
    with pytest.raises(ValueError, match="rope type 'yarn' is not supported"):
        load_model_and_tokenizer(str(qwen3_copy))


def test_corrupt_safetensors(qwen3_copy):
    weights = qwen3_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="model.safetensors: not a valid safetensors file"):
        load_model_and_tokenizer(str(qwen3_copy))


def test_missing_shard(tmp_path):
    folder = shutil.copytree(checkpoint_path("hd128_sharded"), tmp_path / "sharded")
    os.remove(folder / "model-00003-of-00008.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.*model-00003-of-00008.safetensors"):
        load_model_and_tokenizer(str(folder))


def test_missing_weights(qwen3_copy):
    os.remove(qwen3_copy / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_model_and_tokenizer(str(qwen3_copy))


def test_missing_tensor_is_named(qwen3_copy):
    state = load_file(qwen3_copy / "model.safetensors")
    del state["model.layers.1.mlp.gate_proj.weight"]
    save_file(state, qwen3_copy / "model.safetensors")
    with pytest.raises(ValueError, match="missing 1 tensor.*model.layers.1.mlp.gate_proj.weight"):
        load_model_and_tokenizer(str(qwen3_copy))


def test_unexpected_tensor_is_named(qwen3_copy):
    state = load_file(qwen3_copy / "model.safetensors")
    state["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    save_file(state, qwen3_copy / "model.safetensors")
    with pytest.raises(ValueError, match="model.layers.0.self_attn.o_proj.bias: unexpected tensor"):
        load_model_and_tokenizer(str(qwen3_copy))


def test_shape_mismatch_is_named(qwen3_copy):
    _edit_config(qwen3_copy, intermediate_size=96)
    with pytest.raises(ValueError, match=r"mlp.(gate|up|down)_proj.weight: checkpoint shape .* does not match"):
        load_model_and_tokenizer(str(qwen3_copy))


def test_missing_tokenizer(qwen3_copy):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        os.remove(qwen3_copy / name)
    with pytest.raises(FileNotFoundError, match="tokenizer: none of"):
        load_model_and_tokenizer(str(qwen3_copy))


def test_neither_folder_nor_gguf(tmp_path):
    stray = tmp_path / "weights.bin"
    stray.write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="neither a Hugging Face model folder nor a .gguf file"):
        load_model_and_tokenizer(str(stray))

"""GGUF loading: our dequantizers against gguf-py, the q/k un-permutation, tiny GGUF files written
from the test checkpoints against transformers, and bad files."""

from __future__ import annotations

import random

import gguf
import numpy as np
import pytest
import torch
import transformers

from checkpoints import checkpoint_path, load_hf_reference
from gguf_checkpoints import llama_cpp_permute, write_gguf
from paged_batch import PagedKV, reference_logits
from rtpllm.loader import build_model, load_model_and_tokenizer
from rtpllm.loader.gguf_checkpoint import GGUFCheckpoint
from rtpllm.loader.gguf_names import unpermute_qk
from rtpllm.loader.gguf_quants import dequantize

Q = gguf.GGMLQuantizationType
TOLERANCE = 1e-4


def _random_raw(qtype: Q, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes of a [rows, cols] tensor of `qtype`: every bit pattern in the quants, finite
    random float16 scales (a random scale could be NaN, which would not compare)."""
    if qtype in (Q.F32, Q.F16):
        return rng.standard_normal((rows, cols)).astype(np.float32 if qtype == Q.F32 else np.float16)
    if qtype == Q.BF16:
        return gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), Q.BF16)
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows * cols // block_values, block_bytes), dtype=np.uint8)
    num_scales = 2 if qtype == Q.Q4_1 else 1  # Q4_1 also stores a float16 minimum
    scales = (rng.standard_normal((blocks.shape[0], num_scales)) * 0.1).astype(np.float16)
    blocks[:, :2 * num_scales] = scales.view(np.uint8)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("host_decoder", [True, False], ids=["cpp", "torch"])
@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda t: t.name)
def test_dequantize_matches_gguf_reference_bit_for_bit(qtype, host_decoder):
    rng = np.random.default_rng(int(qtype))
    rows, cols = 19, 96  # 3 blocks of 32 per row
    raw = _random_raw(qtype, 2 * rows, cols, rng)
    expected = gguf.quants.dequantize(raw[::2], qtype).astype(np.float32).reshape(rows, cols)
    every_other_row = torch.from_numpy(raw.view(np.uint8))[::2]  # a non-contiguous input
    ours = dequantize(every_other_row, qtype, (rows, cols), host_decoder=host_decoder)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, torch.from_numpy(expected))


def test_host_decoder_converts_every_float16_bit_pattern():
    # Subnormals, infinities and NaNs included: the C++ decoder converts float16 itself.
    bits = np.arange(1 << 16, dtype=np.uint16)
    ours = dequantize(torch.from_numpy(bits.view(np.uint8)), Q.F16, (1 << 16,))
    expected = torch.from_numpy(bits.view(np.float16).astype(np.float32))
    assert torch.equal(ours.view(torch.int32)[~expected.isnan()], expected.view(torch.int32)[~expected.isnan()])
    assert torch.equal(ours.isnan(), expected.isnan())


def test_dequantize_rejects_wrong_byte_count():
    with pytest.raises(ValueError, match="blk.0.attn_q.weight.*Q8_0.*corrupt"):
        dequantize(torch.zeros(33, dtype=torch.uint8), Q.Q8_0, (1, 32), "blk.0.attn_q.weight")


def test_unpermute_inverts_llama_cpp_permutation():
    weight = torch.randn(9 * 64, 40)
    bias = torch.randn(3 * 64)
    assert torch.equal(unpermute_qk(torch.from_numpy(llama_cpp_permute(weight.numpy(), 9)), 9), weight)
    assert torch.equal(unpermute_qk(torch.from_numpy(llama_cpp_permute(bias.numpy(), 3)), 3), bias)


def _compare_on_prompts(ours, arch, reference_fn, vocab, seed=0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in (11, 5)]
    logits = PagedKV(arch, num_blocks=16, block_size=4, seed=seed).run(ours, dict(enumerate(prompts)))
    for seq, prompt in enumerate(prompts):
        diff = (logits[seq] - reference_fn(prompt)).abs().max().item()
        assert diff < TOLERANCE, f"seq {seq}: max abs logit diff {diff:.2e}"


# llama3: rope_freqs + q/k permutation; qwen2: biases, padded vocab; qwen3: q/k norm, tied; gqa9x3: 9/3 heads.
@pytest.mark.parametrize("variant", ["llama3", "qwen2", "qwen3", "gqa9x3"])
def test_float32_gguf_matches_the_hf_checkpoint(variant, tmp_path):
    hf_path = checkpoint_path(variant)
    path = write_gguf(hf_path, str(tmp_path / f"{variant}.gguf"))
    loaded = load_model_and_tokenizer(path)
    from_hf = load_model_and_tokenizer(hf_path)
    for field in ("architecture", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "vocab_size", "qkv_bias", "qk_norm", "tie_word_embeddings"):
        assert getattr(loaded.arch, field) == getattr(from_hf.arch, field), field
    # Text only: whether transformers' GGUF tokenizer prepends BOS differs across its versions.
    text = "Hello there, wörld!"
    assert loaded.tokenizer.encode(text, add_special_tokens=False) == from_hf.tokenizer.encode(
        text, add_special_tokens=False)
    assert loaded.arch.bos_token_id == from_hf.arch.bos_token_id
    assert loaded.tokenizer.chat_template == from_hf.tokenizer.chat_template
    assert loaded.generation_config["eos_token_id"] == from_hf.arch.eos_token_ids[0]
    reference = load_hf_reference(hf_path)
    _compare_on_prompts(loaded.model, loaded.arch, lambda p: reference_logits(reference, p), loaded.arch.vocab_size)


def test_q4_0_gguf_matches_transformers_gguf_loader(tmp_path):
    # Mistral converts to the `llama` GGUF architecture (permuted q/k, here 4 heads over 1 KV head).
    path = write_gguf(checkpoint_path("mistral"), str(tmp_path / "mistral-q4_0.gguf"), matrix_type=Q.Q4_0)
    loaded = load_model_and_tokenizer(path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="mistral-q4_0.gguf", dtype=torch.float32).eval()
    _compare_on_prompts(loaded.model, loaded.arch, lambda p: reference_logits(reference, p), loaded.arch.vocab_size)


def test_unsupported_tensor_type_is_named(tmp_path):
    path = write_gguf(checkpoint_path("hd128_sharded"), str(tmp_path / "q6k.gguf"),
                      type_overrides={"blk.1.ffn_down.weight": Q.Q6_K})
    with pytest.raises(ValueError, match=r"blk\.1\.ffn_down\.weight.*Q6_K is not supported"):
        load_model_and_tokenizer(path)


def test_unsupported_gguf_architecture_is_named(tmp_path):
    path = write_gguf(checkpoint_path("gqa9x3"), str(tmp_path / "gpt2.gguf"), architecture_override="gpt2")
    with pytest.raises(ValueError, match="general.architecture 'gpt2' is not supported"):
        load_model_and_tokenizer(path)


def test_corrupt_and_truncated_gguf_files_are_rejected(tmp_path):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ValueError, match="garbage.gguf: not a valid GGUF file"):
        load_model_and_tokenizer(str(garbage))
    whole = open(write_gguf(checkpoint_path("gqa9x3"), str(tmp_path / "whole.gguf")), "rb").read()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(ValueError, match="truncated.gguf: not a valid GGUF file"):
        load_model_and_tokenizer(str(truncated))


@pytest.mark.parametrize("matrix_type", [Q.Q4_1, Q.Q8_0, Q.F16], ids=lambda t: t.name)
def test_host_load_into_parameters_matches_dequantize_then_copy(matrix_type, tmp_path):
    # The CPU path decodes straight into the parameters (q/k rows un-permuted by the C++ decoder);
    # the device path dequantizes with tensor ops, un-permutes, then copies: bit-identical weights.
    path = write_gguf(checkpoint_path("llama3"), str(tmp_path / "llama3.gguf"), matrix_type=matrix_type)
    checkpoint = GGUFCheckpoint(path)
    arch = checkpoint.arch()
    direct = load_model_and_tokenizer(path).model
    copied = build_model(arch, torch.float32, torch.device("cpu"), checkpoint.weights(arch, "cpu"))
    for (name, ours), (_, theirs) in zip(direct.named_parameters(), copied.named_parameters()):
        assert torch.equal(ours, theirs), name

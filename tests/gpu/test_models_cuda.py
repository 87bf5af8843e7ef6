"""The model on a CUDA device: float32 matches transformers as on the CPU, and bfloat16 (the GPU
default) stays close to it. Skipped without a GPU; run on the device machine."""

from __future__ import annotations

import os
import random
import sys

import pytest
import torch

import gguf

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "py"))
from checkpoints import VARIANTS, checkpoint_path, load_hf_reference  # noqa: E402
from gguf_checkpoints import write_gguf  # noqa: E402
from paged_batch import PagedKV, reference_logits  # noqa: E402
from rtpllm.loader import load_model_and_tokenizer  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _prompts(vocab_size: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(vocab_size) for _ in range(n)] for n in (9, 1, 16, 70)]


def _run(model, arch, prompts, dtype):
    kv = PagedKV(arch, num_blocks=64, block_size=16, dtype=dtype, device="cuda")
    return kv.run(model, dict(enumerate(prompts)))


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request):
    return request.param


def test_float32_on_cuda_matches_transformers(variant):
    torch.backends.cuda.matmul.allow_tf32 = False
    path = checkpoint_path(variant)
    loaded = load_model_and_tokenizer(path, dtype=torch.float32, device="cuda")
    assert loaded.model.model.rotary.cos_sin_cache.device.type == "cuda"
    reference = load_hf_reference(path)
    prompts = _prompts(loaded.arch.vocab_size)
    for seq, logits in _run(loaded.model, loaded.arch, prompts, torch.float32).items():
        diff = (logits - reference_logits(reference, prompts[seq])).abs().max().item()
        assert diff < 1e-4, f"seq {seq}: max abs logit diff {diff:.2e}"


def test_bfloat16_on_cuda_stays_close_to_float32(variant):
    path = checkpoint_path(variant)
    bf16 = load_model_and_tokenizer(path, dtype=torch.bfloat16, device="cuda")
    assert all(p.dtype == torch.bfloat16 for p in bf16.model.parameters())
    assert bf16.model.model.rotary.cos_sin_cache.dtype == torch.float32
    reference = load_hf_reference(path)
    prompts = _prompts(bf16.arch.vocab_size)
    agree = total = 0
    for seq, logits in _run(bf16.model, bf16.arch, prompts, torch.bfloat16).items():
        expected = reference_logits(reference, prompts[seq])
        scale = expected.abs().max().item()
        # bf16 keeps 8 bits of mantissa; over two layers of these deliberately large random
        # weights the logits move by a few percent of their range (0.3 of 5.7 seen on an H100).
        assert (logits - expected).abs().max().item() < 0.1 * scale
        agree += int((logits.argmax(-1) == expected.argmax(-1)).sum())
        total += len(prompts[seq])
    assert agree / total > 0.9


def test_gguf_dequantizes_on_the_gpu_like_on_the_cpu(tmp_path):
    path = write_gguf(checkpoint_path("mistral"), str(tmp_path / "mistral-q4_0.gguf"),
                      matrix_type=gguf.GGMLQuantizationType.Q4_0)
    on_gpu = load_model_and_tokenizer(path, dtype=torch.float32, device="cuda").model
    on_cpu = load_model_and_tokenizer(path, dtype=torch.float32, device="cpu").model
    for (name, gpu_param), (_, cpu_param) in zip(on_gpu.named_parameters(), on_cpu.named_parameters()):
        assert gpu_param.device.type == "cuda"
        assert torch.equal(gpu_param.cpu(), cpu_param), name

"""Our model over a hand-made paged KV cache against transformers, in float32 on the CPU, for
every variant: one batched prefill of prompts of different lengths, decode steps after it, and a
prefill split into chunks while another sequence decodes."""

from __future__ import annotations

import random

import pytest
import torch

from checkpoints import VARIANTS, checkpoint_path, load_hf_reference
from paged_batch import PagedKV, reference_logits
from rtpllm.loader import load_model_and_tokenizer

TOLERANCE = 1e-4  # max abs logit difference, float32
PROMPT_LENGTHS = (9, 1, 16, 70)  # 16 fills exactly 4 blocks of 4; 70 spans 18 blocks
BLOCK_SIZE = 4


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def models(request):
    path = checkpoint_path(request.param)
    loaded = load_model_and_tokenizer(path, dtype=torch.float32, device="cpu")
    return loaded.model, loaded.arch, load_hf_reference(path)


def _prompts(vocab_size: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(n)] for n in PROMPT_LENGTHS]


def _assert_close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    assert ours.shape == theirs.shape, what
    diff = (ours - theirs).abs().max().item()
    assert diff < TOLERANCE, f"{what}: max abs logit diff {diff:.2e}"


def test_batched_prefill_then_decode_matches_transformers(models):
    model, arch, reference = models
    prompts = _prompts(arch.vocab_size)
    kv = PagedKV(arch, num_blocks=64, block_size=BLOCK_SIZE)
    sequences = [list(p) for p in prompts]
    ours = {seq: [rows] for seq, rows in kv.run(model, dict(enumerate(prompts))).items()}
    for _ in range(4):
        step = {}
        for seq, chunks in ours.items():
            token = int(chunks[-1][-1].argmax())
            sequences[seq].append(token)
            step[seq] = [token]
        for seq, rows in kv.run(model, step).items():
            ours[seq].append(rows)
    for seq, tokens in enumerate(sequences):
        # Causal: transformers' logits of the final sequence cover every step's positions.
        theirs = reference_logits(reference, tokens)
        got = torch.cat(ours[seq])
        _assert_close(got[:len(prompts[seq])], theirs[:len(prompts[seq])], f"prefill of seq {seq}")
        _assert_close(got[len(prompts[seq]):], theirs[len(prompts[seq]):], f"decode of seq {seq}")


def test_chunked_prefill_alongside_decode_matches_transformers(models):
    model, arch, reference = models
    long_prompt, short_prompt = _prompts(arch.vocab_size, seed=1)[3], _prompts(arch.vocab_size, seed=2)[0]
    kv = PagedKV(arch, num_blocks=64, block_size=BLOCK_SIZE, seed=3)
    chunks = [long_prompt[:6], long_prompt[6:31], long_prompt[31:]]  # ends mid-block, then crosses blocks
    decoded = list(short_prompt)
    long_rows, short_rows = [], []
    for i, chunk in enumerate(chunks):
        # The short sequence prefills in the first step and decodes in the later ones.
        step = {0: chunk, 1: short_prompt if i == 0 else [decoded[-1]]}
        logits = kv.run(model, step)
        long_rows.append(logits[0])
        short_rows.append(logits[1])
        decoded.append(int(logits[1][-1].argmax()))
    _assert_close(torch.cat(long_rows), reference_logits(reference, long_prompt), "chunked prefill")
    _assert_close(torch.cat(short_rows), reference_logits(reference, decoded[:-1]), "decode beside chunks")


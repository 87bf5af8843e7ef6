"""The sampler's two-stage argmax on CUDA equals torch's argmax on the CPU (the first of tied
maxima), on real vocabulary sizes, with ties planted inside one chunk and across chunks."""

import pytest
import torch

from rtpllm.layers.sampler import argmax_rows

VOCABS = [128256, 151936, 49152, 32000, 16411]  # Llama 3, Qwen, SmolLM2, Llama 2, a prime (no chunking)


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("rows", [1, 3, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_matches_cpu_argmax_with_ties(vocab, rows, dtype):
    gen = torch.Generator().manual_seed(vocab + rows)
    logits = torch.randn(rows, vocab, generator=gen).to(dtype)
    top = logits.max() + 1
    # Row 0: a tie across chunks (the later one must lose); row 1: a tie in adjacent entries.
    logits[0, vocab - 5] = top
    logits[0, 7] = top
    if rows > 1:
        logits[1, vocab // 2] = top
        logits[1, vocab // 2 + 1] = top
    expected = logits.argmax(dim=-1)
    got = argmax_rows(logits.cuda())
    assert got.dtype == torch.int64 and got.shape == (rows,)
    assert torch.equal(got.cpu(), expected)

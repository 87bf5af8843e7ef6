"""The sampler on a CUDA device: one step never synchronizes with the GPU (no hidden .item() or
host copy), whatever the mix of greedy, filtered, seeded, penalized and logprob rows."""

import torch

from rtpllm.layers.sampler import Sampler
from rtpllm.layers.sampling_batch import SamplingBatch, make_request_generator
from rtpllm.sampling_params import SamplingParams


def make_batch(params, device, prompts, outputs, **kwargs):
    generators = [make_request_generator(p.seed, device) if p.seed is not None else None for p in params]
    return SamplingBatch.build(params, prompts, outputs, generators, device, **kwargs)


def test_sampler_never_waits_for_the_gpu():
    device = "cuda"
    params = [SamplingParams(temperature=0.0), SamplingParams(top_k=20, top_p=0.9, min_p=0.05, seed=1, logprobs=3),
              SamplingParams(repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.3),
              SamplingParams(temperature=0.8, top_k=5)]
    batch = make_batch(params, device, prompts=[[1], [2], [3, 4], [5]], outputs=[[6], [7], [8, 8], [9]],
                       banned_token_ids=[[0], None, [1, 2], None], default_generator=torch.Generator(device))
    logits = torch.randn(4, 1000, device=device)
    sampler = Sampler()
    sampler(logits, batch)  # warm-up: first calls may allocate
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sampler(logits, batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")

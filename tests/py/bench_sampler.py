"""Sampler step time (SamplingBatch.build + Sampler call) against the floor of a bare argmax.

    python tests/py/bench_sampler.py [cpu|cuda] [--threads N]

"peaked" logits look like a language model's (a few likely tokens, the nucleus well inside the
first 64); "flat" ones are the worst case for top-p (the nucleus spans thousands of tokens).
"""

import argparse
import time

import torch

from rtpllm.layers.sampler import Sampler
from rtpllm.layers.sampling_batch import SamplingBatch
from rtpllm.sampling_params import SamplingParams

SETTINGS = {
    "greedy": SamplingParams(temperature=0.0),
    "top_k+top_p": SamplingParams(temperature=0.8, top_k=50, top_p=0.95),
    "top_p+min_p": SamplingParams(temperature=0.8, top_p=0.95, min_p=0.05),
    "penalties": SamplingParams(temperature=0.8, top_p=0.95, repetition_penalty=1.1, frequency_penalty=0.2),
}


def make_logits(n: int, vocab: int, shape: str, device: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(n, vocab, generator=gen)
    if shape == "peaked":
        logits[:, :8] += torch.linspace(12.0, 8.0, 8)  # ~all mass on a handful of tokens
    return logits.to(device)


def best_time(fn, device: str, iters: int) -> float:
    fn()
    best = float("inf")
    for _ in range(iters):  # the minimum: robust to other load on a shared machine
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("device", nargs="?", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    shapes = [(1, 49152), (16, 49152), (64, 151936)] + ([(256, 151936)] if device == "cuda" else [])
    iters = 20 if device == "cuda" else 5
    sampler = Sampler()
    generator = torch.Generator(device).manual_seed(0)
    print(f"device={device} threads={torch.get_num_threads()}  times in ms (best of {iters})")
    for n, vocab in shapes:
        prompts = [list(range(r, r + 512)) for r in range(n)]
        outputs = [list(range(r, r + 256)) for r in range(n)]
        for shape in ("peaked", "flat"):
            logits = make_logits(n, vocab, shape, device)
            floor = best_time(lambda: logits.argmax(dim=-1), device, iters)
            cells = []
            for name, params in SETTINGS.items():
                def step():
                    batch = SamplingBatch.build([params] * n, prompts, outputs, [None] * n, device,
                                                default_generator=generator)
                    return sampler(logits, batch)
                cells.append(f"{name} {best_time(step, device, iters):7.3f}")
            params = SETTINGS["penalties"]
            build = best_time(lambda: SamplingBatch.build([params] * n, prompts, outputs, [None] * n, device,
                                                          default_generator=generator), device, iters)
            print(f"n={n:4d} vocab={vocab:6d} {shape:6s} argmax {floor:7.3f} | " + " | ".join(cells)
                  + f" | build(penalties) {build:7.3f}")


if __name__ == "__main__":
    main()

"""The engine's per-token streaming work, without a model: what `Engine._apply` does for a streamed
request at every step (append the token, detokenize, check stop strings, build the RequestOutput).

With 500 streaming clients this runs on the step thread for every token, and the step thread
shares the GIL with the server's event loop; `bench throughput` (not streamed) decodes each text
once at the end instead. Prints microseconds per token, the median of --repeats runs.

Usage: python bench/serving/streaming_work.py MODEL_DIR [--requests 500] [--tokens 128] [--repeats 5]
(MODEL_DIR: any folder with a tokenizer, e.g. the tiny Llama that server_vs_offline.sh writes)
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from transformers import AutoTokenizer

from rtpllm.engine.detokenizer import IncrementalDetokenizer, StopStringChecker
from rtpllm.engine.request_state import RequestGroup, SequenceState
from rtpllm.outputs import RequestMetrics
from rtpllm.sampling_params import SamplingParams


def run_once(tokenizer, ordinary: list[int], requests: int, tokens: int, stop: list[str], seed: int) -> float:
    rng = random.Random(seed)
    params = SamplingParams(max_tokens=tokens, ignore_eos=True, stop=stop or None)
    groups = []
    for r in range(requests):
        prompt = [rng.choice(ordinary) for _ in range(32)]
        group = RequestGroup(request_id=str(r), prompt=None, prompt_ids=prompt, params=params,
                             metrics=RequestMetrics(arrival_time=0.0))
        group.seqs.append(SequenceState(
            seq_id=r, index=0, group=group, params=params, detokenizer=IncrementalDetokenizer(tokenizer, prompt),
            stop_checker=StopStringChecker(stop) if stop else None, generator=None))
        groups.append(group)
    sampled = [[rng.choice(ordinary) for _ in range(tokens)] for _ in range(requests)]
    start = time.perf_counter()
    for step in range(tokens):
        for group, ids in zip(groups, sampled):
            seq = group.seqs[0]
            seq.append_tokens(ids[step:step + 1], None)
            if step == tokens - 1:
                seq.finish("length")
            group.to_output()
    return (time.perf_counter() - start) / (requests * tokens) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    special = set(tokenizer.all_special_ids)
    ordinary = [i for i in range(len(tokenizer)) if i not in special]
    for label, stop in (("no stop strings", []), ("one stop string", ["zzzzqq"])):
        runs = [run_once(tokenizer, ordinary, args.requests, args.tokens, stop, seed) for seed in range(args.repeats)]
        print(f"{label}: {statistics.median(runs):.2f} us per token (runs: {', '.join(f'{r:.2f}' for r in runs)})")


if __name__ == "__main__":
    main()

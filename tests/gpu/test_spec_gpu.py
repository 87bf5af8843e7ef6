"""Speculative decoding on the GPU path (bf16, CUDA kernels, decode CUDA graphs on): the verify
step runs k + 1 query tokens per sequence through the prefill/extend kernel.

In bf16 the verify step (extend kernel) and a plain decode step (decode kernel) round differently,
so greedy outputs may part at a near-tie: every divergence must sit where the float32 reference's
top two logits are within 0.5 (as tests/gpu/test_engine_gpu.py judges the GPU engine itself).
"""

import json
import os
import random
import sys

import numpy as np
import pytest
import torch
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "py"))
from test_spec_verifier import CHI2_CRITICAL, chi_square, filtered  # noqa: E402

from rtpllm import LLM, SamplingParams  # noqa: E402
from rtpllm.layers.sampling_batch import SamplingBatch  # noqa: E402
from rtpllm.spec.oracle import OracleProposer  # noqa: E402
from rtpllm.spec.verifier import VerifyLayout, verify  # noqa: E402
from rtpllm.tools.bpe_tokenizer import build_bpe_tokenizer  # noqa: E402
from rtpllm.tools.eagle3_checkpoint import write_eagle3_checkpoint  # noqa: E402

VOCAB = 1024
NEW_TOKENS = 48
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
# Small fixed pools: several engines live at once in this file (the default sizing takes 90% of the card).
POOL = dict(max_model_len=1024, num_blocks=1024, max_num_seqs=16)


def write_checkpoint(path, hidden, layers, heads, kv_heads, seed):
    tokenizer = build_bpe_tokenizer(VOCAB, add_bos=False)
    config = transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, vocab_size=VOCAB, max_position_embeddings=2048, rms_norm_eps=1e-6,
        initializer_range=0.05, rope_theta=500000.0, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    target = str(tmp_path_factory.mktemp("target"))
    reference = write_checkpoint(target, 1024, 4, 8, 2, seed=0).cuda().eval()
    draft = str(tmp_path_factory.mktemp("draft"))
    write_checkpoint(draft, 256, 2, 4, 2, seed=1)
    with open(os.path.join(target, "config.json")) as f:
        config = json.load(f)
    eagle = write_eagle3_checkpoint(str(tmp_path_factory.mktemp("eagle3")), config, draft_vocab_size=256,
                                    dtype=torch.bfloat16, std=0.05)
    rng = random.Random(0)
    prompts = [[rng.randrange(VOCAB) for _ in range(n)] for n in (7, 64, 200, 333)]
    prompts.append(prompts[0] * 6)
    plain = LLM(model=target, **POOL)
    expected = [list(o.outputs[0].token_ids) for o in plain.generate(prompts, GREEDY)]
    del plain
    return dict(target=target, draft=draft, eagle=eagle, reference=reference, prompts=prompts, expected=expected)


def assert_agrees(models, outputs, want_outputs=None, params=None) -> bool:
    """Every output is the plain run's (`want_outputs`, default models["expected"]), or parts from
    it only at a near-tie, judged on the float32 reference's logits (after the penalties of
    `params`, one SamplingParams per prompt, where given); True when all agree exactly."""
    from rtpllm.layers.sampler import apply_penalties
    exact = True
    want_outputs = models["expected"] if want_outputs is None else want_outputs
    params = params if params is not None else [None] * len(want_outputs)
    for prompt, want, out, p in zip(models["prompts"], want_outputs, outputs, params):
        got = list(out.outputs[0].token_ids)
        if got == want:
            continue
        exact = False
        j = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
        with torch.inference_mode():  # apply_penalties writes in place, as it does inside the engine
            logits = models["reference"](torch.tensor([prompt + want[:j]], device="cuda")).logits[0, -1:].float()
            if p is not None:
                batch = SamplingBatch.build([p], [prompt], [want[:j]], [None], "cuda")
                if batch.use_penalties:
                    apply_penalties(logits, batch)
        top2 = logits[0].topk(2).values
        assert float(top2[0] - top2[1]) < 0.5, f"diverged at output {j} without a near-tie ({top2.tolist()})"
    return exact


def full_acceptance_floor(exact: bool) -> float:
    # A draft that is the target accepts everything while the run follows the plain one. After a
    # bf16 near-tie the two kernels (decode vs the multi-token verify) may pick different tokens, and
    # every later draft of that sequence proposes the other continuation, so fewer are accepted.
    return 0.95 if exact else 0.75


@pytest.mark.parametrize("method", ["ngram", "draft_model", "draft_model_self", "eagle3"])
def test_greedy_agrees_with_plain_decoding_graphs_on(models, method):
    config = dict(method="draft_model" if method.startswith("draft") else method, num_speculative_tokens=4,
                  adaptive=False)
    if method == "draft_model":
        config["model"] = models["draft"]
    elif method == "draft_model_self":
        config["model"] = models["target"]
    elif method == "eagle3":
        config["model"] = models["eagle"]
    llm = LLM(model=models["target"], speculative_config=config, **POOL)
    assert llm.engine.runner.graphs is not None
    outputs = llm.generate(models["prompts"], GREEDY)
    exact = assert_agrees(models, outputs)
    counters = llm.engine.stats().spec
    assert counters.num_draft_tokens > 0
    if method == "draft_model_self":
        assert counters.num_accepted_tokens >= full_acceptance_floor(exact) * counters.num_draft_tokens, counters
    assert llm.engine.check_kv_pool_free()


@pytest.mark.parametrize("length", [333, 520, 700])
def test_one_long_prompt_alone_agrees_with_plain_decoding(models, length):
    """Batch 1 over a long context: the decode kernels cut it into the most splits, and the verify
    step reads k + 1 rows per split. (The batched test above has at most 333 tokens among five
    prompts; a PD decode instance that speculated over a ~500-token prompt alone went wrong on an
    H100 while this path was not tested.)"""
    rng = random.Random(length)
    prompt = [rng.randrange(VOCAB) for _ in range(length)]
    plain = LLM(model=models["target"], **POOL)
    want = [list(plain.generate([prompt], GREEDY)[0].outputs[0].token_ids)]
    del plain
    config = dict(method="draft_model", model=models["target"], num_speculative_tokens=3, adaptive=False)
    llm = LLM(model=models["target"], speculative_config=config, **POOL)
    exact = assert_agrees({**models, "prompts": [prompt]}, llm.generate([prompt], GREEDY), want)
    counters = llm.engine.stats().spec
    assert counters.num_accepted_tokens >= full_acceptance_floor(exact) * counters.num_draft_tokens, counters


def test_oracle_full_acceptance_on_the_gpu(models):
    llm = LLM(model=models["target"], speculative_config=dict(method="ngram", num_speculative_tokens=4, adaptive=False),
              **POOL)
    full = [p + e for p, e in zip(models["prompts"], models["expected"])]
    llm.engine.spec.proposer = OracleProposer(full, torch.device("cuda"), 1.0)
    exact = assert_agrees(models, llm.generate(models["prompts"], GREEDY))
    counters = llm.engine.stats().spec
    assert counters.num_accepted_tokens >= full_acceptance_floor(exact) * counters.num_draft_tokens, counters


@pytest.mark.parametrize("method", ["oracle", "eagle3"])
def test_verify_graphs_agree(models, method, monkeypatch):
    """The opt-in verify-step CUDA graphs (RTPLLM_SPEC_VERIFY_GRAPHS=1) give the eager verify's answers."""
    monkeypatch.setenv("RTPLLM_SPEC_VERIFY_GRAPHS", "1")
    config = dict(method="ngram" if method == "oracle" else method, num_speculative_tokens=4, adaptive=False)
    if method == "eagle3":
        config["model"] = models["eagle"]
    llm = LLM(model=models["target"], speculative_config=config, **POOL)
    assert llm.engine.runner.verify_graphs is not None
    if method == "oracle":
        full = [p + e for p, e in zip(models["prompts"], models["expected"])]
        llm.engine.spec.proposer = OracleProposer(full, torch.device("cuda"), 0.7, VOCAB)
    assert_agrees(models, llm.generate(models["prompts"], GREEDY))
    assert llm.engine.stats().spec.num_accepted_tokens > 0 or method == "eagle3"
    assert llm.engine.check_kv_pool_free()


def test_random_sampling_with_speculation_runs(models):
    llm = LLM(model=models["target"], speculative_config=dict(method="draft_model", model=models["target"],
                                                              num_speculative_tokens=3, adaptive=False), **POOL)
    params = SamplingParams(temperature=0.8, top_p=0.95, top_k=50, max_tokens=NEW_TOKENS, ignore_eos=True, seed=3)
    outputs = llm.generate(models["prompts"], params)
    assert all(len(o.outputs[0].token_ids) == NEW_TOKENS for o in outputs)
    counters = llm.engine.stats().spec
    assert counters.num_accepted_tokens > 0.5 * counters.num_draft_tokens  # same model: p == q mostly
    assert llm.engine.check_kv_pool_free()


def test_rejection_sampling_preserves_the_distribution_on_the_device():
    num_seqs, k = 20000, 3
    logits_row = [1.0, 0.2, -0.5, 2.0, 0.0, -1.5]
    q = torch.tensor([0.1, 0.3, 0.15, 0.2, 0.2, 0.05], device="cuda")
    layout = VerifyLayout.build(np.full(num_seqs, k), torch.device("cuda"))
    logits = torch.tensor(logits_row, device="cuda").repeat(layout.num_rows, 1)
    drafts = torch.multinomial(q, num_seqs * k, replacement=True)
    gen = torch.Generator(device="cuda").manual_seed(1)
    batch = SamplingBatch.build([SamplingParams(temperature=1.0)] * num_seqs, [[]] * num_seqs, [[]] * num_seqs,
                                [None] * num_seqs, "cuda", default_generator=gen)
    tokens, _ = verify(logits, layout, batch, drafts, q.repeat(num_seqs * k, 1))
    tokens = tokens.view(num_seqs, k + 1).cpu().numpy()
    p = filtered(logits_row, 1.0, 0)
    for position in range(2):
        emitted = tokens[:, position][tokens[:, position] >= 0]
        stat, dof = chi_square(emitted, p)
        assert stat < CHI2_CRITICAL[dof]


# ---------------------------------------------------------------------------- penalties
# Values that reward repetition make a random model loop on its recent tokens, where a verify row
# that ignored the drafts before it would pick differently (see tests/py/test_spec_penalties.py).
PENALISED = [SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, **p) for p in (
    dict(repetition_penalty=0.6), dict(presence_penalty=-1.5), dict(frequency_penalty=-1.0),
    dict(repetition_penalty=1.3, presence_penalty=0.8, frequency_penalty=0.6), {})]


@pytest.mark.parametrize("method", ["oracle", "draft_model_self"])
def test_penalised_greedy_agrees_with_plain_decoding(models, method):
    """Penalised sequences speculate (verify graphs on): the same tokens as decoding without
    speculation, and a proposer that knows the penalised continuation is accepted in full."""
    plain = LLM(model=models["target"], **POOL)
    want = [list(o.outputs[0].token_ids) for o in plain.generate(models["prompts"], PENALISED)]
    del plain
    config = dict(method="ngram", num_speculative_tokens=4, adaptive=False)
    if method == "draft_model_self":
        config.update(method="draft_model", model=models["target"])
    llm = LLM(model=models["target"], speculative_config=config, **POOL)
    assert llm.engine.runner.verify_graphs is not None
    if method == "oracle":
        full = [p + w for p, w in zip(models["prompts"], want)]
        llm.engine.spec.proposer = OracleProposer(full, torch.device("cuda"), 1.0)
    exact = assert_agrees(models, llm.generate(models["prompts"], PENALISED), want, PENALISED)
    counters = llm.engine.stats().spec
    assert counters.num_accepted_tokens >= full_acceptance_floor(exact) * counters.num_draft_tokens > 0, counters
    assert llm.engine.check_kv_pool_free()


def test_penalised_verify_rows_on_the_device_match_the_cpu():
    from rtpllm.spec.penalties import penalize_verify_rows
    rng = np.random.default_rng(0)
    vocab, counts = 32000, np.array([3, 0, 2, 8, 1, 5])
    params = [SamplingParams(repetition_penalty=1.4), SamplingParams(),
              SamplingParams(presence_penalty=0.7, frequency_penalty=0.3),
              SamplingParams(repetition_penalty=0.8, presence_penalty=-0.4, frequency_penalty=0.9),
              SamplingParams(frequency_penalty=1.1), SamplingParams(repetition_penalty=1.1)]
    prompts = [rng.integers(0, vocab, size=n).tolist() for n in (50, 3, 900, 1, 40, 7)]
    outputs = [rng.integers(0, 64, size=n).tolist() for n in (40, 2, 0, 700, 3, 30)]  # repeats: small id range
    drafts = torch.from_numpy(rng.integers(0, 64, size=int(counts.sum())))
    logits = torch.randn(int(counts.sum() + counts.size), vocab) * 3
    results = []
    for device in ("cpu", "cuda"):
        layout = VerifyLayout.build(counts, torch.device(device))
        sampling = SamplingBatch.build(params, prompts, outputs, [None] * len(params), device)
        results.append(penalize_verify_rows(logits.to(device), layout, sampling, drafts.to(device)).cpu())
    torch.testing.assert_close(results[1], results[0], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------- verify graphs, large batches
def test_verify_graphs_above_batch_16(models):
    """40 sequences with 4 drafts each replay the (48, 4) verify graph (batch <= 128 within 256 rows);
    greedy agrees with plain decoding. Prints the capture's time and memory."""
    rng = random.Random(5)
    prompts = [[rng.randrange(VOCAB) for _ in range(rng.randrange(5, 120))] for _ in range(40)]
    pool = dict(POOL, max_num_seqs=64)
    plain = LLM(model=models["target"], **pool)
    want = [list(o.outputs[0].token_ids) for o in plain.generate(prompts, GREEDY)]
    del plain
    llm = LLM(model=models["target"], speculative_config=dict(method="ngram", num_speculative_tokens=4,
                                                              adaptive=False), **pool)
    graphs = llm.engine.runner.verify_graphs
    assert graphs is not None and (48, 4) in graphs.shapes and graphs.buckets[-1] == 64  # max_num_seqs caps it
    print(f"verify graphs: {len(graphs.shapes)} shapes, batch <= {graphs.buckets[-1]}, "
          f"{graphs.capture_seconds:.2f} s, {graphs.capture_bytes / 2**20:.0f} MiB")
    replayed = []
    run = graphs.run
    graphs.run = lambda batch, drafts: replayed.append(batch.num_seqs) or run(batch, drafts)
    llm.engine.spec.proposer = OracleProposer([p + w for p, w in zip(prompts, want)], torch.device("cuda"), 1.0)
    outputs = llm.generate(prompts, GREEDY)
    exact = assert_agrees(dict(models, prompts=prompts, expected=want), outputs)
    assert max(replayed) > 16, replayed
    counters = llm.engine.stats().spec
    assert counters.num_accepted_tokens >= full_acceptance_floor(exact) * counters.num_draft_tokens > 0, counters
    assert llm.engine.check_kv_pool_free()

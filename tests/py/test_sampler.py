"""Sampler tests against direct (float64, loop-by-definition) reference implementations.

Each test runs on the CPU, and on CUDA too when a GPU is present (the code path is the same).
"""

import math

import numpy as np
import pytest
import torch

from rtpllm.layers.sampler import Sampler, apply_min_p, apply_penalties, apply_top_k, apply_top_p
from rtpllm.layers.sampling_batch import SamplingBatch, make_request_generator
from rtpllm.sampling_params import SamplingParams

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make_batch(params, device, prompts=None, outputs=None, generators=None, **kwargs):
    n = len(params)
    prompts = prompts if prompts is not None else [[] for _ in range(n)]
    outputs = outputs if outputs is not None else [[] for _ in range(n)]
    if generators is None:
        generators = [make_request_generator(p.seed, device) if p.seed is not None else None for p in params]
    return SamplingBatch.build(params, prompts, outputs, generators, device, **kwargs)


# ----------------------------------------------------------------------------- references

def ref_kept(logits_row, temperature, top_k, top_p, min_p):
    """The set of token ids that survive top-k, then top-p, then min-p, by their definitions."""
    logits = [float(x) / temperature for x in logits_row]
    kept = set(range(len(logits)))
    if top_k > 0:
        kth = sorted(logits, reverse=True)[min(top_k, len(logits)) - 1]
        kept = {i for i in kept if logits[i] >= kth}  # ties with the k-th are kept

    def probs_of(ids):
        peak = max(logits[i] for i in ids)
        weights = {i: math.exp(logits[i] - peak) for i in ids}
        total = sum(weights.values())
        return {i: w / total for i, w in weights.items()}

    if top_p < 1.0:
        probs = probs_of(kept)
        chosen, mass = [], 0.0
        for i in sorted(kept, key=lambda t: -probs[t]):
            chosen.append(i)
            mass += probs[i]
            if mass >= top_p:
                break
        last = probs[chosen[-1]]
        kept = set(chosen) | {i for i in kept if probs[i] == last}  # ties with the last kept
    if min_p > 0.0:
        probs = probs_of(kept)
        peak = max(probs.values())
        kept = {i for i in kept if probs[i] >= min_p * peak}
    return kept


def ref_penalized(logits_row, prompt, output, rep, presence, frequency):
    out = [float(x) for x in logits_row]
    seen = set(prompt) | set(output)
    for t in seen:
        out[t] = out[t] / rep if out[t] > 0 else out[t] * rep
    for t in set(output):
        out[t] -= frequency * output.count(t) + presence
    return out


def kept_mask(logits, params, device):
    """Which entries the sampler's filters leave finite (temperature applied first, as in the sampler)."""
    batch = make_batch(params, device)
    scaled = logits.to(device) / batch.temperature.unsqueeze(1)
    if batch.max_top_k:
        apply_top_k(scaled, batch.top_k, batch.max_top_k)
    probs = scaled.softmax(-1)
    if batch.use_top_p:
        apply_top_p(probs, batch.top_p)
    if batch.use_min_p:
        apply_min_p(probs, batch.min_p)
    return (probs > 0).cpu()


# ----------------------------------------------------------------------------- filters

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("vocab,spread", [(19, 2.0), (301, 0.3)])  # the flat rows' nucleus spans 100s of tokens
def test_filters_alone_and_combined_keep_exactly_the_defined_set(device, vocab, spread):
    gen = torch.Generator().manual_seed(vocab)
    grid = [(t, k, p, m) for t in (0.7, 1.0, 1.8) for k in (0, 1, 3, 7, 19, 40, 400)
            for p in (1.0, 0.9, 0.5, 0.15) for m in (0.0, 0.05, 0.4)]
    logits = torch.randn(len(grid), vocab, generator=gen) * spread
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m) for t, k, p, m in grid]
    mask = kept_mask(logits, params, device)
    for row, (t, k, p, m) in enumerate(grid):
        got = set(torch.nonzero(mask[row]).flatten().tolist())
        assert got == ref_kept(logits[row].tolist(), t, k, p, m), f"row {row}: T={t} top_k={k} top_p={p} min_p={m}"


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_keeps_every_token_tied_with_the_kth(device):
    logits = torch.tensor([[3.0, 2.0, 1.0, 2.0, 0.0, 2.0]])
    mask = kept_mask(logits, [SamplingParams(top_k=2)], device)
    assert torch.nonzero(mask[0]).flatten().tolist() == [0, 1, 3, 5]  # 3 and all three 2s


@pytest.mark.parametrize("device", DEVICES)
def test_top_p_keeps_the_smallest_prefix_plus_ties_and_at_least_one(device):
    # probs ~ [0.4, 0.2, 0.2, 0.2] (log-space exact): 0.5 is reached by the first 2s, the other
    # 2s are tied with it and kept; a tiny top_p keeps just the argmax.
    logits = torch.tensor([[math.log(0.4), math.log(0.2), math.log(0.2), math.log(0.2)],
                           [5.0, 1.0, 0.0, -1.0]])
    mask = kept_mask(logits, [SamplingParams(top_p=0.5), SamplingParams(top_p=1e-6)], device)
    assert mask[0].tolist() == [True, True, True, True]
    assert mask[1].tolist() == [True, False, False, False]


@pytest.mark.parametrize("device", DEVICES)
def test_min_p_keeps_tokens_at_least_min_p_times_the_peak(device):
    probs = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625])
    mask = kept_mask(probs.log().unsqueeze(0), [SamplingParams(min_p=0.25)], device)
    assert mask[0].tolist() == [True, True, True, False, False]


# ----------------------------------------------------------------------------- greedy and penalties

@pytest.mark.parametrize("device", DEVICES)
def test_greedy_rows_are_exact_argmax_in_a_mixed_batch(device):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(9, 989, generator=gen)
    # Greedy rows carry filters too: they must not change the argmax; random rows sit between them.
    params = [SamplingParams(temperature=0.0, top_k=5, top_p=0.3, min_p=0.5) if r % 2 == 0
              else SamplingParams(temperature=1.3, top_k=50) for r in range(9)]
    out = Sampler()(logits.to(device), make_batch(params, device))
    assert out.token_ids.dtype == torch.int64
    greedy_rows = list(range(0, 9, 2))
    assert out.token_ids.cpu()[greedy_rows].tolist() == logits.argmax(-1)[greedy_rows].tolist()


@pytest.mark.parametrize("device", DEVICES)
def test_penalties_match_the_direct_formula(device):
    gen = torch.Generator().manual_seed(2)
    vocab = 23
    logits = torch.randn(3, vocab, generator=gen) * 3.0  # positive and negative entries
    prompts = [[1, 2, 2, 5], [7], [0, 22]]
    outputs = [[2, 3, 3, 3, 9], [7, 7, 8], []]
    settings = [(1.3, 0.5, 0.25), (0.8, -0.4, 1.5), (2.0, 1.0, 1.0)]
    params = [SamplingParams(repetition_penalty=r, presence_penalty=p, frequency_penalty=f) for r, p, f in settings]
    batch = make_batch(params, device, prompts, outputs, vocab_size=vocab)
    got = logits.clone().to(device)
    apply_penalties(got, batch)
    for row, (r, p, f) in enumerate(settings):
        want = ref_penalized(logits[row].tolist(), prompts[row], outputs[row], r, p, f)
        assert got[row].cpu().tolist() == pytest.approx(want, abs=1e-5), f"row {row}"


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_with_penalties_and_banned_ids_takes_the_penalized_argmax(device):
    logits = torch.tensor([[5.0, 4.0, 3.9, 1.0, 0.0], [5.0, 4.0, 3.9, 1.0, 0.0]])
    params = [SamplingParams(temperature=0.0, presence_penalty=2.0), SamplingParams(temperature=0.0)]
    # Row 0: token 0 was output (5 - 2 = 3), so 1 wins. Row 1: tokens 0 and 1 banned, so 2 wins.
    batch = make_batch(params, device, outputs=[[0], []], banned_token_ids=[None, [0, 1]])
    assert Sampler()(logits.to(device), batch).token_ids.cpu().tolist() == [1, 2]


@pytest.mark.parametrize("device", DEVICES)
def test_banned_ids_are_never_sampled(device):
    logits = torch.tensor([[4.0, 3.0, 0.0, 0.0]]).repeat(2000, 1)
    params = [SamplingParams(temperature=1.0)] * 2000
    batch = make_batch(params, device, banned_token_ids=[[0, 1]] * 2000,
                       default_generator=torch.Generator(device).manual_seed(3))
    tokens = Sampler()(logits.to(device), batch).token_ids.cpu()
    assert set(tokens.tolist()) == {2, 3}


# ----------------------------------------------------------------------------- randomness

def chi2_critical(dof: int, z: float = 3.09) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (z = 3.09: p = 0.001)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


@pytest.mark.parametrize("device", DEVICES)
def test_sampling_frequencies_match_the_filtered_distribution(device):
    logits_row = torch.tensor([3.0, 2.6, 2.0, 1.8, 1.5, 1.4, 1.0, 0.0, -1.0, -3.0])
    temperature, top_k, top_p, min_p = 0.9, 8, 0.95, 0.15
    kept = sorted(ref_kept(logits_row.tolist(), temperature, top_k, top_p, min_p))
    # Every filter has something to do: each one removes more tokens than the ones before it.
    sizes = [len(ref_kept(logits_row.tolist(), temperature, *f)) for f in
             [(0, 1.0, 0.0), (top_k, 1.0, 0.0), (top_k, top_p, 0.0), (top_k, top_p, min_p)]]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 4, sizes
    scaled = logits_row[kept].double() / temperature
    want = torch.softmax(scaled, -1).numpy()

    draws = 40000
    params = [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)] * draws
    batch = make_batch(params, device, default_generator=torch.Generator(device).manual_seed(4))
    tokens = Sampler()(logits_row.repeat(draws, 1).to(device), batch).token_ids.cpu().numpy()
    counts = np.bincount(tokens, minlength=len(logits_row))
    assert counts[[t for t in range(len(logits_row)) if t not in kept]].sum() == 0
    expected = want * draws
    chi2 = float(((counts[kept] - expected) ** 2 / expected).sum())
    assert chi2 < chi2_critical(len(kept) - 1), (counts[kept], expected)


def run_seeded(device, seed, position, others, steps=12):
    """Samples `steps` tokens for a seeded request placed at `position` among `others` other rows."""
    gen = torch.Generator().manual_seed(5)
    own_logits = torch.randn(steps, 200, generator=gen)  # the request's logits never depend on the batch
    other_logits = torch.randn(steps, len(others), 200, generator=gen)
    request_gen = make_request_generator(seed, device)
    shared = torch.Generator(device).manual_seed(123 + len(others))
    rows = list(others)
    rows.insert(position, SamplingParams(temperature=1.0, top_p=0.95, seed=seed))
    picked = []
    for step in range(steps):
        gens = [make_request_generator(p.seed + step, device) if p.seed is not None else None for p in rows]
        gens[position] = request_gen  # the same generator object every step
        logits = torch.cat([other_logits[step, :position], own_logits[step:step + 1], other_logits[step, position:]])
        batch = make_batch(rows, device, generators=gens, default_generator=shared)
        picked.append(int(Sampler()(logits.to(device), batch).token_ids[position]))
    return picked


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_rows_reproduce_regardless_of_batch_composition(device):
    alone = run_seeded(device, seed=42, position=0, others=[])
    crowd = [SamplingParams(temperature=0.7), SamplingParams(temperature=0.0),
             SamplingParams(temperature=1.0, seed=7), SamplingParams(temperature=1.2, top_k=3)]
    in_batch = run_seeded(device, seed=42, position=2, others=crowd)
    assert alone == in_batch
    assert run_seeded(device, seed=42, position=0, others=[]) == alone
    assert run_seeded(device, seed=43, position=0, others=[]) != alone


# ----------------------------------------------------------------------------- logprobs

@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_are_of_the_raw_logits_and_top_n_is_sorted(device):
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(4, 99, generator=gen) * 2.0
    params = [SamplingParams(temperature=0.0, logprobs=2), SamplingParams(temperature=0.5, logprobs=5),
              SamplingParams(temperature=1.0, repetition_penalty=1.5, top_k=10),
              SamplingParams(temperature=2.0, frequency_penalty=1.0, logprobs=0)]
    batch = make_batch(params, device, prompts=[[1], [2], [3, 4], [5]], outputs=[[], [6], [7], [8, 8]])
    out = Sampler()(logits.to(device), batch)
    reference = torch.log_softmax(logits.double(), -1)
    tokens = out.token_ids.cpu()
    assert out.logprobs.dtype == torch.float32
    assert torch.allclose(out.logprobs.cpu().double(), reference.gather(1, tokens[:, None]).squeeze(1), atol=1e-5)
    ids, values = out.top_logprobs
    assert ids.shape == values.shape == (4, 5)  # k = the largest request
    want_values, want_ids = reference.topk(5, -1)
    assert torch.equal(ids.cpu(), want_ids)
    assert torch.allclose(values.cpu().double(), want_values, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_only_when_some_row_asks(device):
    logits = torch.randn(2, 17).to(device)
    out = Sampler()(logits, make_batch([SamplingParams(temperature=0.0)] * 2, device))
    assert out.logprobs is None and out.top_logprobs is None
    params = [SamplingParams(temperature=0.0, logprobs=0), SamplingParams(temperature=0.0)]
    out = Sampler()(logits, make_batch(params, device))
    assert out.logprobs.shape == (2,) and out.top_logprobs is None  # logprobs=0: the sampled token's only


# ----------------------------------------------------------------------------- bad input

def test_bad_inputs_raise_naming_the_field():
    params = [SamplingParams(), SamplingParams(seed=3)]
    with pytest.raises(ValueError, match=r"generators\[1\]"):
        SamplingBatch.build(params, [[1], [2]], [[], []], [None, None], "cpu")
    with pytest.raises(ValueError, match="output_ids_list"):
        SamplingBatch.build(params, [[1], [2]], [[]], [None, make_request_generator(3, "cpu")], "cpu")
    with pytest.raises(ValueError, match=r"output_ids_list\[0\]"):
        make_batch([SamplingParams(presence_penalty=1.0)], "cpu", outputs=[[5, 40]], vocab_size=32)
    with pytest.raises(ValueError, match=r"banned_token_ids\[1\]"):
        make_batch([SamplingParams()] * 2, "cpu", banned_token_ids=[[1], [-2]])
    with pytest.raises(ValueError, match="params_list"):
        SamplingBatch.build([], [], [], [], "cpu")
    batch = make_batch([SamplingParams()] * 2, "cpu")
    with pytest.raises(ValueError, match="logits"):
        Sampler()(torch.zeros(3, 8), batch)


def test_unchanged_row_values_reuse_the_previous_steps_tensors():
    params = [SamplingParams(temperature=0.7, top_p=0.9), SamplingParams(temperature=0.0)]
    first = SamplingBatch.build(params, [[1], [2]], [[], []], [None, None], "cpu")
    same = SamplingBatch.build(params, [[1], [2]], [[3], [4]], [None, None], "cpu", previous=first)
    assert same.temperature is first.temperature and same.top_k is first.top_k and same.greedy is first.greedy
    changed = SamplingBatch.build([params[0], SamplingParams(temperature=0.5)], [[1], [2]], [[], []], [None, None],
                                  "cpu", previous=same)
    assert changed.temperature is not same.temperature
    assert changed.temperature.tolist() == pytest.approx([0.7, 0.5])
    assert changed.greedy.tolist() == [False, False]

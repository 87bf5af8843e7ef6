"""Picks one token per row from a step's logits: penalties -> temperature -> top-k -> top-p -> min-p
-> sample. Vectorized over the batch in torch, so the same code runs on the CPU and on CUDA; the
only per-row Python is one random draw per *seeded* random row, and nothing waits for the GPU.

Filter semantics (each keeps at least the most likely token):
- top-k keeps every token whose logit is >= the k-th largest, so tokens tied with the k-th are all
  kept (as Hugging Face and vLLM do): the kept set depends only on values, never on sort order.
- top-p keeps the smallest prefix of the tokens sorted by probability whose mass reaches top_p,
  again plus any token tied with the last one kept. It acts on the distribution left by top-k.
- min-p keeps tokens with prob >= min_p * (the largest prob).
Greedy rows take the argmax of the penalized logits (after banned ids), untouched by the filters.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from rtpllm.layers.sampling_batch import SamplingBatch

_NEG_INF = float("-inf")


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # int64 [n]
    # float32 [n]: log-prob of the sampled token under log_softmax of the *unmodified* logits
    # (before penalties, temperature and filters), like vLLM's default "raw logprobs".
    # None when no row of the batch asked for logprobs (it costs a pass over the logits).
    logprobs: Optional[torch.Tensor]
    # (ids int64 [n, k], logprobs float32 [n, k]) of the k most likely tokens under the same
    # distribution, k = the batch's largest requested `logprobs`; None when no row asked for k > 0.
    top_logprobs: Optional[tuple[torch.Tensor, torch.Tensor]]


class Sampler:
    """Stateless: all per-request state (generators, token history) comes in the SamplingBatch."""

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != batch.num_rows:
            raise ValueError(f"logits: expected [{batch.num_rows}, vocab], got {list(logits.shape)}")
        if logits.device != batch.temperature.device:
            raise ValueError(f"logits: on {logits.device}, the sampling batch on {batch.temperature.device}")
        if batch.all_greedy and not batch.use_penalties and batch.banned_tokens is None \
                and batch.max_num_logprobs is None:
            # Plain greedy decoding: the argmax of the logits as they are (widening to float32
            # cannot change which entry is largest), with no pass to make a float32 copy.
            return SamplerOutput(token_ids=argmax_rows(logits), logprobs=None, top_logprobs=None)
        raw = logits.float()

        work = raw
        if batch.use_penalties or batch.banned_tokens is not None:
            work = raw.clone()  # the raw logits are still needed for the logprobs
            if batch.use_penalties:
                apply_penalties(work, batch)
            if batch.banned_tokens is not None:
                work.view(-1).index_fill_(0, _flat_index(batch.banned_tokens, work.shape[1]), _NEG_INF)
        greedy_ids = argmax_rows(work)

        if batch.all_greedy:
            token_ids = greedy_ids
        else:
            scaled = work / batch.temperature.unsqueeze(1)  # a new tensor: `raw` stays intact
            if batch.max_top_k > 0:
                apply_top_k(scaled, batch.top_k, batch.max_top_k)
            probs = scaled.softmax(dim=-1)
            if batch.use_top_p:
                apply_top_p(probs, batch.top_p)
            if batch.use_min_p:
                apply_min_p(probs, batch.min_p)
            token_ids = torch.where(batch.greedy, greedy_ids, _inverse_cdf_sample(probs, batch, greedy_ids))

        if batch.max_num_logprobs is None:
            return SamplerOutput(token_ids=token_ids, logprobs=None, top_logprobs=None)
        token_logprobs, top = gather_logprobs(raw, token_ids, batch.max_num_logprobs)
        return SamplerOutput(token_ids=token_ids, logprobs=token_logprobs, top_logprobs=top)


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(dim=-1) (int64 [n]; the first of tied maxima), computed in two stages on CUDA.

    torch reduces each row of an argmax in a single thread block: one 128K-entry row of a batch-1
    step took 28 us on an H100, against a ~6 ms step. Cutting each row into chunks first turns
    that into one wide reduction (the largest entry of every chunk, the first on ties) and one
    narrow one (the first chunk holding the row's maximum): the same answer, since the first
    chunk holding the maximum holds its first occurrence."""
    n, vocab = logits.shape
    chunk = _argmax_chunk(vocab) if logits.is_cuda and logits.is_contiguous() else None
    if chunk is None:
        return logits.argmax(dim=-1)
    chunk_max, index_in_chunk = logits.view(n, vocab // chunk, chunk).max(dim=-1)
    best_chunk = chunk_max.argmax(dim=-1, keepdim=True)
    return torch.add(index_in_chunk.gather(1, best_chunk), best_chunk, alpha=chunk).squeeze(1)


@functools.lru_cache(maxsize=None)
def _argmax_chunk(vocab: int) -> Optional[int]:
    """A chunk length that divides `vocab`, between 256 and 4096 entries, so that the rows reshape
    into chunks without a copy; the one closest to sqrt(vocab). None for small or prime-ish sizes."""
    if vocab < 16384:
        return None
    divisors = [d for d in range(256, 4097) if vocab % d == 0]
    return min(divisors, key=lambda d: abs(d * d - vocab)) if divisors else None


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> None:
    """In place on a contiguous float32 [n, vocab]. Repetition: tokens seen in the prompt or the
    output get positive logits divided by / negative logits multiplied by the penalty. Frequency:
    minus penalty * (count in the output). Presence: minus penalty if the token is in the output.

    Only the logits of history tokens are read and written, so the cost follows the history's
    length, not n * vocab. A token repeated in the history appears at several indices: each copy
    computes the same new value from the same old one, so the scattered writes agree."""
    vocab = logits.shape[1]
    flat = logits.view(-1)
    if batch.repetition_tokens is not None and batch.repetition_tokens.shape[1]:
        index = _flat_index(batch.repetition_tokens, vocab)
        rep = batch.repetition_penalty[batch.repetition_tokens[0]]
        values = flat[index]
        flat[index] = torch.where(values > 0, values / rep, values * rep)
    if batch.output_tokens is not None and batch.output_tokens.shape[1]:
        index = _flat_index(batch.output_tokens, vocab)
        rows = batch.output_tokens[0]
        # Counts through a dense scatter of ones: integer-valued float adds are exact in any order,
        # so the result is deterministic on the GPU too.
        counts = torch.zeros_like(flat).index_add_(0, index, torch.ones_like(index, dtype=torch.float32))
        penalty = batch.presence_penalty[rows] + batch.frequency_penalty[rows] * counts[index]
        flat[index] = flat[index] - penalty


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> None:
    """Masks to -inf, in place, logits below each row's k-th largest. top_k: int64 [n], 0 = off on
    that row; max_top_k: its largest value, a host int (so the width needs no sync)."""
    width = min(max_top_k, logits.shape[-1])
    top = logits.topk(width, dim=-1).values
    kth = top.gather(1, top_k.clamp(1, width).sub(1).unsqueeze(1))  # k >= vocab: the smallest, keeps all
    kth.masked_fill_(top_k.unsqueeze(1) <= 0, _NEG_INF)
    logits.masked_fill_(logits < kth, _NEG_INF)


# On the CPU a full sort of the vocabulary costs far more than the rest of sampling, while the
# nucleus of a real next-token distribution usually sits in its first few dozen tokens.
_CPU_TOP_P_CANDIDATES = 64


def apply_top_p(probs: torch.Tensor, top_p: torch.Tensor) -> None:
    """Zeroes, in place, probabilities outside each row's nucleus. probs: [n, vocab], rows summing
    to 1; top_p: float32 [n], 1.0 = off. The kept set is all probs >= the last nucleus member's."""
    disabled = top_p.unsqueeze(1) >= 1.0
    if probs.device.type == "cpu":
        # Try the largest few tokens first; only rows whose nucleus reaches past them get a full
        # sort. Picking those rows reads a tensor value, which is free on the CPU (and why CUDA,
        # where it would stall the stream, sorts every row instead).
        width = min(_CPU_TOP_P_CANDIDATES, probs.shape[-1])
        threshold, found = _nucleus_threshold(probs.topk(width, dim=-1).values, top_p)
        missing = torch.nonzero(~(found | disabled.squeeze(1))).flatten()
        if missing.numel():
            rest = probs.index_select(0, missing).sort(dim=-1, descending=True).values
            threshold[missing] = _nucleus_threshold(rest, top_p[missing])[0]
    else:
        threshold, _ = _nucleus_threshold(probs.sort(dim=-1, descending=True).values, top_p)
    threshold.masked_fill_(disabled, 0.0)
    probs.masked_fill_(probs < threshold, 0.0)


def _nucleus_threshold(sorted_desc: torch.Tensor, top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sorted_desc: the largest probabilities of each row, descending (a prefix or the whole row).
    Returns the smallest kept probability [n, 1] and a bool [n] telling whether the nucleus ends
    inside the prefix (only then is the threshold right)."""
    mass = sorted_desc.cumsum(dim=-1)
    # A token is kept iff the tokens ranked above it hold less than top_p; the first always is.
    num_kept = (mass - sorted_desc < top_p.unsqueeze(1)).sum(dim=-1, keepdim=True)
    return sorted_desc.gather(1, num_kept - 1), mass[:, -1] >= top_p


def apply_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> None:
    """Zeroes, in place, probabilities below min_p * (the row's largest); min_p = 0 keeps all.
    Rows are left unnormalized: min-p and sampling are both invariant to a per-row scale."""
    limit = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    probs.masked_fill_(probs < limit, 0.0)


def gather_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, num_top: Optional[int]
                    ) -> tuple[torch.Tensor, Optional[tuple[torch.Tensor, torch.Tensor]]]:
    """log_softmax(logits) at token_ids (int64 [n]) and, if num_top, the num_top largest entries
    (ids, values). One logsumexp instead of materializing the full log_softmax."""
    log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)
    token_logprobs = (logits.gather(1, token_ids.unsqueeze(1)) - log_norm).squeeze(1)
    if not num_top:
        return token_logprobs, None
    values, ids = logits.topk(min(num_top, logits.shape[-1]), dim=-1)
    return token_logprobs, (ids, values - log_norm)


def _flat_index(pairs: torch.Tensor, vocab: int) -> torch.Tensor:
    """int64 [2, count] (row; token id) pairs -> indices into a flattened [n, vocab] tensor.
    Scatters then take a Python scalar (index_fill_) instead of a host value tensor, whose copy
    to the GPU would make the host wait."""
    return pairs[0] * vocab + pairs[1]


def _inverse_cdf_sample(probs: torch.Tensor, batch: SamplingBatch, argmax_ids: torch.Tensor) -> torch.Tensor:
    """Draws one token per row from `probs` (non-negative, any per-row scale) with one uniform
    number per row: the first token whose cumulative mass exceeds u * total. One scan and a binary
    search, no host sync; cheaper than per-token noise (exponential race / Gumbel), which costs a
    logarithm for every vocabulary entry. argmax_ids: int64 [n], each row's most likely token
    (always kept by the filters), the fallback below."""
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    uniform = torch.rand(probs.shape[0], 1, device=probs.device, generator=batch.default_generator)
    for row in batch.seeded_rows:
        # NOTE: a seeded row draws exactly one number per random step from its own generator, so
        # its stream (and its tokens) do not depend on the rest of the batch.
        uniform[row].uniform_(generator=batch.generators[row])
    # Keep the target strictly below the total so some entry always exceeds it.
    target = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))
    token_ids = torch.searchsorted(cdf, target, right=True).clamp_(max=probs.shape[-1] - 1)
    # A parallel scan (CUDA) need not be exactly monotone, so a zero-probability entry could in
    # principle own a sliver of the range: never let a filtered token through.
    valid = probs.gather(1, token_ids) > 0
    return torch.where(valid.squeeze(1), token_ids.squeeze(1), argmax_ids)


def filtered_probs(logits: torch.Tensor, batch: SamplingBatch, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The distribution the sampler draws a random row from: softmax(logits / temperature) after
    top-k, then top-p and min-p, renormalized; float32 [n, vocab]. `rows` (int64 [n]) names each
    logits row's row of `batch` (speculative verification scores several positions of a sequence,
    and the draft model's q goes through the same filters). Penalties and banned ids are not
    applied here: speculation penalises each verified row itself (spec/penalties.py)."""
    def pick(values: torch.Tensor) -> torch.Tensor:
        return values if rows is None else values.index_select(0, rows)

    scaled = logits.float() / pick(batch.temperature).unsqueeze(1)
    if batch.max_top_k > 0:
        apply_top_k(scaled, pick(batch.top_k), batch.max_top_k)
    probs = scaled.softmax(dim=-1)
    if batch.use_top_p:
        apply_top_p(probs, pick(batch.top_p))
    if batch.use_min_p:
        apply_min_p(probs, pick(batch.min_p))
    return probs / probs.sum(dim=-1, keepdim=True)

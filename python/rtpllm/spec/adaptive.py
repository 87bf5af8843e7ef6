"""How many drafts to verify per sequence and step: speculation only where it pays.

Each sequence keeps a moving estimate of the chance a draft is accepted (alpha). With k drafts a
sequence emits 1 + alpha + ... + alpha^k tokens on average; the step costs more the more tokens
the target computes (`StepCostModel`: flat while decode is bound by reading the weights, then
rising). Drafts are handed out one at a time to the sequence whose next draft is most likely
accepted, while the expected extra tokens beat what the extra work costs the whole batch; if the
plan does not beat a plain step (including the speculative step's fixed overheads: it cannot
overlap the host with the device, and a draft model runs its own steps) nobody speculates.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Optional


class StepCostModel:
    """Time of one step as a function of the tokens the target computes, separately for plain and
    speculative steps. Measured online (an EMA per power-of-two bucket of token counts, from the
    engine's step-to-step times) with a prior where nothing is measured yet: a plain step costs
    max(1, tokens / knee_tokens) + tokens * token_cost decode steps; a speculative one adds
    `spec_overhead` and `draft_step_cost` per sequential draft step."""

    def __init__(self, knee_tokens: float, spec_overhead: float, draft_step_cost: float, decay: float = 0.9,
                 token_cost: float = 0.0):
        self.knee_tokens = knee_tokens
        self.token_cost = token_cost
        self.spec_overhead = spec_overhead
        self.draft_step_cost = draft_step_cost
        self.decay = decay
        self._measured: dict[tuple[bool, int], float] = {}  # (speculative, bucket) -> seconds

    @staticmethod
    def _bucket(num_tokens: int) -> int:
        return max(0, int(num_tokens - 1).bit_length())

    def observe(self, speculative: bool, num_tokens: int, seconds: float) -> None:
        key = (speculative, self._bucket(num_tokens))
        old = self._measured.get(key)
        # A cheaper step pulls the estimate down fast: one slow first step (warm-up, a page fault)
        # must not keep speculation off, since an off policy takes few new speculative samples.
        decay = self.decay if old is None or seconds >= old else min(self.decay, 0.5)
        self._measured[key] = seconds if old is None else decay * old + (1 - decay) * seconds

    def prior(self, num_tokens: int) -> float:
        return max(1.0, num_tokens / self.knee_tokens) + num_tokens * self.token_cost

    def plain(self, num_tokens: int) -> float:
        return self.prior(num_tokens)

    def speculative(self, num_tokens: int, draft_steps: int, plain_tokens: int, measured: bool = True) -> float:
        """Relative to plain(plain_tokens)'s units; measured ratios replace the prior where both
        buckets were seen (`measured` False: the prior alone)."""
        prior = self.prior(num_tokens) * (1 + self.spec_overhead) + self.draft_step_cost * draft_steps
        if not measured:
            return prior
        # A bucket not seen yet costs what the nearest measured one did (the lower on a tie): a
        # verify step's cost is mostly fixed (launches, syncs) or flat in tokens below the knee.
        # With none measured, the prior.
        seen = [b for (speculative, b) in self._measured if speculative]
        if not seen:
            return prior
        bucket = self._bucket(num_tokens)
        spec = self._measured[(True, min(seen, key=lambda b: (abs(b - bucket), b)))]
        plain = self._measured.get((False, self._bucket(plain_tokens)))
        if plain is None:
            # Speculative steps were timed but no plain one at this batch size: nothing says they
            # pay, so the next step runs plain and is timed (a run that starts speculating would
            # otherwise trust the prior forever).
            return math.inf
        return spec / plain * self.plain(plain_tokens)


EXPLORE_EVERY = 32

# A draft less likely than this to be accepted is never verified, however cheap the row looks.
MIN_DRAFT_GAIN = 0.05


@dataclass
class _Acceptance:
    accepted: float
    trials: float

    @property
    def rate(self) -> float:
        return self.accepted / self.trials if self.trials > 0 else 0.0


class AdaptiveSpeculation:
    def __init__(self, max_drafts: int, cost: StepCostModel, adaptive: bool = True, prior_rate: float = 0.6,
                 decay: float = 0.8):
        self.max_drafts = max_drafts
        self.cost = cost
        self.adaptive = adaptive
        self.prior_rate = prior_rate
        self.decay = decay
        self._seqs: dict[int, _Acceptance] = {}
        self._global = _Acceptance(prior_rate * 2, 2.0)
        # How often the proposer had drafts for a sequence it was asked about (an n-gram proposer
        # often has none): a step that asks costs the host/device overlap even when nothing comes.
        self._offer_rate = 1.0
        self._skipped = 0
        self._explore = False  # the next plan trusts the prior once, so measured costs get refreshed

    def acceptance(self, seq_id: int) -> float:
        state = self._seqs.get(seq_id)
        return (state or self._global).rate

    def record(self, seq_id: int, num_drafts: int, num_accepted: int) -> None:
        """A verified step: of num_drafts, the first num_accepted matched (a geometric trial run)."""
        trials = num_accepted + (1 if num_accepted < num_drafts else 0)
        for state in (self._seqs.setdefault(seq_id, _Acceptance(self._global.accepted, self._global.trials)),
                      self._global):
            state.accepted = self.decay * state.accepted + num_accepted
            state.trials = self.decay * state.trials + trials

    def forget(self, live_seq_ids: set[int]) -> None:
        for seq_id in [s for s in self._seqs if s not in live_seq_ids]:
            del self._seqs[seq_id]

    def record_offers(self, num_asked: int, num_offered: int) -> None:
        if num_asked:
            self._offer_rate = self.decay * self._offer_rate + (1 - self.decay) * num_offered / num_asked

    def worth_trying(self, num_decoding: int) -> bool:
        """Whether a step should ask for drafts: a sequence with the best acceptance seen would get
        one in a batch this size, counting how often the proposer has any. When not, every
        EXPLORE_EVERY-th step asks anyway, planned on the prior, so that a change (drafts start
        matching, speculative steps got cheaper) is noticed."""
        if not self.adaptive:
            return True
        best = max([s.rate for s in self._seqs.values()] + [self._global.rate])
        if self._plan_rates({-1: best * self._offer_rate}, max(num_decoding, 1)):
            self._skipped = 0
            return True
        self._skipped += 1
        if self._skipped >= EXPLORE_EVERY:
            self._skipped = 0
            self._explore = True
            return True
        return False

    def plan(self, seq_ids: list[int]) -> dict[int, int]:
        """Drafts per sequence for a step in which these sequences decode (absent: none)."""
        if not seq_ids:
            return {}
        if not self.adaptive:
            return {s: self.max_drafts for s in seq_ids}
        # Sequences never seen start from the proposer-wide rate; one that stopped speculating
        # drifts back toward it, so that it gets tried again once the batch allows.
        rates = {s: self.acceptance(s) for s in seq_ids}
        explore, self._explore = self._explore, False
        return self._plan_rates(rates, len(seq_ids), measured=not explore)

    def _plan_rates(self, rates: dict[int, float], batch: int, measured: bool = True) -> dict[int, int]:
        tokens = batch
        expected = float(batch)  # tokens emitted by a plain step
        base = expected / self.cost.plain(batch)
        drafts = {s: 0 for s in rates}
        heap = [(-rate, s) for s, rate in rates.items() if rate >= MIN_DRAFT_GAIN]
        heapq.heapify(heap)
        best_value, best_plan = base, {}
        max_k = 0
        while heap:
            neg_gain, s = heapq.heappop(heap)
            drafts[s] += 1
            tokens += 1
            expected += -neg_gain
            max_k = max(max_k, drafts[s])
            value = expected / self.cost.speculative(tokens, max_k, batch, measured)
            if value > best_value * 1.0001:
                best_value, best_plan = value, {q: k for q, k in drafts.items() if k}
            elif value < best_value * 0.9:
                break  # past the knee: further drafts only cost more
            if drafts[s] < self.max_drafts and -neg_gain * rates[s] >= MIN_DRAFT_GAIN:
                heapq.heappush(heap, (neg_gain * rates[s], s))
        return best_plan


def default_cost_model(device_type: str, draft_param_ratio: Optional[float]) -> StepCostModel:
    """Priors: on a GPU a step is flat up to ~128 tokens (weight reads dominate) and a speculative
    step loses the host/device overlap (~5%); on the CPU every token costs. A draft model's step
    costs about its share of the parameters."""
    if device_type == "cuda":
        return StepCostModel(knee_tokens=128.0, spec_overhead=0.05, draft_step_cost=(draft_param_ratio or 0.0) + 0.02,
                             token_cost=0.001)
    return StepCostModel(knee_tokens=1.0, spec_overhead=0.0, draft_step_cost=draft_param_ratio or 0.0)


def expected_tokens(rate: float, k: int) -> float:
    """1 + rate + ... + rate^k: tokens a step emits with k drafts at per-draft acceptance `rate`."""
    return float(k + 1) if rate >= 1.0 else (1 - math.pow(rate, k + 1)) / (1 - rate)

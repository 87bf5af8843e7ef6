"""What the engine calls for speculative decoding: lookahead before scheduling, then one
speculative step (propose -> target forward over k + 1 positions -> verify on the device ->
one copy of the verified tokens to the host)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np
import torch

from rtpllm.config import SpeculativeConfig
from rtpllm.layers.sampler import Sampler
from rtpllm.spec.adaptive import AdaptiveSpeculation, default_cost_model
from rtpllm.spec.history import TokenHistory
from rtpllm.spec.proposer import Proposer, SpecSequence, to_device
from rtpllm.spec.stats import SpecCounters
from rtpllm.spec.verified_logprobs import LogprobRows
from rtpllm.spec.verifier import VerifyLayout, verify
from rtpllm.spec.verify_graphs import VerifyGraphs, verify_graphs_enabled

logger = logging.getLogger(__name__)

_FORGET_EVERY = 256


def can_speculate(seq) -> bool:
    """A sequence below its min_tokens waits until it has them (till then stop ids are banned,
    which the verified rows do not apply). Penalties speculate: each verified row is penalised
    with the drafts before it (penalties.py). Logprobs speculate: they are read from the verified
    rows (verified_logprobs.py)."""
    return len(seq.output_ids) >= seq.params.min_tokens


@dataclass
class SpecStepResult:
    token_ids: np.ndarray  # int32 [rows]: what Scheduler.update takes
    logprobs_by_seq: dict  # seq_id -> one TokenLogprobs per emitted token (sequences that asked)
    prompt_logprobs: dict


class SpeculativeDecoder:
    def __init__(self, config: SpeculativeConfig, proposer: Proposer, device: torch.device,
                 draft_param_ratio: Optional[float] = None):
        self.config = config
        self.proposer = proposer
        self.device = device
        self.adaptive = AdaptiveSpeculation(config.num_speculative_tokens,
                                            default_cost_model(device.type, draft_param_ratio),
                                            adaptive=config.adaptive)
        self.counters = SpecCounters(method=config.method)
        self._sampler = Sampler()
        self.history = TokenHistory()  # each sequence's tokens, appended to step by step
        self._last_step: Optional[tuple[bool, int, float]] = None  # (speculative, tokens, start time)
        self._calls = 0

    @property
    def _proposer_tracks_acceptance(self) -> bool:
        return type(self.proposer).verified is not Proposer.verified

    @property
    def kv_bytes_per_block(self) -> int:
        return self.proposer.kv_bytes_per_block

    def bind(self, runner, verify_graphs: bool = True) -> None:
        """Once the target's runner exists: the proposer's KV pool and feature hook, and the verify
        steps' CUDA graphs (unless `verify_graphs` is off: with tensor parallelism the other ranks
        run their verify steps eagerly, and every rank must run the same collectives alike)."""
        self.proposer.bind(runner.num_blocks)
        self.proposer.capture_graphs(runner)
        max_batch = min(self.config.verify_graph_max_batch, runner.graphs.max_batch) if runner.graphs and verify_graphs else 0
        if max_batch > 0 and verify_graphs_enabled():
            graphs = runner.verify_graphs = VerifyGraphs(
                runner.model, runner.kv_caches, max_batch=max_batch,
                max_k=min(8, self.config.num_speculative_tokens), max_blocks_per_seq=runner.graphs.max_blocks_per_seq,
                block_size=runner.block_size, device=runner.device)
            logger.info("verify-step cuda graphs: %d shapes (batch <= %d, k <= %d) in %.1f s, %.0f MiB",
                        len(graphs.shapes), graphs.buckets[-1], graphs.max_k, graphs.capture_seconds,
                        graphs.capture_bytes / 2**20)
        if self.proposer.needs_target_features:
            runner.after_forward = self.proposer.record_features

    # ------------------------------------------------------------------ before schedule()
    def wants_lookahead(self, num_running: int, live_seqs: Optional[dict] = None) -> bool:
        """Whether this step should ask for drafts. `live_seqs` (seq id -> state): now and then the
        state of finished sequences is dropped here, also while speculation stays off."""
        self._calls += 1
        if live_seqs is not None and self._calls % _FORGET_EVERY == 0:
            self.release(set(live_seqs))
        return self.adaptive.worth_trying(num_running)

    def request_lookahead(self, scheduler, seqs: Iterable) -> int:
        """Asks the scheduler for lookahead slots for the decoding sequences that should speculate;
        returns the slots granted. Call with no step in flight (their last tokens known)."""
        seqs = list(seqs)
        self.release({seq.seq_id for seq in seqs})
        candidates = [seq for seq in seqs if not seq.finished and seq.output_ids and can_speculate(seq)]
        plan = self.adaptive.plan([seq.seq_id for seq in candidates])
        granted = asked = offered = 0
        for seq in candidates:
            k = plan.get(seq.seq_id, 0)
            if k == 0:
                continue
            k = self.proposer.max_drafts(seq.seq_id, self.history.tokens(seq), k)
            asked += 1
            if k:
                offered += 1
                granted += scheduler.set_lookahead(seq.seq_id, k)
        self.adaptive.record_offers(asked, offered)
        return granted

    def step_started(self, speculative: bool, num_tokens: int) -> None:
        """Feeds the cost model: the time from one step's start to the next is its cost."""
        now = time.perf_counter()
        if self._last_step is not None:
            was_spec, tokens, start = self._last_step
            self.adaptive.cost.observe(was_spec, tokens, now - start)
        self._last_step = (speculative, num_tokens, now)

    # ------------------------------------------------------------------ the step
    def run_step(self, executor, batch, sampled_seqs: list, sampling_batch, prompt_logprob_seqs: list[int]
                 ) -> SpecStepResult:
        """One speculative step: propose, verify on every rank (`executor.execute` with the drafts:
        the engine's executor, or a ModelRunner), accept."""
        draft_counts = batch.draft_counts.copy()
        spec_seqs = [SpecSequence(seq_id=seq.seq_id, token_ids=self.history.tokens(seq), num_drafts=int(k),
                                  batch_index=int(index), params=seq.params, generator=seq.generator,
                                  num_prompt_tokens=len(seq.group.prompt_ids))
                     for seq, k, index in zip(sampled_seqs, draft_counts, _batch_index_of_sampled(batch))
                     if k > 0]
        # Index tensors first, while the device is idle: nothing later waits on a host copy.
        layout = VerifyLayout.build(draft_counts, self.device)
        first_rows = to_device(layout.first_rows, self.device)
        no_drafts = to_device(draft_counts == 0, self.device)
        proposal = self.proposer.propose(batch, spec_seqs)
        result = executor.execute(batch, None, prompt_logprob_seqs, None, drafts=proposal.token_ids)
        logits = result.verify_logits
        tokens, num_accepted = verify(logits, layout, sampling_batch, proposal.token_ids, proposal.probs)
        # Sequences without drafts take exactly what the plain sampler gives them (penalties and
        # banned ids apply there); their generators advance as without speculation.
        first = self._sampler(logits.index_select(0, first_rows), sampling_batch)
        tokens[first_rows] = torch.where(no_drafts, first.token_ids, tokens[first_rows])
        self.proposer.observe(batch, result.hidden, tokens)
        logprob_rows = LogprobRows.find(sampled_seqs, draft_counts)
        extra = logprob_rows.on_device(logits, tokens) if logprob_rows is not None else []
        host = torch.cat([tokens, num_accepted, *extra]).cpu().numpy()  # the step's one device-to-host sync
        num_rows, num_seqs = tokens.shape[0], num_accepted.shape[0]
        accepted = host[num_rows:num_rows + num_seqs]
        logprobs_by_seq = {}
        if logprob_rows is not None:
            logprobs_by_seq = logprob_rows.entries(host[num_rows + num_seqs:], sampled_seqs, host[:num_rows],
                                                   accepted + 1)
        speculating = draft_counts > 0
        if self.adaptive.adaptive or self._proposer_tracks_acceptance:
            for seq_id, k, m in zip(batch.sampled_request_ids[speculating].tolist(), draft_counts[speculating].tolist(),
                                    accepted[speculating].tolist()):
                if self.adaptive.adaptive:
                    self.adaptive.record(seq_id, k, m)
                self.proposer.verified(seq_id, m)
        self.counters.record(int(speculating.sum()), int(draft_counts.sum()), int(accepted[speculating].sum()))
        return SpecStepResult(token_ids=host[:num_rows].astype(np.int32), logprobs_by_seq=logprobs_by_seq,
                              prompt_logprobs=result.prompt_logprobs)

    def release(self, live_seq_ids: set[int]) -> None:
        self.proposer.release(live_seq_ids)
        self.adaptive.forget(live_seq_ids)
        self.history.release(live_seq_ids)


def _batch_index_of_sampled(batch) -> np.ndarray:
    """The batch index (block table row) of each sampled sequence."""
    return np.searchsorted(batch.query_start_loc, batch.logits_indices, side="right") - 1

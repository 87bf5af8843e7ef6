"""The interface every proposer implements, and what it is given."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from rtpllm.sampling_params import SamplingParams


def to_device(values, device: torch.device, dtype=None) -> torch.Tensor:
    """A small host array (numpy or list) on `device` without waiting for the device: a copy from
    pageable memory would first drain the stream (the work already queued), so on CUDA the array
    goes through pinned memory and the copy is queued behind that work instead."""
    tensor = torch.as_tensor(np.ascontiguousarray(values), dtype=dtype)
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


@dataclass
class SpecSequence:
    """One sequence of a scheduled batch that got lookahead slots."""

    seq_id: int
    token_ids: np.ndarray  # int64: every known token (prompt + outputs); the last one is not computed yet
    num_drafts: int  # lookahead slots granted (>= 1)
    batch_index: int  # its index among the batch's sequences (block table row, query range)
    params: SamplingParams
    generator: Optional[torch.Generator]
    num_prompt_tokens: int = 0  # token_ids[:num_prompt_tokens] is the prompt (penalties tell it apart)


@dataclass
class Proposal:
    """Drafts for every lookahead slot of a batch, sequence after sequence (batch.draft_token_indices order)."""

    token_ids: torch.Tensor  # int64 [num_draft_tokens], on the model's device
    # float32 [num_draft_tokens, vocab]: the distribution q each draft was drawn from, after the
    # sequence's own temperature / top-k / top-p / min-p (rejection sampling needs it). None: every
    # draft is deterministic (a point mass), as n-gram drafts and greedy drafts are.
    probs: Optional[torch.Tensor] = None


class Proposer(ABC):
    """Guesses the next tokens of decoding sequences.

    Per step the engine first asks `max_drafts` for every decoding sequence (before scheduling: it
    decides the lookahead slots to ask for), then `propose` for the sequences that got slots, with
    the scheduled batch (block tables for proposers with a KV cache of their own). `release` says a
    sequence is gone. Proposers never touch the scheduler or the target's KV cache.
    """

    name: str = "proposer"
    kv_bytes_per_block: int = 0  # a proposer with its own KV pool mirrors the target's block ids
    needs_target_features = False  # True: record_features(slot_mapping) runs after every target forward

    def capture_graphs(self, runner) -> None:
        """Called once after bind(): a proposer with its own model may capture CUDA graphs (GPU)."""

    def record_features(self, slot_mapping: torch.Tensor) -> None:
        """The target just computed the tokens of these KV slots (its aux hidden states are on the model)."""

    def bind(self, num_blocks: int) -> None:
        """Called once the target's KV pool is sized (a proposer with KV allocates its pool)."""

    def max_drafts(self, seq_id: int, token_ids: np.ndarray, k: int) -> int:
        """How many of k drafts this proposer can offer for the sequence now (k by default)."""
        return k

    @abstractmethod
    def propose(self, batch, seqs: list[SpecSequence]) -> Proposal:
        """Drafts for every lookahead slot of `batch`; `seqs` are its sequences with slots, in batch order."""

    def observe(self, batch, hidden: torch.Tensor, output_token_ids: torch.Tensor) -> None:
        """The target's final hidden states of the step (for feature-based proposers); default: unused."""

    def verified(self, seq_id: int, num_accepted: int) -> None:
        """The target accepted the first num_accepted drafts of the sequence's last proposal."""

    def release(self, live_seq_ids: set[int]) -> None:
        """Forget the state of every sequence not in `live_seq_ids`."""

"""Speculative decoding counters, per proposer (engine stats and /metrics)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SpecCounters:
    method: str
    num_spec_steps: int = 0  # steps that verified drafts
    num_verified_seqs: int = 0  # sequence-steps with at least one draft
    num_draft_tokens: int = 0  # drafts proposed and verified
    num_accepted_tokens: int = 0  # of those, accepted

    def record(self, num_seqs: int, num_drafts: int, num_accepted: int) -> None:
        self.num_spec_steps += 1
        self.num_verified_seqs += num_seqs
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += num_accepted

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verified sequence-step: accepted drafts plus the one token every step yields."""
        return 1.0 + self.num_accepted_tokens / self.num_verified_seqs if self.num_verified_seqs else 0.0

"""A scheduled batch as a plain, picklable value: what rank 0 sends every other rank each step.

The scheduler's `ScheduledBatch` is a C++ object whose arrays are views of its own memory; the
model runner reads only the fields below, so these travel (pickling copies each array once).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_SCALARS = ("num_seqs", "num_tokens", "num_sampled", "max_query_len", "max_seq_len", "max_blocks_per_seq", "step_id")
_ARRAYS = ("request_ids", "input_token_ids", "positions", "query_start_loc", "seq_lens", "num_computed",
           "slot_mapping", "logits_indices", "sampled_request_ids", "block_tables",
           "draft_token_indices", "verify_logits_indices")  # the last two: a speculative step's, else empty


@dataclass
class StepArrays:
    num_seqs: int
    num_tokens: int
    num_sampled: int
    max_query_len: int
    max_seq_len: int
    max_blocks_per_seq: int
    step_id: int
    request_ids: np.ndarray
    input_token_ids: np.ndarray
    positions: np.ndarray
    query_start_loc: np.ndarray
    seq_lens: np.ndarray
    num_computed: np.ndarray
    slot_mapping: np.ndarray
    logits_indices: np.ndarray
    sampled_request_ids: np.ndarray
    block_tables: np.ndarray
    draft_token_indices: np.ndarray
    verify_logits_indices: np.ndarray

    @classmethod
    def of(cls, batch) -> "StepArrays":
        """Views of `batch`'s arrays (pickle them before the batch goes away)."""
        return cls(**{name: int(getattr(batch, name)) for name in _SCALARS},
                   **{name: np.asarray(getattr(batch, name)) for name in _ARRAYS})

"""DecodeInputs: a decode step's arrays packed into the static buffers the CUDA graphs read
(run here on the CPU, where the "device" buffer is host memory: the layout and the packing are
the same)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rtpllm.engine.decode_inputs import DecodeInputs
from rtpllm.engine.in_flight import PendingInputs


def decode_batch(token_ids, positions, slots, seq_lens, block_tables):
    block_tables = np.asarray(block_tables, dtype=np.int32)
    return SimpleNamespace(
        num_seqs=len(token_ids), input_token_ids=np.asarray(token_ids, dtype=np.int32),
        positions=np.asarray(positions, dtype=np.int32), slot_mapping=np.asarray(slots, dtype=np.int64),
        seq_lens=np.asarray(seq_lens, dtype=np.int32), block_tables=block_tables)


def test_rows_land_in_the_static_views_and_padding_rows_are_inert():
    inputs = DecodeInputs(max_batch=8, max_blocks_per_seq=5, device=torch.device("cpu"))
    batch = decode_batch([11, 12, 13], [4, 9, 30], [36, 73, 94], [5, 10, 31],
                         [[2, 0], [4, 1], [5, 6]])
    inputs.load(batch, bucket=4, pending=None)
    assert inputs.input_ids[:3].tolist() == [11, 12, 13]
    assert inputs.positions[:3].tolist() == [4, 9, 30]
    assert inputs.slot_mapping[:4].tolist() == [36, 73, 94, -1]
    assert inputs.seq_lens[:4].tolist() == [5, 10, 31, 0]
    assert inputs.block_tables[:3, :2].tolist() == [[2, 0], [4, 1], [5, 6]]
    assert inputs.input_ids.dtype == torch.int64 and inputs.seq_lens.dtype == torch.int32
    assert inputs.block_tables.dtype == torch.int32 and inputs.block_tables.shape == (8, 5)


def test_a_smaller_step_after_a_larger_one_pads_the_rows_it_left():
    inputs = DecodeInputs(max_batch=8, max_blocks_per_seq=4, device=torch.device("cpu"))
    inputs.load(decode_batch([1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4], [2, 3, 4, 5], [[0]] * 4), 4, None)
    inputs.load(decode_batch([7], [8], [9], [10], [[3]]), 4, None)
    assert inputs.slot_mapping[:4].tolist() == [9, -1, -1, -1]
    assert inputs.seq_lens[:4].tolist() == [10, 0, 0, 0]


def test_pending_tokens_are_gathered_from_the_step_in_flight():
    inputs = DecodeInputs(max_batch=4, max_blocks_per_seq=2, device=torch.device("cpu"))
    batch = decode_batch([-1, 21, -1], [3, 4, 5], [3, 4, 5], [4, 5, 6], [[0], [1], [2]])
    previous_tokens = torch.tensor([500, 600, 700], dtype=torch.int64)
    pending = PendingInputs(positions=np.array([0, 2], dtype=np.int64), rows=np.array([2, 0], dtype=np.int64),
                            token_ids=previous_tokens)
    inputs.load(batch, bucket=4, pending=pending)
    assert inputs.input_ids[:3].tolist() == [700, 21, 500]


def test_a_batch_that_does_not_fit_is_refused():
    inputs = DecodeInputs(max_batch=4, max_blocks_per_seq=2, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="do not fit"):
        inputs.load(decode_batch([1], [1], [1], [2], [[0, 1, 2]]), bucket=1, pending=None)
    with pytest.raises(ValueError, match="do not fit"):
        inputs.load(decode_batch([1, 2], [1, 2], [1, 2], [2, 3], [[0], [1]]), bucket=1, pending=None)

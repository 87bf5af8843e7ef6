"""The verify-step CUDA graphs' host side on the CPU: how a step is packed into the graphs' one
input buffer (token ids, positions, KV slots, block tables, draft rows, padding) and which output
rows come back. The graph is replaced by an eager forward over the same device views, so a wrong
offset, row or padding value changes the greedy output, which must stay token-exact."""

import numpy as np
import pytest
import torch

from checkpoints import checkpoint_path
from rtpllm import LLM, SamplingParams
from rtpllm.layers.attention_metadata import AttentionMetadata
from rtpllm.spec.oracle import OracleProposer
from rtpllm.spec.verify_graphs import MAX_GRAPH_ROWS, VerifyGraphs, VerifyInputs, verify_graph_shapes

GREEDY = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
PROMPTS = [[5 + i for i in range(n)] for n in (3, 11, 30)] + [[7, 9, 11] * 6, [400, 3, 17]]


class EagerVerifyGraphs(VerifyGraphs):
    """Replays each (bucket, k) "graph" as an eager forward of its real rows (slot >= 0), read from
    the same packed views the captured graph would read."""

    def _capture(self) -> None:
        self.replays = 0
        self.replayed = set()  # (bucket, k) shapes replayed
        self._logits = torch.full((self.inputs.max_rows, self.model.arch.vocab_size), float("nan"))
        for bucket, k in self.shapes:
            self._graphs[(bucket, k)] = _Replay(self, bucket, k)


class _Replay:
    def __init__(self, graphs: EagerVerifyGraphs, bucket: int, k: int):
        self.graphs, self.bucket, self.k = graphs, bucket, k

    def replay(self) -> None:
        g, width = self.graphs, self.k + 1
        rows = self.bucket * width
        real = g.slot_mapping[:rows] >= 0
        counts = real.view(self.bucket, width).sum(dim=1)
        seqs = counts > 0
        # Padding: every padded row of a real sequence repeats its last position, padding sequences
        # have context width (as the extend kernel is told) and no row writes K/V.
        assert torch.equal(g.seq_lens[:self.bucket][seqs], g.num_computed[:self.bucket][seqs] + width)
        assert torch.all(g.seq_lens[:self.bucket][~seqs] == width)
        meta = AttentionMetadata(
            slot_mapping=g.slot_mapping[:rows][real],
            query_start_loc=torch.cat([torch.zeros(1, dtype=torch.int32), counts[seqs].cumsum(0).int()]),
            seq_lens=(g.num_computed[:self.bucket][seqs] + counts[seqs]).int(),
            num_computed=g.num_computed[:self.bucket][seqs], block_tables=g.block_tables[:self.bucket][seqs],
            max_query_len=int(counts.max()), max_seq_len=int((g.num_computed[:self.bucket] + counts).max()))
        hidden = g.model(g.input_ids[:rows][real], g.positions[:rows][real], g.kv_caches, meta)
        g._logits.fill_(float("nan"))  # rows the step does not compute must never be read
        g._logits[:rows][real] = g.model.compute_logits(hidden)
        g.replays += 1
        g.replayed.add((self.bucket, self.k))


@pytest.fixture(scope="module")
def target():
    return checkpoint_path("llama3")


@pytest.mark.parametrize("acceptance", [1.0, 0.5])
def test_packed_verify_inputs_give_the_eager_answers(target, acceptance):
    want = [list(o.outputs[0].token_ids) for o in LLM(model=target, num_blocks=128).generate(PROMPTS, GREEDY)]
    llm = LLM(model=target, num_blocks=128,
              speculative_config=dict(method="ngram", num_speculative_tokens=4, adaptive=False))
    runner = llm.engine.runner
    graphs = EagerVerifyGraphs(runner.model, runner.kv_caches, max_batch=4, max_k=4, max_blocks_per_seq=8,
                               block_size=runner.block_size, device=runner.device)
    runner.verify_graphs = graphs
    llm.engine.spec.proposer = OracleProposer([p + w for p, w in zip(PROMPTS, want)], runner.device, acceptance,
                                              vocab_size=512)
    assert [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS[:4], GREEDY)] == want[:4]
    assert [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, GREEDY)] == want  # 5 > max_batch: eager too
    assert graphs.replays > 0
    spec = llm.engine.stats().spec
    assert spec.num_accepted_tokens > 0 and (acceptance < 1 or spec.num_accepted_tokens == spec.num_draft_tokens)
    assert llm.engine.check_kv_pool_free()


def test_capture_shapes_reach_large_batches_within_the_row_limit():
    shapes = verify_graph_shapes(max_batch=128, max_k=8)
    assert all(b * (k + 1) <= MAX_GRAPH_ROWS for b, k in shapes)
    assert {(b, k) for b in (1, 2, 4, 8, 16) for k in range(1, 9)} <= set(shapes)  # small batches: every k
    assert (32, 7) in shapes and (32, 8) not in shapes and (64, 3) in shapes and (128, 1) in shapes
    assert max(b for b, _ in shapes) == 128 and len(shapes) == 64
    rows = [b * (k + 1) for b, k in shapes]
    assert rows == sorted(rows, reverse=True)  # the largest first: it sizes the shared pool
    assert max(b for b, _ in verify_graph_shapes(max_batch=40, max_k=4)) == 32  # only the listed buckets


@pytest.mark.parametrize("max_rows", [128, 64])
def test_batches_above_16(target, max_rows):
    """20 sequences with 4 drafts each: bucket 24 has a graph for k = 4 within 128 rows (it pads four
    sequences), none within 64 rows (the step verifies eagerly). Both stay token-exact."""
    prompts = [[3 + (7 * i + j) % 500 for j in range(4 + i)] for i in range(20)]
    want = [list(o.outputs[0].token_ids) for o in LLM(model=target, num_blocks=256).generate(prompts, GREEDY)]
    llm = LLM(model=target, num_blocks=256, max_num_seqs=32,
              speculative_config=dict(method="ngram", num_speculative_tokens=4, adaptive=False))
    runner = llm.engine.runner
    graphs = EagerVerifyGraphs(runner.model, runner.kv_caches, max_batch=32, max_k=4, max_blocks_per_seq=8,
                               block_size=runner.block_size, device=runner.device, max_rows=max_rows)
    runner.verify_graphs = graphs
    llm.engine.spec.proposer = OracleProposer([p + w for p, w in zip(prompts, want)], runner.device, 1.0,
                                              vocab_size=512)
    assert [list(o.outputs[0].token_ids) for o in llm.generate(prompts, GREEDY)] == want
    assert ((24, 4) in graphs.replayed) == (max_rows == 128)
    assert llm.engine.check_kv_pool_free()


def test_verify_inputs_upload_is_one_copy_of_the_used_prefix():
    inputs = VerifyInputs(max_rows=10, max_batch=2, max_blocks=3, device=torch.device("cpu"))
    host = inputs.staging()
    host["input_ids"][:4] = [1, 2, 3, 4]
    host["seq_lens"][:2] = [7, 8]
    host["block_tables"][:2] = [[1, 2, 3], [4, 5, 6]]
    inputs.upload(bucket=1)  # the block table's second row is not copied
    views = inputs.views
    assert views["input_ids"][:4].tolist() == [1, 2, 3, 4]
    assert views["seq_lens"].tolist() == [7, 8]
    assert views["block_tables"].tolist() == [[1, 2, 3], [0, 0, 0]]
    assert inputs.staging() is not host  # a ring: the next step packs into the other buffer
    np.testing.assert_array_equal(host["input_ids"][:4], [1, 2, 3, 4])

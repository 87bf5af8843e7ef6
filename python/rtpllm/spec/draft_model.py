"""A smaller checkpoint with the target's vocabulary proposes drafts autoregressively.

KV: the draft keeps its own pool, one tensor per draft layer with the same number of blocks and
block size as the target's, addressed by the *target's* block ids (the engine sizes the target pool
for both). Position p of a sequence therefore lives in the same slot in both pools, and the draft
needs no block manager of its own: it reads the sequence's block table from the scheduled batch.
Blocks are only written by the sequence holding them (prefix-shared blocks get identical values
for identical tokens), so this mirrors the target without extra bookkeeping.

Per sequence the draft remembers how many leading positions of its KV are valid (`_DraftState`):
after a proposal its KV covers the last known token and all but the last draft; once the target
has verified the step, only the accepted part stays valid. The next proposal first recomputes the
positions from there to the last known token (the whole prompt the first time, a couple of tokens
in steady state), then runs one step per draft. A block table that changed under a sequence
(preemption) invalidates the KV from the first changed block on.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Optional

import numpy as np
import torch

from rtpllm.engine.cuda_graph import DecodeGraphs
from rtpllm.engine.in_flight import PendingInputs
from rtpllm.engine.kv_cache import allocate_kv_caches, kv_bytes_per_block
from rtpllm.layers.attention_metadata import AttentionMetadata
from rtpllm.layers.sampler import argmax_rows, filtered_probs
from rtpllm.layers.sampling_batch import SamplingBatch
from rtpllm.loader import load_model_and_tokenizer
from rtpllm.spec.penalties import DraftPenalties
from rtpllm.spec.proposer import Proposal, Proposer, SpecSequence, to_device
from rtpllm.spec.verifier import sample_with


@dataclass
class _DraftState:
    valid: int = 0  # leading positions whose draft KV matches the sequence's tokens
    blocks: tuple = ()  # the block ids that KV lives in
    proposed_at: int = 0  # token count when the last proposal was made
    proposed_upto: int = 0  # positions its KV covered after that proposal


def check_same_vocabulary(draft_arch, target_arch, field: str = "speculative_config.model") -> None:
    if draft_arch.vocab_size != target_arch.vocab_size:
        raise ValueError(f"{field}: the draft's vocabulary has {draft_arch.vocab_size} tokens, the target's "
                         f"{target_arch.vocab_size}; a draft must share the target's tokenizer")


class DraftModelProposer(Proposer):
    name = "draft_model"

    def __init__(self, model: torch.nn.Module, arch, device: torch.device, dtype: torch.dtype, block_size: int):
        self.model = model
        self.arch = arch
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.kv_bytes_per_block = kv_bytes_per_block(arch.num_layers, arch.num_kv_heads, arch.head_dim, block_size,
                                                     dtype)
        self.kv_caches: Optional[list[torch.Tensor]] = None
        self.graphs: Optional[DecodeGraphs] = None  # decode graphs of the draft (GPU), see capture_graphs
        self._states: dict[int, _DraftState] = {}
        self._penalties: Optional[DraftPenalties] = None  # the proposal under way's, when it has penalties
        self._generator = torch.Generator(device=device).manual_seed(0x5eed)

    @classmethod
    def load(cls, path: str, *, target_arch, device: torch.device, dtype: torch.dtype, block_size: int,
             attn_backend_factory: Optional[Callable] = None) -> "DraftModelProposer":
        loaded = load_model_and_tokenizer(path, dtype=dtype, device=device, attn_backend_factory=attn_backend_factory)
        check_same_vocabulary(loaded.arch, target_arch)
        return cls(loaded.model, loaded.arch, device, dtype, block_size)

    def bind(self, num_blocks: int) -> None:
        """Allocates the draft's KV pool with the target's block count (after the target's sizing)."""
        self.kv_caches = allocate_kv_caches(self.arch.num_layers, num_blocks, self.block_size, self.arch.num_kv_heads,
                                            self.arch.head_dim, self.dtype, self.device)

    # ------------------------------------------------------------------ proposing
    @torch.inference_mode()
    def propose(self, batch, seqs: list[SpecSequence]) -> Proposal:
        if self.kv_caches is None:
            raise RuntimeError("draft_model: bind(num_blocks) before proposing")
        tables = batch.block_tables
        rows = [tables[seq.batch_index] for seq in seqs]
        starts = [self._valid_prefix(seq, row) for seq, row in zip(seqs, rows)]
        lengths = [seq.token_ids.shape[0] for seq in seqs]
        sampling = self._sampling_batch(seqs)
        self._penalties = DraftPenalties.build(seqs, self.device)  # drafts see the penalised view too
        # Step 1: catch up from the valid prefix to the last known token; its logits give draft 1.
        inputs = [seq.token_ids[start:n] for seq, start, n in zip(seqs, starts, lengths)]
        logits = self._forward(inputs, starts, rows)
        drafts, probs = self._draw(logits, sampling, list(range(len(seqs))))
        steps_tokens = [drafts]
        steps_probs = [probs]
        active = list(range(len(seqs)))
        max_k = max(seq.num_drafts for seq in seqs)
        for j in range(1, max_k):
            # Sequences still wanting drafts feed their previous draft at position n + j - 1.
            keep = [i for i, pos in enumerate(active) if seqs[pos].num_drafts > j]
            active = [active[i] for i in keep]
            prev = steps_tokens[-1][to_device(keep, self.device, torch.int64)] if len(keep) != len(steps_tokens[-1]) \
                else steps_tokens[-1]
            logits = self._forward_tokens(prev, [lengths[i] + j - 1 for i in active], [rows[i] for i in active])
            drafts, probs = self._draw(logits, sampling, active)
            steps_tokens.append(drafts)
            steps_probs.append(probs)
        for seq, row, n in zip(seqs, rows, lengths):
            upto = n + seq.num_drafts - 1
            self._states[seq.seq_id] = _DraftState(valid=upto, blocks=tuple(row[:-(-upto // self.block_size)]),
                                                   proposed_at=n, proposed_upto=upto)
        return self._assemble(seqs, steps_tokens, steps_probs)

    def verified(self, seq_id: int, num_accepted: int) -> None:
        """After the target's verification: only the accepted drafts' KV stays valid."""
        state = self._states.get(seq_id)
        if state is not None:
            state.valid = min(state.proposed_upto, state.proposed_at + num_accepted)

    def release(self, live_seq_ids: set[int]) -> None:
        for seq_id in [s for s in self._states if s not in live_seq_ids]:
            del self._states[seq_id]

    # ------------------------------------------------------------------ helpers
    def _valid_prefix(self, seq: SpecSequence, row: np.ndarray) -> int:
        state = self._states.get(seq.seq_id)
        if state is None:
            return 0
        valid = min(state.valid, seq.token_ids.shape[0] - 1)
        for i, block in enumerate(state.blocks):
            if i * self.block_size >= valid:
                break
            if row[i] != block:
                return i * self.block_size
        return valid

    def _sampling_batch(self, seqs: list[SpecSequence]) -> Optional[SamplingBatch]:
        if all(seq.params.greedy for seq in seqs):
            return None
        n = len(seqs)
        # Seeded sequences draw their drafts from their own generator: a seeded run stays reproducible.
        return SamplingBatch.build([seq.params for seq in seqs], [[]] * n, [[]] * n, [seq.generator for seq in seqs],
                                   self.device, default_generator=self._generator)

    def _draw(self, logits: torch.Tensor, sampling: Optional[SamplingBatch], seq_rows: list[int]
              ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Greedy sequences take the argmax (a point mass); others draw from q, the draft's
        distribution after the sequence's own penalties, temperature and filters, which verification
        needs. `seq_rows` are the sequences still drafting, in order (one logits row each)."""
        if self._penalties is not None:
            logits = self._penalties.apply(logits)
        drawn, q = self._draw_from(logits, sampling, seq_rows)
        if self._penalties is not None:
            self._penalties.record(drawn)
        return drawn, q

    def _draw_from(self, logits: torch.Tensor, sampling: Optional[SamplingBatch], seq_rows: list[int]
                   ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        argmax = argmax_rows(logits)
        if sampling is None:
            return argmax, None
        rows = to_device(seq_rows, self.device, torch.int64)
        q = filtered_probs(logits, sampling, rows)
        uniform = torch.rand(logits.shape[0], device=self.device, generator=self._generator)
        for i, row in enumerate(seq_rows):
            if sampling.generators[row] is not None:
                uniform[i].uniform_(generator=sampling.generators[row])
        greedy = sampling.greedy.index_select(0, rows)
        drawn = torch.where(greedy, argmax, sample_with(q, uniform, argmax))
        # A greedy row's q is the point mass at its argmax: rejection sampling then reduces to
        # greedy acceptance there (the verifier treats greedy rows by argmax anyway).
        q = torch.where(greedy.unsqueeze(1), torch.nn.functional.one_hot(argmax, q.shape[1]).to(q.dtype), q)
        return drawn, q

    def _assemble(self, seqs, steps_tokens, steps_probs) -> Proposal:
        """Per-step draft tensors -> sequence-major order (batch.draft_token_indices)."""
        order = []
        for s, seq in enumerate(seqs):
            for j in range(seq.num_drafts):
                # Sequences drop out of later steps in order, so seq s's row in step j is the count
                # of sequences before it that are still active at step j.
                order.append((j, sum(1 for t in seqs[:s] if t.num_drafts > j)))
        flat_offsets = np.cumsum([0] + [t.shape[0] for t in steps_tokens])
        index = to_device([flat_offsets[j] + r for j, r in order], self.device, torch.int64)
        tokens = torch.cat(steps_tokens).index_select(0, index)
        probs = None if steps_probs[0] is None else torch.cat(steps_probs).index_select(0, index)
        return Proposal(token_ids=tokens, probs=probs)

    def _forward(self, inputs: list[np.ndarray], starts: list[int], rows: list[np.ndarray]) -> torch.Tensor:
        """Runs the draft over each sequence's `inputs` at positions start.. and returns the logits
        of each sequence's last input."""
        lens = np.array([x.shape[0] for x in inputs], dtype=np.int64)
        positions = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lens)])
        token_ids = to_device(np.concatenate(inputs).astype(np.int64), self.device)
        seq_of_token = np.repeat(np.arange(len(inputs)), lens)
        return self._run(token_ids, positions, seq_of_token, np.asarray(starts, dtype=np.int64), lens, rows)

    def _forward_tokens(self, token_ids: torch.Tensor, positions: list[int], rows: list[np.ndarray]) -> torch.Tensor:
        """One token per sequence (a draft decode step): replays the draft's decode CUDA graph when it has them."""
        n = len(positions)
        pos = np.asarray(positions, dtype=np.int64)
        if self.graphs is not None:
            tables, slots = host_layout(pos, np.arange(n), rows, self.block_size)
            step = SimpleNamespace(num_seqs=n, max_query_len=1, input_token_ids=np.full(n, -1, dtype=np.int64),
                                   positions=pos, slot_mapping=slots, seq_lens=(pos + 1).astype(np.int32),
                                   block_tables=tables)
            if self.graphs.can_run(step):
                index = np.arange(n, dtype=np.int64)
                return self.graphs.run(step, PendingInputs(index, index, token_ids))
        return self._run(token_ids, pos, np.arange(n), pos, np.ones(n, dtype=np.int64), rows)

    def capture_graphs(self, runner) -> None:
        """CUDA graphs for the draft's one-token steps, in the target's batch-size buckets (when the target has them)."""
        target_graphs = getattr(runner, "graphs", None)
        backend = getattr(self.model, "attn_backend", None)
        if target_graphs is None or not hasattr(backend, "plan") or not hasattr(self.model, "compute_logits"):
            return
        max_blocks = target_graphs.max_blocks_per_seq
        self.graphs = DecodeGraphs(self.model, self.kv_caches, backend.plan, max_batch=target_graphs.max_batch,
                                   max_blocks_per_seq=max_blocks, max_model_len=max_blocks * self.block_size,
                                   device=self.device)

    def _run(self, token_ids: torch.Tensor, positions: np.ndarray, seq_of_token: np.ndarray, computed: np.ndarray,
             lens: np.ndarray, rows: list[np.ndarray]) -> torch.Tensor:
        meta, positions_dev, last = draft_metadata(positions, seq_of_token, computed, lens, rows, self.block_size,
                                                   self.device)
        hidden = self.model(token_ids, positions_dev, self.kv_caches, meta)
        return self.model.compute_logits(hidden.index_select(0, last))


def host_layout(positions: np.ndarray, seq_of_token: np.ndarray, rows: list[np.ndarray], block_size: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """(block tables int32 [num_seqs, width], slot of every token int64) from the target's rows."""
    width = max(r.shape[0] for r in rows)
    tables = np.zeros((len(rows), width), dtype=np.int32)
    for i, r in enumerate(rows):
        tables[i, :r.shape[0]] = r
    slots = tables[seq_of_token, positions // block_size].astype(np.int64) * block_size + positions % block_size
    return tables, slots


def draft_metadata(positions: np.ndarray, seq_of_token: np.ndarray, computed: np.ndarray, lens: np.ndarray,
                   rows: list[np.ndarray], block_size: int, device: torch.device
                   ) -> tuple[AttentionMetadata, torch.Tensor, torch.Tensor]:
    """Attention metadata for a proposer's own forward over the target's block tables: each
    sequence computes `lens[i]` tokens from position `computed[i]`. Returns (meta, positions as an
    int64 device tensor, the index of each sequence's last token)."""
    tables, slots = host_layout(positions, seq_of_token, rows, block_size)
    seq_lens = (computed + lens).astype(np.int32)
    query_start = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    decode_only = bool((lens == 1).all())
    dev = lambda a: to_device(a, device)  # noqa: E731
    meta = AttentionMetadata(
        slot_mapping=dev(slots), query_start_loc=dev(query_start), seq_lens=dev(seq_lens),
        num_computed=dev(computed.astype(np.int32)), block_tables=dev(tables),
        max_query_len=int(lens.max()), max_seq_len=int(seq_lens.max()),
        num_decodes=len(rows) if decode_only else 0, decode_max_seq_len=int(seq_lens.max()) if decode_only else 0)
    last = dev(query_start[1:].astype(np.int64) - 1)
    return meta, dev(positions.astype(np.int64)), last

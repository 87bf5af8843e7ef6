"""Turns a scheduled batch into a forward pass and sampled tokens on one device.

The C++ scheduler hands over contiguous int32/int64 arrays; this module moves them to the
device in one copy each, runs the model, and samples from the rows the scheduler asked for.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from rtpllm.config import EngineConfig
from rtpllm.engine.cuda_graph import DecodeGraphs
from rtpllm.engine.host_to_device import HostToDevice
from rtpllm.engine.in_flight import PendingInputs
from rtpllm.engine.kv_cache import allocate_kv_caches, kv_bytes_per_block, num_blocks_for_device
from rtpllm.layers.attention_metadata import AttentionMetadata, leading_decodes
from rtpllm.layers.sampler import Sampler, SamplerOutput


# Decode batches up to this size replay CUDA graphs; larger ones run eagerly (their launch
# overhead is small next to their work).
MAX_GRAPH_BATCH = 512


@dataclass
class StepResult:
    sampled: Optional[SamplerOutput]  # one row per entry of batch.logits_indices
    # For sequences that asked for prompt logprobs: seq index in the batch -> log-softmax rows
    # [num_new_tokens, vocab] of this step's tokens (row j predicts the token after position j).
    prompt_logprobs: dict[int, torch.Tensor]
    # Speculative steps (`drafts` given): logits float32 [rows, vocab] at every verified position
    # (batch.verify_logits_indices) and the final hidden states of all tokens; nothing sampled.
    verify_logits: Optional[torch.Tensor] = None
    hidden: Optional[torch.Tensor] = None


class ModelRunner:
    def __init__(self, model: torch.nn.Module, arch, config: EngineConfig, device: torch.device,
                 dtype: torch.dtype, max_model_len: int, agree_num_blocks: Optional[Callable[[int], int]] = None,
                 extra_kv_bytes_per_block: int = 0, bytes_in_use_before_load: int = 0):
        """`arch` gives the KV pool's layout (under tensor parallelism: the rank's KV heads);
        `agree_num_blocks` turns this rank's KV block count into the one every rank uses;
        `extra_kv_bytes_per_block` is KV kept beside each block by a draft model (spec/);
        `bytes_in_use_before_load` is what the process held on the device before this engine
        loaded its weights (another engine in the process), which is not this engine's."""
        self.model = model
        self.arch = arch
        self.device = device
        self.dtype = dtype
        self.block_size = config.cache.block_size
        self.max_num_batched_tokens = config.scheduler.max_num_batched_tokens
        self.sampler = Sampler()
        started = time.perf_counter()
        peak = self._profile_peak_memory() - bytes_in_use_before_load if device.type == "cuda" else 0
        self.profile_seconds = time.perf_counter() - started  # reported in the start-up phases
        bytes_per_block = kv_bytes_per_block(arch.num_layers, arch.num_kv_heads, arch.head_dim,
                                             self.block_size, dtype)
        # A draft model keeps its KV in blocks with the same ids (spec/draft_model.py): size the pool for both.
        bytes_per_block += extra_kv_bytes_per_block
        self.num_blocks = num_blocks_for_device(config.cache, bytes_per_block, device, peak)
        if agree_num_blocks is not None:
            self.num_blocks = agree_num_blocks(self.num_blocks)
        self.kv_caches = allocate_kv_caches(arch.num_layers, self.num_blocks, self.block_size,
                                            arch.num_kv_heads, arch.head_dim, dtype, device)
        self._to_device = HostToDevice(device)
        # Called after every target forward with the step's slot mapping (device): EAGLE-3 keeps
        # the target's features per KV slot (spec/eagle3.py). Set before the graphs are captured.
        self.after_forward: Optional[Callable[[torch.Tensor], None]] = None
        self.graphs: Optional[DecodeGraphs] = None
        self.verify_graphs = None  # speculative verify steps' CUDA graphs (spec/verify_graphs.py)
        backend = getattr(model, "attn_backend", None)
        if device.type == "cuda" and not config.device.enforce_eager and hasattr(backend, "plan"):
            # Capture only batch sizes a decode step can have: at most max_num_seqs sequences, one token
            # each within the step's token budget, and one KV block at least each.
            max_batch = min(config.scheduler.max_num_seqs, config.scheduler.max_num_batched_tokens, self.num_blocks,
                            MAX_GRAPH_BATCH)
            self.graphs = DecodeGraphs(
                model, self.kv_caches, backend.plan, max_batch=max_batch,
                max_blocks_per_seq=-(-max_model_len // self.block_size), max_model_len=max_model_len, device=device)

    def build_metadata(self, batch) -> AttentionMetadata:
        num_decodes, decode_max_seq_len = leading_decodes(batch.query_start_loc, batch.seq_lens)
        return AttentionMetadata(
            slot_mapping=self._to_device("slot_mapping", batch.slot_mapping),
            query_start_loc=self._to_device("query_start_loc", batch.query_start_loc),
            seq_lens=self._to_device("seq_lens", batch.seq_lens),
            num_computed=self._to_device("num_computed", batch.num_computed),
            block_tables=self._to_device("block_tables", batch.block_tables),
            max_query_len=int(batch.max_query_len),
            max_seq_len=int(batch.max_seq_len),
            num_decodes=num_decodes,
            decode_max_seq_len=decode_max_seq_len,
        )

    @torch.inference_mode()
    def execute(self, batch, sampling_batch, prompt_logprob_seqs: list[int],
                pending: Optional[PendingInputs] = None, drafts: Optional[torch.Tensor] = None) -> StepResult:
        """Runs one step. `prompt_logprob_seqs` are batch indices of sequences whose new tokens
        all need logits (prompt logprobs); every other sequence only computes its sampled row.
        `pending` names input tokens still on the device (sampled by the step in flight).
        Without `sampling_batch` (a tensor-parallel rank > 0) the logits are computed, for their
        collectives, but not sampled. `drafts` (int64 [batch.num_draft_tokens], device) fill the
        lookahead slots of a speculative step, whose verified rows' logits come back unsampled
        (spec/decoder.py)."""
        # A layer hook (a PD prefill pushing each layer's KV) needs the layers run from Python: no graph.
        if drafts is None and self.graphs is not None and not prompt_logprob_seqs and self.graphs.can_run(batch) \
                and getattr(self.model, "layer_hook", None) is None:
            # A decode step: every sequence samples its one row, in batch order.
            logits = self.graphs.run(batch, pending)
            if self.after_forward is not None:
                self.after_forward(self.graphs.inputs.slot_mapping[:batch.num_seqs])
            sampled = self.sampler(logits, sampling_batch) if sampling_batch is not None else None
            return StepResult(sampled=sampled, prompt_logprobs={})
        if drafts is not None and self.verify_graphs is not None and not prompt_logprob_seqs \
                and self.verify_graphs.can_run(batch):
            logits, slots = self.verify_graphs.run(batch, drafts)
            if self.after_forward is not None:
                self.after_forward(slots)
            return StepResult(sampled=None, prompt_logprobs={}, verify_logits=logits)
        self._to_device.begin_step()
        input_ids = self._to_device("input_ids", batch.input_token_ids).long()
        if pending is not None:
            positions = self._to_device("pending_positions", pending.positions)
            rows = self._to_device("pending_rows", pending.rows)
            input_ids[positions] = pending.token_ids[rows].long()
        if drafts is not None:
            input_ids[self._to_device("draft_token_indices", batch.draft_token_indices).long()] = drafts
        positions = self._to_device("positions", batch.positions).long()
        meta = self.build_metadata(batch)
        logits_indices = self._to_device("logits_indices", batch.verify_logits_indices if drafts is not None
                                         else batch.logits_indices).long()
        self._to_device.end_step()
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        if self.after_forward is not None:
            self.after_forward(meta.slot_mapping)

        sampled = verify_logits = None
        if drafts is not None:
            verify_logits = self.model.compute_logits(hidden.index_select(0, logits_indices))
        elif batch.num_sampled > 0:
            logits = self.model.compute_logits(hidden.index_select(0, logits_indices))
            sampled = self.sampler(logits, sampling_batch) if sampling_batch is not None else None

        prompt_logprobs: dict[int, torch.Tensor] = {}
        starts = batch.query_start_loc
        for seq in prompt_logprob_seqs:
            rows = hidden[int(starts[seq]):int(starts[seq + 1])]
            prompt_logprobs[seq] = torch.log_softmax(self.model.compute_logits(rows), dim=-1)
        return StepResult(sampled=sampled, prompt_logprobs=prompt_logprobs, verify_logits=verify_logits,
                          hidden=hidden if drafts is not None else None)

    @torch.inference_mode()
    def _profile_peak_memory(self) -> int:
        """Runs the largest prefill the scheduler may issue on a throwaway one-block cache and
        returns the peak bytes in use (weights + activations), so the KV pool gets the rest."""
        tokens = self.max_num_batched_tokens
        blocks = (tokens + self.block_size - 1) // self.block_size
        scratch = allocate_kv_caches(self.arch.num_layers, blocks, self.block_size, self.arch.num_kv_heads,
                                     self.arch.head_dim, self.dtype, self.device)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        positions = torch.arange(tokens, device=self.device)
        meta = AttentionMetadata(
            slot_mapping=positions.clone(),
            query_start_loc=torch.tensor([0, tokens], dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor([tokens], dtype=torch.int32, device=self.device),
            num_computed=torch.zeros(1, dtype=torch.int32, device=self.device),
            block_tables=torch.arange(blocks, dtype=torch.int32, device=self.device).unsqueeze(0),
            max_query_len=tokens, max_seq_len=tokens)
        input_ids = torch.zeros(tokens, dtype=torch.long, device=self.device)
        hidden = self.model(input_ids, positions, scratch, meta)
        self.model.compute_logits(hidden[-1:])
        torch.cuda.synchronize(self.device)
        scratch_bytes = sum(t.numel() * t.element_size() for t in scratch)
        peak = torch.cuda.max_memory_allocated(self.device) - scratch_bytes
        del scratch, hidden
        torch.cuda.empty_cache()
        return peak

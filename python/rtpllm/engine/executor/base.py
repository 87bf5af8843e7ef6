"""The executor: what runs the model for the engine, on one device or on several.

The engine schedules once and talks only to this interface; how many ranks run the step, and
where, is the executor's business (UniProcExecutor: one device, in the engine's process;
MultiprocExecutor: tensor-parallel ranks in worker processes of one host; later several hosts).

Lifecycle: `load_model()` (every rank loads its shard; returns rank 0's model, tokenizer and
architecture), `init_runner(max_model_len)` (every rank sizes its KV pool; `num_blocks` is then
the count all ranks share), `execute(...)` once per step, `shutdown()` (idempotent).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional

import torch

from rtpllm.engine.in_flight import PendingInputs
from rtpllm.engine.model_runner import ModelRunner, StepResult
from rtpllm.loader import LoadedModel


class WorkerFailedError(RuntimeError):
    """A tensor-parallel rank died or failed; the executor cannot run steps any more."""

    def __init__(self, rank: int, reason: str):
        super().__init__(f"tensor-parallel worker rank {rank} {reason}")
        self.rank = rank


class Executor(ABC):
    runner: ModelRunner  # rank 0's runner (its model, KV pool and CUDA graphs), for introspection

    @abstractmethod
    def load_model(self) -> LoadedModel: ...

    @abstractmethod
    def init_runner(self, max_model_len: int, extra_kv_bytes_per_block: int = 0, kv_root_hash: int = 0) -> None:
        """`extra_kv_bytes_per_block`: KV a draft model keeps beside each block (spec/).
        `kv_root_hash`: the cache identity, which the other ranks' KV tiers key their blocks from."""

    @property
    def num_blocks(self) -> int:
        return self.runner.num_blocks

    @abstractmethod
    def execute(self, batch, sampling_batch, prompt_logprob_seqs: list[int],
                pending: Optional[PendingInputs] = None, drafts: Optional[torch.Tensor] = None) -> StepResult:
        """Runs one step on every rank; rank 0's result (sampled tokens, prompt logprobs; with
        `drafts`, a speculative verify step's logits: ModelRunner.execute). Raises
        WorkerFailedError when a rank has died."""

    def mirror_kv_tiers(self, connector) -> None:
        """Tensor parallelism: the other ranks repeat the loads and saves of rank 0's tiers
        (`connector`: a _C.MirroredKVConnector; engine/kv_tier_mirror.py)."""
        raise NotImplementedError(f"{type(self).__name__} has no other ranks")

    def pump_kv_tiers(self) -> None:
        """Ships the tier operations started since the last call to the other ranks and hands
        their answers to the connector. Call before every schedule(); execute() calls it itself
        before it sends a step. No-op on one rank."""

    @abstractmethod
    def shutdown(self) -> None: ...

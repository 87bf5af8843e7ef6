"""One tensor-parallel rank: its shard of the model, its KV pool and its ModelRunner.

Rank 0's `Worker` lives in the engine's process (the executors call it directly); every other
rank's runs in a worker process (worker_main.py) that the MultiprocExecutor drives. All ranks run
the same sequence (join the group, load, size the KV pool, then one `execute` per step), so the
collectives inside line up.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from rtpllm.config import EngineConfig
from rtpllm.distributed.tp_group import TPGroup
from rtpllm.engine.device import attention_backend_factory
from rtpllm.engine.in_flight import PendingInputs
from rtpllm.engine.model_runner import ModelRunner, StepResult
from rtpllm.loader import LoadedModel, load_model_and_tokenizer
from rtpllm.models.llama_shards import rank_local_arch


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a rank needs to set itself up (sent, pickled, to a worker process)."""

    config: EngineConfig
    model_path: str
    device: torch.device  # this rank's device: cuda:rank, or the CPU
    dtype: torch.dtype
    rank: int = 0
    world_size: int = 1
    store_port: int = 0  # rank 0's TCP store, where the group meets (world_size > 1)


def rank_device(device: torch.device, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device.type == "cuda" else device


class Worker:
    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.tp = TPGroup(spec.rank, spec.world_size, spec.device) if spec.world_size > 1 else None
        if spec.device.type == "cuda" and self.tp is not None:
            torch.cuda.set_device(spec.device)  # kernels, graphs and streams that use the current device
        self.loaded: Optional[LoadedModel] = None
        self.bytes_in_use_before_load = 0  # another engine's, in this process (sizes this one's KV pool)
        self.runner: Optional[ModelRunner] = None
        # Rank > 0: the tokens rank 0 sampled last step (placeholders of the next step read them).
        self.last_sampled: Optional[torch.Tensor] = None

    def join_group(self, store=None) -> None:
        """Joins the tensor-parallel group (rank 0 passes the store it hosts). Loading needs no
        group, so ranks load first and join after: a rank that fails to load is seen before
        anyone waits in the group for it."""
        spec = self.spec
        if self.tp is not None:
            self.tp.join(store or TPGroup.create_store(spec.rank, spec.world_size, spec.store_port))

    def load_model(self) -> LoadedModel:
        spec = self.spec
        factory = attention_backend_factory(spec.device, spec.dtype, spec.config.cache.block_size)
        if factory is not None and self.tp is not None:
            base, rank, world = factory, spec.rank, spec.world_size
            factory = lambda arch: base(rank_local_arch(arch, rank, world))  # noqa: E731 - the rank's heads
        if spec.device.type == "cuda":
            self.bytes_in_use_before_load = torch.cuda.memory_allocated(spec.device)
        self.loaded = load_model_and_tokenizer(spec.model_path, dtype=spec.dtype, device=spec.device,
                                               attn_backend_factory=factory, tensor_parallel=self.tp,
                                               load_format=spec.config.model.load_format,
                                               load_tokenizer=False)  # the engine's own: Engine._tokenizer
        return self.loaded

    def init_runner(self, max_model_len: int, extra_kv_bytes_per_block: int = 0) -> int:
        """Profiles, sizes and allocates the KV pool (every rank agrees on the smallest block
        count), captures the CUDA graphs; returns the number of KV blocks."""
        spec = self.spec
        arch = rank_local_arch(self.loaded.arch, spec.rank, spec.world_size)
        config = spec.config
        if spec.device.type == "cpu" and spec.world_size > 1:
            # The ranks share the host's memory: cpu_kv_cache_gib is the pool of them all (each
            # rank's blocks hold only its KV heads, so the block count stays about TP=1's).
            cache = dataclasses.replace(config.cache, cpu_kv_cache_gib=config.cache.cpu_kv_cache_gib / spec.world_size)
            config = config.replace(cache=cache)
        self.runner = ModelRunner(self.loaded.model, arch, config, spec.device, spec.dtype, max_model_len,
                                  agree_num_blocks=self.tp.min if self.tp is not None else None,
                                  extra_kv_bytes_per_block=extra_kv_bytes_per_block,
                                  bytes_in_use_before_load=self.bytes_in_use_before_load)
        return self.runner.num_blocks

    def execute(self, batch, sampling_batch, prompt_logprob_seqs: list[int],
                pending: Optional[PendingInputs], drafts: Optional[torch.Tensor] = None) -> StepResult:
        """One step of this rank's shard. Rank 0 samples (it alone has `sampling_batch`) and
        broadcasts the tokens, which the other ranks keep for the next step's placeholders. A
        speculative verify step (`drafts`) samples nothing here: rank 0 verifies on the host side
        of the engine, synchronously, so no later step reads its tokens on the device."""
        result = self.runner.execute(batch, sampling_batch, prompt_logprob_seqs, pending, drafts=drafts)
        if self.tp is not None:
            if batch.num_sampled == 0 or drafts is not None:
                self.last_sampled = None
            elif self.spec.rank == 0:
                self.tp.broadcast(result.sampled.token_ids.contiguous(), src=0)
            else:
                tokens = torch.empty(batch.num_sampled, dtype=torch.int64, device=self.spec.device)
                self.last_sampled = self.tp.broadcast(tokens, src=0)
        return result

    def close(self) -> None:
        if self.tp is not None:
            self.tp.destroy()

"""Executors: how the engine's steps run on one device or across tensor-parallel ranks (base.py)."""

from __future__ import annotations

import torch

from rtpllm.config import EngineConfig
from rtpllm.engine.executor.base import Executor, WorkerFailedError
from rtpllm.engine.executor.worker import WorkerSpec

__all__ = ["Executor", "WorkerFailedError", "create_executor"]


def create_executor(config: EngineConfig, model_path: str, device: torch.device, dtype: torch.dtype) -> Executor:
    """UniProcExecutor for one rank; MultiprocExecutor (its workers started) for more. Raises
    ValueError when a CUDA engine asks for more ranks than there are GPUs."""
    world = config.parallel.tensor_parallel_size
    if device.type == "cuda" and world > torch.cuda.device_count():
        raise ValueError(f"tensor_parallel_size: {world} needs {world} GPUs, torch sees "
                         f"{torch.cuda.device_count()}")
    spec = WorkerSpec(config, model_path, device, dtype, rank=0, world_size=world)
    if world == 1:
        from rtpllm.engine.executor.uniproc import UniProcExecutor

        return UniProcExecutor(spec)
    from rtpllm.engine.executor.multiproc import MultiprocExecutor

    return MultiprocExecutor(spec)

"""Environment every process of a tensor-parallel engine runs with.

NVLink multicast (NVLS) stays off in NCCL, in torch's symmetric memory and in NVSHMEM: on the
GPU hosts we run on, a program that uses it can put GPUs that others share out of service.
Worker processes get these variables in their environment, and the engine's own process sets
them before it creates a communicator.
"""

from __future__ import annotations

import os

DISTRIBUTED_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def apply_distributed_env() -> None:
    """Sets DISTRIBUTED_ENV in this process (before any NCCL communicator is created)."""
    os.environ.update(DISTRIBUTED_ENV)


def worker_env(num_threads: int) -> dict[str, str]:
    """The environment of a worker process: ours, the distributed switches, its thread count."""
    env = dict(os.environ, **DISTRIBUTED_ENV)
    env["OMP_NUM_THREADS"] = str(num_threads)
    return env

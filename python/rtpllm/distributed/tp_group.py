"""The tensor-parallel group: this rank, the world size and the collectives the model needs.

Built on torch.distributed: NCCL between GPUs (its collectives are captured into CUDA graphs like
any kernel: the decode graphs replay the all-reduces), gloo between CPU processes (so CI runs
tensor parallelism without a GPU). One group per process: rank r > 0 is a worker process of its
own, rank 0 lives in the engine's process.

Every rank must issue the same collectives in the same order; the model's forward and
`compute_logits` do, given the same batch.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# A collective waits at most this long for its peers (a dead peer is reported at once; this
# bounds a peer that hangs without dying).
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


# torch 2.13 renamed all_gather_into_tensor; earlier releases have only the old name.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class TPGroup:
    def __init__(self, rank: int, world_size: int, device: torch.device):
        """The group's shape, known before joining (a model can be built and loaded meanwhile)."""
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.joined = False

    @staticmethod
    def create_store(rank: int, world_size: int, port: int = 0, host: str = "127.0.0.1") -> dist.TCPStore:
        """Where the group meets: rank 0 hosts it (port 0: any free port, read back from
        `store.port`), the other ranks connect to rank 0's port."""
        return dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=COLLECTIVE_TIMEOUT,
                             wait_for_workers=False)

    def join(self, store: dist.Store) -> None:
        """Joins the group (blocks until every rank has joined)."""
        rank, world_size, device = self.rank, self.world_size, self.device
        if dist.is_initialized():
            raise RuntimeError("tensor_parallel_size: this process already belongs to a process group "
                               "(one tensor-parallel engine per process; shut the other down first)")
        if device.type == "cuda":
            torch.cuda.set_device(device)
            # device_id binds the communicator to this GPU and creates it now, before any graph capture.
            dist.init_process_group("nccl", store=store, rank=rank, world_size=world_size,
                                    timeout=COLLECTIVE_TIMEOUT, device_id=device)
        else:
            dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                    timeout=COLLECTIVE_TIMEOUT)
        self.joined = True

    @property
    def backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sums `tensor` over the ranks, in place; returns it."""
        dist.all_reduce(tensor)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """[n, ...] on every rank -> [world_size * n, ...], rank r's rows at [r * n, (r + 1) * n)."""
        out = torch.empty((self.world_size * tensor.shape[0],) + tuple(tensor.shape[1:]),
                          dtype=tensor.dtype, device=tensor.device)
        _all_gather_single(out, tensor.contiguous())
        return out

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        dist.broadcast(tensor, src)
        return tensor

    def min(self, value: int) -> int:
        """The smallest of every rank's `value` (a host integer)."""
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def abort(self) -> None:
        """Breaks collectives blocked on a dead peer (NCCL kernels would otherwise wait forever);
        gloo notices a dead peer by itself. Best effort: called while failing."""
        if self.backend == "nccl" and self.joined:
            try:
                dist.distributed_c10d._abort_process_group()
            except Exception:  # noqa: BLE001 - already failing; the caller reports the cause
                pass

    def destroy(self) -> None:
        """Leaves the group (so that this process may join another later)."""
        if self.joined:
            self.joined = False
            try:
                dist.destroy_process_group()
            except Exception as exc:  # noqa: BLE001 - e.g. after an abort: the group is gone either way
                logger.warning("tensor-parallel group: destroy failed after an error (%s)", exc)

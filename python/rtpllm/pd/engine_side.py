"""Prefill-decode disaggregation inside one engine: its KV transfer engine and the role's side.

`Engine` builds a `PDEngine` when config.pd.role is prefill or decode and calls it at a few
points of its step (engine.py: add_request, abort_request, _step, has_pending_kv_transfers, stats);
nothing here runs for an ordinary instance. The server reaches it through `call_in_engine_thread`
with the module-level functions at the bottom (they pickle to an engine process).

The transfer engine registers the whole KV pool. The cache identity it presents (and a prefill
instance compares with a KVDestination's) is the pool's `cache_identity` without the block size:
block sizes may differ between the two sides (transfer_plan.h maps token ranges).
"""

from __future__ import annotations

import logging
import os
import select
import time
from typing import TYPE_CHECKING, Optional

from rtpllm import _C
from rtpllm.engine.cache_identity import cache_identity
from rtpllm.engine.kv_tiers import kv_layout
from rtpllm.pd.decode_side import DecodeSide, Polled
from rtpllm.pd.kv_params import DecodeKV, PDOutcome, PrefillKV
from rtpllm.pd.prefill_side import STALL_ENV, PrefillSide
from rtpllm.pd.protocol import KVDestination

if TYPE_CHECKING:
    from rtpllm.engine.engine import Engine

logger = logging.getLogger(__name__)


def pd_identity(engine: "Engine") -> str:
    return pd_identity_of(engine.model_path, engine.dtype, engine.arch)


def pd_identity_of(model_path: str, dtype, arch) -> str:
    """The pool's cache identity without the block size (block sizes may differ between the sides)."""
    root = cache_identity(model_path, kv_dtype=dtype, block_size=0, num_layers=arch.num_layers,
                          num_kv_heads=arch.num_kv_heads, head_dim=arch.head_dim)
    return f"{root:016x}"


class _GrantsOnEveryRank:
    """Decode's transfer engine as DecodeSide uses it, with tensor parallelism: its write grants
    and revocations reach every rank's engine (a grant acknowledged by all before the reservation
    goes out, so that a prefill never finds one missing)."""

    def __init__(self, transfer, workers, timeout_s: float):
        self._transfer, self._workers, self._timeout_s = transfer, workers, timeout_s

    def grant_writes(self, transfer_id: int, blocks: list[int]) -> None:
        self._transfer.grant_writes(transfer_id, blocks)
        self._workers.pd_grant(transfer_id, blocks, self._timeout_s)

    def revoke_writes(self, transfer_id: int) -> None:
        self._transfer.revoke_writes(transfer_id)
        self._workers.pd_revoke(transfer_id)

    def __getattr__(self, name: str):
        return getattr(self._transfer, name)


class PDEngine:
    def __init__(self, engine: "Engine"):
        config = engine.config.pd
        if not _C.has_ucx:
            raise RuntimeError(f"role {config.role!r}: rtpllm._C was built without UCX (the KV transfer engine)")
        self.engine = engine
        self.role = config.role
        runner = engine.runner
        caches = runner.kv_caches
        cuda = caches[0].device.type == "cuda"
        if not cuda:
            os.environ.setdefault("UCX_TLS", "tcp")  # host memory between processes: TCP works everywhere
        self.identity = pd_identity(engine)
        self.transfer = _C.UcxTransfer(
            _C.TransferOptions(name=f"rtpllm-{self.role}", identity=self.identity, listen_host=config.pd_transfer_host,
                               listen_port=config.pd_transfer_port, timeout_s=config.pd_timeout_s,
                               # The router carries decode's block lists: a prefill writes only the
                               # blocks decode granted to that request (kv_transfer.h, write grants).
                               require_write_grants=self.role == "decode"),
            cuda_device=caches[0].device.index or 0 if cuda else None, direct_access=cuda and config.pd_direct_copy)
        self.transfer.register_kv(kv_layout(caches, runner.block_size))
        self._caches = caches  # registered memory: kept alive as long as the transfer engine
        self.counters: dict[str, int] = {}
        self._wake_fds: tuple[int, ...] = ()
        self.decode: Optional[DecodeSide] = None
        self.prefill: Optional[PrefillSide] = None
        block_size = runner.block_size
        # Tensor parallelism: the other ranks' transfer engines move their own KV heads, as this
        # one tells them (pd/worker_side.py).
        workers = engine.executor if engine.config.parallel.tensor_parallel_size > 1 else None
        if self.role == "decode":
            endpoints = [[config.pd_transfer_host, port] for port in workers.pd_transfer_ports] if workers else []
            transfer = _GrantsOnEveryRank(self.transfer, workers, config.pd_timeout_s) if workers else self.transfer
            self.decode = DecodeSide(engine.scheduler, transfer, num_layers=engine.arch.num_layers,
                                     block_size=block_size, host=config.pd_transfer_host, identity=self.identity,
                                     timeout_s=config.pd_timeout_s, counters=self.counters, endpoints=endpoints)
        else:
            first = caches[0]
            token_bytes = 2 * first.shape[3] * first.shape[4] * first.element_size()
            self.prefill = PrefillSide(engine.scheduler, self.transfer, runner.model, engine.abort_request,
                                       num_layers=engine.arch.num_layers, block_size=block_size,
                                       bytes_per_token_layer=token_bytes, identity=self.identity,
                                       timeout_s=config.pd_timeout_s, counters=self.counters, cuda=cuda,
                                       stall_s=float(os.environ.get(STALL_ENV, "0") or 0), workers=workers,
                                       tp_size=engine.config.parallel.tensor_parallel_size,
                                       num_kv_heads=engine.arch.num_kv_heads, local_kv_heads=first.shape[3])
        logger.info("prefill-decode role %s: KV transfer engine on %s:%d (identity %s)", self.role,
                    config.pd_transfer_host, self.transfer.listen_port, self.identity)

    # ------------------------------------------------------------------ engine hooks
    def add(self, seq, spec, kv) -> None:
        """Adds a PD sequence to the scheduler (instead of `Scheduler.add_request`); ValueError for a
        bad request."""
        if isinstance(kv, DecodeKV):
            if self.decode is None:
                raise ValueError(f"role: this instance is a {self.role} instance; it does not decode PD requests")
            self.decode.admit(seq, spec, kv)
        elif isinstance(kv, PrefillKV):
            if self.prefill is None:
                raise ValueError(f"role: this instance is a {self.role} instance; it does not prefill PD requests")
            self.prefill.track(seq, kv, len(spec.prompt_token_ids))
            try:
                self.engine.scheduler.add_request(spec)
            except BaseException:
                self.prefill.forget(seq.seq_id)
                raise
        else:
            raise ValueError(f"kv_transfer_params: unexpected {type(kv).__name__}")

    def wake_on(self, fd: int) -> None:
        """Naps between steps (waiting for notices or writes) end as soon as `fd` is readable: the
        engine process passes its command socket, so a request that arrives meanwhile is taken at once."""
        self._wake_fds = (fd,)
        if self.decode is not None:
            self.decode.wake_fds = self._wake_fds

    def before_abort(self, seq_id: int) -> None:
        if self.decode is not None:
            self.decode.before_abort(seq_id)

    def poll(self, idle: bool) -> Polled:
        if self.decode is not None:
            return self.decode.poll(idle)
        self.prefill.poll()
        if idle and self.prefill.has_pending():  # only writes under way: leave the cores to them
            if self._wake_fds:
                select.select(self._wake_fds, [], [], 0.0005)
            else:
                time.sleep(0.0005)
        return Polled([], {}, [])

    def before_forward(self, batch) -> None:
        if self.prefill is not None:
            self.prefill.before_forward(batch)

    def after_forward(self) -> None:
        if self.prefill is not None:
            self.prefill.after_forward()

    def after_step(self) -> None:
        if self.prefill is not None:
            self.prefill.after_step()
            self.prefill.poll()

    def has_pending(self) -> bool:
        side = self.decode or self.prefill
        return side.has_pending()

    def snapshot(self) -> tuple[tuple[str, str, int], ...]:
        """(role, outcome, count) per outcome so far, for /metrics."""
        return tuple((self.role, name, count) for name, count in sorted(self.counters.items()))


# ---------------------------------------------------------------------- server calls (picklable)
def pd_role(engine: "Engine") -> str:
    return engine.config.pd.role


def pd_reservation(request_id: str, engine: "Engine"):
    """The KVDestination (as JSON) of a decode request the engine accepted; decode_side.QUEUED while
    it waits for room; None when it already ended (aborted, or timed out in between)."""
    group = engine._groups.get(request_id)
    if engine.pd is None or engine.pd.decode is None or group is None:
        return None
    return engine.pd.decode.reservation(group.seqs[0].seq_id)


def pd_decode_failure(pd_request_id: str, engine: "Engine") -> Optional[str]:
    if engine.pd is None or engine.pd.decode is None:
        return None
    return engine.pd.decode.failure(pd_request_id)


def pd_prefill_destination(pd_request_id: str, destination: dict, engine: "Engine") -> bool:
    """Hands a prefill sent without a destination its reservation (ValueError: a bad one); False when
    that prefill already ended on this instance."""
    if engine.pd is None or engine.pd.prefill is None:
        raise ValueError("role: this instance is not a prefill instance")
    return engine.pd.prefill.set_destination(pd_request_id, KVDestination.from_json(destination))


def pd_prefill_outcome(pd_request_id: str, engine: "Engine") -> Optional[PDOutcome]:
    """How a prefill request ended (once every write is final); None while under way."""
    if engine.pd is None or engine.pd.prefill is None:
        return PDOutcome(False, "this instance is not a prefill instance", 400)
    return engine.pd.prefill.outcome(pd_request_id)

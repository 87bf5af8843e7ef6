"""The decode instance's side of a PD request, in the engine (its thread or its process).

Life of one request:
    admit()   the scheduler reserves blocks for the whole prompt (WAITING_FOR_KV); the server reads
              the reservation (`reservation()`) and hands it to the router as a KVDestination.
              Without room (free blocks, batch slots) the request queues, first come first
              served, until finished requests make room, for at most pd_timeout_s;
    poll()    every step: the transfer engine's notices are counted per request (one per layer);
              once every layer and the first token (the last notice's payload) arrived, the
              scheduler completes the request and it decodes on;
    failure   no KV within pd_timeout_s, or the peer that was writing failed: the request ends with
              an error (never a silent recompute) and its blocks stay held, so that a write still
              under way lands in blocks nobody uses, until the writes are final (the last notice
              came) or can no longer land: the prefill side starts no write later than pd_timeout_s
              after it took the request, and each write ends within pd_timeout_s more; the router
              hands the request to prefill right after the reservation, so 3 x pd_timeout_s after
              the reservation is past the last possible write.
    abort     (the router closed the stream) the same hold, counted as aborted.

Only the reservation's blocks can be written: the transfer engine requires write grants, so a
prefill peer's put lands only in the blocks granted to its request's transfer id (granted with the
reservation, revoked when the request ends); a wrong or stale block list from the router fails on
the prefill side before anything is written. A notice naming other blocks (a peer that broke the
rule) fails the request.

n > 1 (and best_of == n): the prefill instance computes the prompt once, for sample 0 only. The
other samples follow it here: admitted with it but kept out of the scheduler until its KV arrived,
they then start as local requests whose prompt's full blocks are a prefix hit on the transferred
blocks (shared, ref-counted), so each computes only the prompt's last partial block (fewer than
block_size tokens, one block when the prompt fills whole blocks) and samples its own first token
with its own generator, as a colocated instance would. They fail and abort with sample 0.
"""

from __future__ import annotations

import logging
import select
import time
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

from rtpllm import _C
from rtpllm.pd.kv_params import DecodeKV, decode_first_token, transfer_request_id

logger = logging.getLogger(__name__)

_FAILURES_KEPT = 1024  # reasons of recent failures, for the server's error event
_IDLE_NAP_S = 0.002  # the longest idle nap: timeouts and held blocks are checked at least this often


@dataclass
class _Wait:
    seq_id: int
    pd_request_id: str
    transfer_id: int
    admitted: float
    destination: dict
    layers: set = field(default_factory=set)
    first_token: Optional[int] = None
    first_logprobs: Optional[dict] = None  # the first token's {token id: logprob}, when asked for
    peer: int = 0
    generator: Optional[object] = None  # a seeded sampled sequence's: the peer drew its first number


@dataclass
class _Queued:
    seq: object
    spec: object
    kv: DecodeKV
    since: float


QUEUED = "queued"  # reservation(): not reserved yet


class Polled(NamedTuple):
    """What one poll() moved: the scheduler outputs of requests whose KV arrived (their first
    token), the first tokens' logprobs by sequence id (those that asked), and the sequences that
    ended with an error (already aborted in the scheduler, blocks held)."""

    completed: list
    logprobs: dict
    failed: list


@dataclass
class _Hold:
    hold_id: int
    release_at: float
    layers: set
    final: bool = False


class DecodeSide:
    def __init__(self, scheduler, transfer, *, num_layers: int, block_size: int, host: str, identity: str,
                 timeout_s: float, counters: dict, endpoints: Optional[list] = None):
        self.scheduler = scheduler
        self.endpoints = endpoints or []  # tensor parallelism: ranks 1..'s transfer engines ([host, port])
        self.transfer = transfer
        self.num_layers = num_layers
        self.block_size = block_size
        self.host = host
        self.identity = identity
        self.timeout_s = timeout_s
        self.counters = counters
        self._waits: dict[int, _Wait] = {}  # by transfer id
        self._by_seq: dict[int, _Wait] = {}
        self._holds: dict[int, _Hold] = {}  # by transfer id: ended requests whose blocks a write may still reach
        self._failures: dict[str, str] = {}  # pd_request_id -> why it failed (most recent last)
        self._queued: list[_Queued] = []  # no room yet, oldest first
        self._leaders: set[str] = set()  # pd_request_ids whose sample 0 waits (queued or reserved)
        self._followers: dict[str, list] = {}  # pd_request_id -> [(seq, spec)] of samples 1.. (n > 1)
        # Readable when a command for the engine arrived (the engine process's socket): an idle nap
        # waiting for notices ends at once, so a new reservation never waits for it.
        self.wake_fds: tuple[int, ...] = ()

    # ------------------------------------------------------------------ admission
    def admit(self, seq, spec, kv: DecodeKV) -> None:
        """Reserves the blocks now, or queues the request until there is room (ValueError for a bad
        request: a duplicate id, a prompt the pool can never hold). Samples 1.. of an n > 1 request
        (admitted right after sample 0) follow sample 0."""
        if seq.index > 0:
            if kv.pd_request_id not in self._leaders:
                raise ValueError(f"pd_request_id: {kv.pd_request_id!r}: sample {seq.index} without sample 0")
            self._followers.setdefault(kv.pd_request_id, []).append((seq, spec))
            return
        transfer_id = transfer_request_id(kv.pd_request_id)
        if (transfer_id in self._waits or transfer_id in self._holds
                or any(q.kv.pd_request_id == kv.pd_request_id for q in self._queued)):
            raise ValueError(f"pd_request_id: {kv.pd_request_id!r} is already in flight on this instance")
        if self._queued or not self._reserve(seq, spec, kv):
            self._queued.append(_Queued(seq, spec, kv, time.monotonic()))
        self._leaders.add(kv.pd_request_id)

    def _reserve(self, seq, spec, kv: DecodeKV) -> bool:
        seq_id = seq.seq_id
        if not self.scheduler.add_remote_prefill(spec):
            return False
        transfer_id = transfer_request_id(kv.pd_request_id)
        request = self.scheduler.get_request(seq_id)
        destination = dict(pd_request_id=kv.pd_request_id, transfer_host=self.host,
                           transfer_port=self.transfer.listen_port, cache_identity=self.identity,
                           block_size=self.block_size, blocks=list(request.block_table),
                           num_prompt_tokens=len(spec.prompt_token_ids),
                           num_cached_tokens=request.num_computed_tokens, transfer_endpoints=self.endpoints)
        wait = _Wait(seq_id, kv.pd_request_id, transfer_id, time.monotonic(), destination,
                     generator=None if seq.params.greedy else seq.generator)
        self._waits[transfer_id] = wait
        self._by_seq[seq_id] = wait
        self.transfer.grant_writes(transfer_id, destination["blocks"])
        return True

    def reservation(self, seq_id: int):
        """The KVDestination (JSON), QUEUED while waiting for room, None once ended."""
        wait = self._by_seq.get(seq_id)
        if wait is not None:
            return wait.destination
        return QUEUED if any(q.seq.seq_id == seq_id for q in self._queued) else None

    def failure(self, pd_request_id: str) -> Optional[str]:
        return self._failures.get(pd_request_id)

    def has_pending(self) -> bool:
        return bool(self._waits) or bool(self._holds) or bool(self._queued)

    # ------------------------------------------------------------------ each step
    def poll(self, idle: bool) -> Polled:
        """Takes the notices that arrived (waiting briefly for one when `idle`: the step loop has
        nothing else to do)."""
        outputs: list = []
        logprobs: dict = {}
        failed: list[int] = []
        if self._queued:
            self._admit_queued(failed)
        notices = self._take_notices(idle)
        for notice in notices:
            self._on_notice(notice, outputs, logprobs, failed)
        now = time.monotonic()
        if self._waits:
            failed_peers = self._failed_peers()
            for wait in list(self._waits.values()):
                if wait.peer and wait.peer in failed_peers:
                    failed += self._fail(wait, "peer_failed", f"the prefill instance failed while writing the KV: "
                                                              f"{failed_peers[wait.peer]}")
                elif now - wait.admitted > self.timeout_s:
                    failed += self._fail(wait, "timed_out", f"the prompt's KV did not arrive from the prefill "
                                                            f"instance within pd_timeout_s={self.timeout_s:g}")
        for transfer_id, hold in list(self._holds.items()):
            if hold.final or now >= hold.release_at:
                self.scheduler.release_blocks(hold.hold_id)
                del self._holds[transfer_id]
        return Polled(outputs, logprobs, failed)

    def before_abort(self, seq_id: int) -> None:
        """The engine is about to abort this sequence (its client went away): hold its blocks."""
        for followers in self._followers.values():
            followers[:] = [f for f in followers if f[0].seq_id != seq_id]
        queued = [q for q in self._queued if q.seq.seq_id == seq_id]
        if queued:
            self._queued.remove(queued[0])
            self._drop_followers(queued[0].kv.pd_request_id)
            self.counters["aborted"] = self.counters.get("aborted", 0) + 1
            return
        wait = self._by_seq.get(seq_id)
        if wait is not None:
            self._end(wait, "aborted", hold=True)

    # ------------------------------------------------------------------ helpers
    def _take_notices(self, idle: bool) -> list:
        """The notices that arrived; idle (nothing else to step), after a nap that the next notice
        or command ends."""
        if not idle:
            return self.transfer.take_notices(0.0)
        if not self.wake_fds:
            return self.transfer.take_notices(_IDLE_NAP_S)
        select.select([self.transfer.notice_fd(), *self.wake_fds], [], [], _IDLE_NAP_S)
        return self.transfer.take_notices(0.0)

    def _admit_queued(self, failed: list[int]) -> None:
        now = time.monotonic()
        while self._queued:
            head = self._queued[0]
            if now - head.since > self.timeout_s:
                self._queued.pop(0)
                why = f"no room for the prompt's KV (free blocks, batch slots) within pd_timeout_s={self.timeout_s:g}"
                logger.warning("PD request %s: %s", head.kv.pd_request_id, why)
                self._remember_failure(head.kv.pd_request_id, why)
                self.counters["timed_out"] = self.counters.get("timed_out", 0) + 1
                failed += [head.seq.seq_id, *self._drop_followers(head.kv.pd_request_id)]
                continue
            try:
                if not self._reserve(head.seq, head.spec, head.kv):
                    return  # first come, first served: the rest wait behind it
            except ValueError as exc:  # queued unchecked behind others: refused now
                self._remember_failure(head.kv.pd_request_id, str(exc))
                failed += [head.seq.seq_id, *self._drop_followers(head.kv.pd_request_id)]
            self._queued.pop(0)

    def _remember_failure(self, pd_request_id: str, why: str) -> None:
        self._failures[pd_request_id] = why
        while len(self._failures) > _FAILURES_KEPT:
            del self._failures[next(iter(self._failures))]

    def _on_notice(self, notice, outputs: list, logprobs: dict, failed: list[int]) -> None:
        wait = self._waits.get(notice.request_id)
        if wait is None:
            hold = self._holds.get(notice.request_id)
            if hold is not None:  # an ended request: its writes become final with the last notice
                hold.layers.update(range(self.num_layers) if notice.layer < 0 else (notice.layer,))
                hold.final = hold.final or (bool(notice.payload) and len(hold.layers) == self.num_layers)
            return
        wait.peer = notice.peer
        if not set(notice.blocks) <= set(wait.destination["blocks"]):
            failed += self._fail(wait, "peer_failed", "the prefill instance wrote blocks outside the reservation")
            return
        wait.layers.update(range(self.num_layers) if notice.layer < 0 else (notice.layer,))
        if notice.payload:
            first = decode_first_token(notice.payload)
            if first is None:
                failed += self._fail(wait, "peer_failed", "the prefill instance sent a malformed first token")
                return
            wait.first_token, wait.first_logprobs = first.token, first.logprobs
        if wait.first_token is None or len(wait.layers) < self.num_layers:
            return
        self._end(wait, "completed", hold=False)
        if wait.generator is not None:
            # A seeded sampled row draws one number per step (layers/sampler.py): the peer drew the
            # first token's, so this stream skips it and the tokens match a colocated run.
            import torch  # here: the server imports this module (routes.py) and needs no torch

            torch.empty(1, device=wait.generator.device).uniform_(generator=wait.generator)
        moved = self.scheduler.complete_remote_prefill(wait.seq_id, wait.first_token)
        if moved:
            outputs += moved
            if wait.first_logprobs is not None:
                logprobs[wait.seq_id] = [wait.first_logprobs]
        for _, spec in self._drop_followers(wait.pd_request_id, specs=True):
            self.scheduler.add_request(spec)  # the prompt's full blocks are a prefix hit now

    def _failed_peers(self) -> dict[int, str]:
        return {p.id: p.error for p in self.transfer.peers() if p.state == _C.PeerState.FAILED}

    def _fail(self, wait: _Wait, outcome: str, why: str) -> list[int]:
        """Ends the request with an error; its sequence ids (sample 0's and its followers')."""
        logger.warning("PD request %s: %s", wait.pd_request_id, why)
        self._remember_failure(wait.pd_request_id, why)
        followers = self._drop_followers(wait.pd_request_id)
        self._end(wait, outcome, hold=True)
        self.scheduler.abort(wait.seq_id, _C.FinishReason.ERROR)
        return [wait.seq_id, *followers]

    def _drop_followers(self, pd_request_id: str, specs: bool = False) -> list:
        """Forgets sample 0's followers (it stopped waiting): their seq ids, or (seq, spec) pairs."""
        self._leaders.discard(pd_request_id)
        followers = self._followers.pop(pd_request_id, [])
        return followers if specs else [seq.seq_id for seq, _ in followers]

    def _end(self, wait: _Wait, outcome: str, hold: bool) -> None:
        if hold:  # aborted or failed: its followers never start
            self._drop_followers(wait.pd_request_id)
        del self._waits[wait.transfer_id]
        del self._by_seq[wait.seq_id]
        self.transfer.revoke_writes(wait.transfer_id)  # a later put (a stale list) is refused before it writes
        self.counters[outcome] = self.counters.get(outcome, 0) + 1
        if hold:
            hold_id = self.scheduler.hold_blocks(wait.seq_id)
            if hold_id:
                self._holds[wait.transfer_id] = _Hold(hold_id, wait.admitted + 3 * self.timeout_s + 1.0,
                                                      set(wait.layers),
                                                      final=wait.first_token is not None
                                                      and len(wait.layers) == self.num_layers)

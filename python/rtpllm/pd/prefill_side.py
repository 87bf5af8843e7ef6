"""The prefill instance's side of a PD request, in the engine (its thread or its process).

Life of one request (an ordinary request with max_tokens 1, plus a destination):
    track()          check the destination against the decode instance's transfer engine; the
                     connection is cached per host:port (a failed peer is dropped and redialled);
                     a new one is dialled on a thread while the prompt computes (writes wait for it);
                     without a destination (the router overlaps the reservation with the prefill),
                     it computes all the same and set_destination() brings it later: layers
                     computed before it are written then, the rest as they come;
    before_forward() the step computes the prompt's last chunk: hold its blocks (they must outlive
                     the request, which ends with this step, until every write is final) and arm
                     the model's layer hook;
    layer hook       layer l ran: its KV (every earlier chunk's too) is in the pool; write it into
                     the decode blocks now (CPU), or once the layer's CUDA event completed, from the
                     pusher thread (GPU), so that the writes overlap the next layers' compute;
    after_step()     the first token is known: write the last layer with it as the notice's payload;
    poll()           every step: once every write is final, release the hold and record the outcome
                     (PDOutcome) the server answers with.

Tensor parallelism, the same or different sizes on the two sides (pd/head_map.py): this rank's
writes with the notices carry the heads decode rank 0 takes from it; every other (prefill rank,
decode rank) pair's heads go without notices (pd/shard_writer.py: on the workers, and here for this
rank's heads that decode ranks 1.. hold), layer by layer too when the destination is known before
the prompt's last chunk runs (before_forward hands them out then), else in one put per pair once
the prompt is computed. The last layer's notice (the first token) goes only after all of those are
DONE, so decode's notices mean every head landed.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from rtpllm import _C
from rtpllm.pd.head_map import head_writes
from rtpllm.pd.kv_params import (FirstToken, PDOutcome, PrefillKV, aligned_start, encode_first_token,
                                 transfer_request_id)
from rtpllm.pd.rank_writes import RankWrites
from rtpllm.pd.shard_writer import cached_peer

logger = logging.getLogger(__name__)

_OUTCOMES_KEPT = 1024
STALL_ENV = "RTPLLM_PD_TEST_STALL_S"  # tests only: sleep this long between layers (a prefill killed mid-transfer)


@dataclass
class _Push:
    seq: object                    # the engine's SequenceState
    kv: PrefillKV
    peer: int                      # 0 while connecting
    transfer_id: int
    admitted: float
    local_blocks: list = field(default_factory=list)
    remote_blocks: list = field(default_factory=list)
    num_tokens: int = 0
    hold_id: int = 0
    handles: list = field(default_factory=list)   # issued puts not yet final
    issued_layers: int = 0
    last_issued: bool = False
    error: str = ""
    error_status: int = 503
    bytes: int = 0
    computed: float = 0.0          # the last layer was computed
    first_put: float = 0.0
    last_put: float = 0.0          # the last layer's write (with the first token) was issued
    ended: bool = False            # decided (under lock): no put starts any more
    connecting: Optional[concurrent.futures.Future] = None
    deferred: list = field(default_factory=list)  # (layer, payload) computed before the peer connected
    num_prompt_tokens: int = 0
    prompt_blocks: list = field(default_factory=list)  # the prompt's local blocks, once held
    planned: bool = False          # local_blocks / remote_blocks / num_tokens / heads / shard_writes are set
    heads: tuple = (0, 0, -1)      # (local offset, remote offset, count) of the layer-by-layer writes, once planned
    shard_writes: dict = field(default_factory=dict)  # prefill rank -> its other writes (shard_writer.py)
    shards_sent: bool = False      # the shard writes were handed out (there may be none)
    shards_expected: int = 0       # ... answers to wait for (one per rank with writes, every worker)
    shards_answered: int = 0       # ... this many answered (their writes are final: DONE or FAILED)
    shards_done: int = 0           # ... and this many DONE
    lock: threading.Lock = field(default_factory=threading.Lock)


class PrefillSide:
    def __init__(self, scheduler, transfer, model, abort_request, *, num_layers: int, block_size: int,
                 bytes_per_token_layer: int, identity: str, timeout_s: float, counters: dict, cuda: bool,
                 stall_s: float = 0.0, workers=None, tp_size: int = 1, num_kv_heads: int = 1,
                 local_kv_heads: int = 1):
        self.scheduler = scheduler
        self.tp_size = tp_size  # tensor parallelism (module docstring): `workers` are ranks 1..
        self.num_kv_heads = num_kv_heads      # the model's
        self.local_kv_heads = local_kv_heads  # this rank's
        self.abort_request = abort_request  # Engine.abort_request: a request that could not start in time
        self.transfer = transfer
        self.model = model
        self.num_layers = num_layers
        self.block_size = block_size
        self.bytes_per_token_layer = bytes_per_token_layer  # K and V of one token in one layer
        self.identity = identity
        self.timeout_s = timeout_s
        self.counters = counters
        self.stall_s = stall_s
        self._peers: dict[tuple[str, int], int] = {}
        self._pushes: dict[int, _Push] = {}  # by seq id: tracked, not yet ended
        self._armed: list[_Push] = []        # pushes of the forward under way
        self._outcomes: dict[str, PDOutcome] = {}
        self._pusher: Optional[_Pusher] = _Pusher(transfer) if cuda else None
        self._warned_slices = False
        self._rank_writes = RankWrites(transfer, workers, tp_size, timeout_s=timeout_s, num_layers=num_layers,
                                       head_token_layer_bytes=bytes_per_token_layer // local_kv_heads,
                                       cuda=cuda)
        # Dialling a decode instance can take up to pd_timeout_s: never on the step loop.
        self._dialler = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="rtpllm-pd-connect")
        self._dialling: dict[tuple[str, int], concurrent.futures.Future] = {}
        # Destinations that overtook their prefill request: pd_request_id -> (destination, arrival).
        self._early: dict[str, tuple] = {}

    # ------------------------------------------------------------------ admission
    def track(self, seq, kv: PrefillKV, num_prompt_tokens: int) -> None:
        """Checks the destination (ValueError: the server's 400); with no connection to its decode
        instance yet, starts dialling it (an unreachable one fails the request with 503 later).
        Without a destination, one that came ahead of the request is taken, or it follows."""
        if any(p.kv.pd_request_id == kv.pd_request_id for p in self._pushes.values()):
            raise ValueError(f"pd_request_id: {kv.pd_request_id!r} is already in flight on this instance")
        if kv.destination is None and kv.pd_request_id in self._early:
            kv = dataclasses.replace(kv, destination=self._early.pop(kv.pd_request_id)[0])
        if kv.destination is not None:
            self._check_prompt(kv.destination, num_prompt_tokens)
        self._outcomes.pop(kv.pd_request_id, None)  # an earlier use's, never collected (its client left)
        push = _Push(seq, kv, 0, transfer_request_id(kv.pd_request_id), time.monotonic(),
                     num_prompt_tokens=num_prompt_tokens)
        if kv.destination is not None:
            self._connect(push, kv.destination, at_admission=True)
        self._pushes[seq.seq_id] = push

    def set_destination(self, pd_request_id: str, dest) -> bool:
        """The reservation of a prefill that came without one (ValueError: a bad destination, which
        also fails that prefill with 400). False when that prefill already ended here."""
        push = next((p for p in self._pushes.values() if p.kv.pd_request_id == pd_request_id), None)
        if push is None:
            if pd_request_id in self._outcomes:
                return False
            self._early[pd_request_id] = (dest, time.monotonic())  # its prefill request is on its way
            return True
        if push.kv.destination is not None:
            raise ValueError(f"pd_request_id: the destination of {pd_request_id!r} is known already")
        try:
            self._check_prompt(dest, push.num_prompt_tokens)
        except ValueError as exc:
            with push.lock:
                push.error, push.error_status = str(exc), 400
            raise
        push.kv = dataclasses.replace(push.kv, destination=dest)
        self._connect(push, dest, at_admission=False)
        return True

    def _check_prompt(self, dest, num_prompt_tokens: int) -> None:
        if dest.cache_identity != self.identity:
            raise ValueError(f"destination.cache_identity: {dest.cache_identity!r} is not this instance's "
                             f"{self.identity!r} (another model, dtype or KV shape)")
        if dest.num_prompt_tokens != num_prompt_tokens:
            raise ValueError(f"destination.num_prompt_tokens: {dest.num_prompt_tokens}, but the prompt has "
                             f"{num_prompt_tokens} tokens here (the two instances tokenize differently)")
        decode_tp = len(dest.transfer_endpoints) + 1
        try:
            head_writes(self.num_kv_heads, self.tp_size, decode_tp)
        except ValueError as exc:
            raise ValueError(f"destination.transfer_endpoints: a decode instance of {decode_tp} tensor-parallel "
                             f"ranks cannot hold this model's {self.num_kv_heads} KV heads ({exc})") from None

    def _connect(self, push: _Push, dest, at_admission: bool) -> None:
        """Writes go to dest: over the cached connection at once, else once dialled (poll)."""
        key = (dest.transfer_host, dest.transfer_port)
        peer = self._connected_peer(key)
        if not peer:
            push.connecting = self._dialling.get(key)
            if push.connecting is None:
                push.connecting = self._dialling[key] = self._dialler.submit(self.transfer.connect, *key)
        elif at_admission:
            self._check_destination(peer, dest)  # ValueError: the admission's 400
            push.peer = peer
        else:
            self._attach(push, peer)

    def _check_destination(self, peer: int, dest) -> None:
        if len(set(dest.blocks)) != len(dest.blocks):
            raise ValueError("destination.blocks: a block appears twice")
        layout = next(p.layout for p in self.transfer.peers() if p.id == peer)
        if layout.block_size != dest.block_size:
            raise ValueError(f"destination.block_size: {dest.block_size}, but the decode instance's pool has "
                             f"{layout.block_size} tokens per block")
        if max(dest.blocks) >= layout.num_blocks:
            raise ValueError(f"destination.blocks: block {max(dest.blocks)} is out of range (the decode pool has "
                             f"{layout.num_blocks} blocks)")

    def forget(self, seq_id: int) -> None:
        """Untracks a sequence the scheduler refused (nothing was held or written)."""
        self._pushes.pop(seq_id, None)

    def outcome(self, pd_request_id: str) -> Optional[PDOutcome]:
        return self._outcomes.pop(pd_request_id, None)

    def has_pending(self) -> bool:
        return bool(self._pushes)

    # ------------------------------------------------------------------ the step
    def before_forward(self, batch) -> None:
        if not self._pushes:
            return
        for seq_id in batch.sampled_request_ids.tolist():
            push = self._pushes.get(seq_id)
            if push is None or push.hold_id:
                continue
            request = self.scheduler.get_request(seq_id)
            push.prompt_blocks = list(request.block_table[:-(-push.num_prompt_tokens // self.block_size)])
            with push.lock:
                if push.kv.destination is not None:
                    self._plan(push)
                push.hold_id = self.scheduler.hold_blocks(seq_id)
            self._push_shards(push, by_layer=True)  # before the step: the workers arm its forward
            self._armed.append(push)
        if self._armed:
            self.model.layer_hook = self._on_layer

    def after_forward(self) -> None:
        if self._armed:
            self.model.layer_hook = None
            for push in self._armed:
                push.computed = time.monotonic()
            self._armed = []

    def after_step(self) -> None:
        """Writes the last layer of every push whose first token is known, with the token (and its
        logprobs, when the request asked for them)."""
        for push in self._pushes.values():
            self._push_shards(push)
            self._put_last(push)

    def _put_last(self, push: _Push) -> None:
        if not push.hold_id or push.last_issued or push.error or not push.seq.output_ids:
            return
        if not push.shards_sent or push.shards_done < push.shards_expected:
            return  # every other write first (poll() comes back)
        push.last_issued = True
        push.last_put = time.monotonic()
        seq = push.seq
        first = FirstToken(seq.output_ids[0], dict(seq.logprobs[0]) if seq.logprobs else None)
        self._put(push, self.num_layers - 1, encode_first_token(first))

    def _push_shards(self, push: _Push, by_layer: bool = False) -> None:
        """Hands out the writes without notices (module docstring) once the destination is known:
        by_layer just before the forward that computes the prompt's last chunk, else once it is
        computed; to the workers, and this rank's own to its writer."""
        if push.shards_sent or not push.planned or push.error or not (by_layer or push.computed):
            return
        push.shards_sent = True
        push.shards_expected = self._rank_writes.hand_out(push.transfer_id, push.shard_writes, push.local_blocks,
                                                          push.remote_blocks, push.num_tokens, by_layer)

    def _take_shard_answers(self) -> None:
        answers = self._rank_writes.answers()
        if not answers:
            return
        by_transfer = {push.transfer_id: push for push in self._pushes.values()}
        for transfer_id, error, moved in answers:
            push = by_transfer.get(transfer_id)
            if push is None:
                continue  # ended meanwhile (its hold is released only once every write is final)
            with push.lock:
                push.shards_answered += 1
                if error and not push.error:
                    push.error, push.error_status = self._write_error(error)
                elif not error:
                    push.shards_done += 1
                    push.bytes += moved

    def poll(self) -> None:
        now = time.monotonic()
        for pd_request_id, (_, arrived) in list(self._early.items()):
            if now - arrived > self.timeout_s:  # its prefill request never came
                del self._early[pd_request_id]
        self._take_shard_answers()
        for seq_id, push in list(self._pushes.items()):
            if push.connecting is not None and push.connecting.done():
                self._connected(push)
            self._push_shards(push)
            self._put_last(push)
            # NOTE: one critical section per push: the pusher thread (GPU) issues puts under the
            # same lock, so a push is never ended (its blocks released) while a put it issued is
            # still unpolled, and no put starts once it ended.
            with push.lock:
                verdict = self._verdict(push, now)
                if verdict is not None:
                    push.ended = True
            if verdict is not None:
                self._end(seq_id, push, *verdict)
                if verdict[1] == "failed" and not push.hold_id:
                    self.abort_request(push.seq.group.request_id)  # never computed: the decode side gave up

    def _verdict(self, push: _Push, now: float) -> Optional[tuple[PDOutcome, str]]:
        """How the push ended, or None while it runs (called with push.lock held)."""
        still = []
        for handle in push.handles:
            status = self.transfer.poll(handle)
            if status.state == _C.TransferState.PENDING:
                still.append(handle)
            elif status.state == _C.TransferState.FAILED and not push.error:
                push.error, push.error_status = self._write_error(status.error)
        push.handles = still
        if still or push.shards_answered < push.shards_expected:
            return None  # a write may still read the blocks: they stay held
        if push.error and not push.hold_id:  # could not connect: the prompt need not be computed
            return PDOutcome(False, push.error, push.error_status), "failed"
        if push.kv.destination is None and now - push.admitted > self.timeout_s:
            return PDOutcome(False, f"no destination came within pd_timeout_s={self.timeout_s:g}", 504), "failed"
        if not push.hold_id:  # has not reached its last chunk
            if push.seq.finished:
                return PDOutcome(False, "the prefill request ended before its prompt was computed "
                                        f"({push.seq.finish_reason})", 503), "aborted"
            if now - push.admitted > self.timeout_s:  # the decode side has given up on it by now
                return PDOutcome(False, f"the prompt was not computed within pd_timeout_s={self.timeout_s:g}",
                                 504), "failed"
            return None
        if push.error:
            return PDOutcome(False, push.error, push.error_status), "failed"
        if push.last_issued and push.issued_layers == self.num_layers:
            return PDOutcome(True, first_token=push.seq.output_ids[0], prompt_tokens=push.num_prompt_tokens,
                             transferred_blocks=len(push.remote_blocks),
                             transferred_bytes=push.bytes, prefill_s=push.computed - push.admitted,
                             transfer_s=now - (push.first_put or now),
                             last_write_s=push.last_put - push.admitted), "completed"
        if push.seq.finished and not push.seq.output_ids:
            return PDOutcome(False, f"the prefill request ended without a token ({push.seq.finish_reason})",
                             503), "aborted"
        if now - push.admitted > 2 * self.timeout_s + 1.0:  # a layer the pusher never issued
            return PDOutcome(False, f"the KV was not written within pd_timeout_s={self.timeout_s:g}", 504), "failed"
        return None

    # ------------------------------------------------------------------ helpers
    def _on_layer(self, layer: int) -> None:
        if self.stall_s:
            time.sleep(self.stall_s)
        self._rank_writes.layer(layer)  # this rank's heads for decode ranks 1..
        if layer == self.num_layers - 1:
            return  # written with the first token (after_step)
        for push in self._armed:
            if self._pusher is not None:
                self._pusher.after_event(self, push, layer)
            else:
                self._put(push, layer, b"")

    def _put(self, push: _Push, layer: int, payload: bytes) -> None:
        with push.lock:
            if push.error or push.ended:
                return
            if not push.peer:  # no destination yet, or still dialling it: written once connected
                push.deferred.append((layer, payload))
                return
            if time.monotonic() - push.admitted > self.timeout_s:
                # No write starts later than pd_timeout_s after admission, so every write has landed
                # or failed within 2 x pd_timeout_s (the decode side holds its blocks longer).
                push.error, push.error_status = f"the KV was not written within pd_timeout_s={self.timeout_s:g}", 504
                return
            local_head_offset, remote_head_offset, num_heads = push.heads
            request = _C.TransferRequest(request_id=push.transfer_id, local_blocks=push.local_blocks,
                                         remote_blocks=push.remote_blocks, num_tokens=push.num_tokens, layer=layer,
                                         payload=payload, num_heads=num_heads, local_head_offset=local_head_offset,
                                         remote_head_offset=remote_head_offset)
            try:
                handle = self.transfer.put(push.peer, request)  # never blocks on the network
            except (RuntimeError, ValueError) as exc:  # the peer failed (or was dropped) meanwhile
                push.error, push.error_status = self._write_error(str(exc))
                return
            push.first_put = push.first_put or time.monotonic()
            push.handles.append(handle)
            push.issued_layers += 1
            push.bytes += push.num_tokens * self.bytes_per_token_layer * num_heads // self.local_kv_heads

    def _write_error(self, why: str) -> tuple[str, int]:
        if "holds no write grant" in why:  # the reservation ended (decode gave up on it) or never was
            return f"destination: the decode instance holds no reservation for this request: {why}", 409
        if why.startswith("remote_blocks:"):  # the destination names blocks that are not the request's
            return f"destination.blocks: the decode instance refused the write: {why}", 400
        timed_out = "time" in why.lower()
        return f"writing the KV to the decode instance failed: {why}", 504 if timed_out else 503

    def _end(self, seq_id: int, push: _Push, outcome: PDOutcome, counter: str) -> None:
        del self._pushes[seq_id]
        if push.hold_id:
            self.scheduler.release_blocks(push.hold_id)
        self.counters[counter] = self.counters.get(counter, 0) + 1
        self._outcomes[push.kv.pd_request_id] = outcome
        while len(self._outcomes) > _OUTCOMES_KEPT:
            del self._outcomes[next(iter(self._outcomes))]
        if not outcome.ok:
            logger.warning("PD prefill %s: %s", push.kv.pd_request_id, outcome.error)

    def _connected_peer(self, key: tuple[str, int]) -> int:
        return cached_peer(self.transfer, self._peers, key)

    def _connected(self, push: _Push) -> None:
        """The push's dial ended: on to _attach, or the failure."""
        dest = push.kv.destination
        key = (dest.transfer_host, dest.transfer_port)
        future, push.connecting = push.connecting, None
        if self._dialling.get(key) is future:
            del self._dialling[key]
        try:
            peer = future.result()
        except RuntimeError as exc:
            with push.lock:
                push.error, push.error_status = (f"destination: cannot reach the decode instance's transfer "
                                                 f"engine at {key[0]}:{key[1]}: {exc}", 503)
            return
        self._peers[key] = peer
        self._attach(push, peer)

    def _attach(self, push: _Push, peer: int) -> None:
        """Checks the destination against the connected peer, then writes what was computed meanwhile."""
        try:
            self._check_destination(peer, push.kv.destination)
        except ValueError as exc:
            with push.lock:
                push.error, push.error_status = str(exc), 400
            return
        with push.lock:
            if push.hold_id:
                self._plan(push)  # held before the destination came
            push.peer = peer
            deferred, push.deferred = push.deferred, []
        for layer, payload in deferred:
            self._put(push, layer, payload)

    def _plan(self, push: _Push) -> None:
        """Which of the held prompt blocks go where (called with push.lock held, once both are known)."""
        if push.planned:
            return
        dest = push.kv.destination
        start = aligned_start(dest.num_cached_tokens, self.block_size, dest.block_size)
        push.local_blocks = push.prompt_blocks[start // self.block_size:]
        push.remote_blocks = list(dest.blocks[start // dest.block_size:])
        push.num_tokens = dest.num_prompt_tokens - start
        endpoints = [(dest.transfer_host, dest.transfer_port), *(tuple(e) for e in dest.transfer_endpoints)]
        if len(endpoints) != self.tp_size and self._pusher is not None and not self._warned_slices:
            self._warned_slices = True
            logger.warning("PD between tensor-parallel sizes %d (prefill) and %d (decode) moves head slices: one "
                           "copy per token and layer, which over CUDA IPC is one memcpy each (slow for long "
                           "prompts; equal sizes move whole blocks)", self.tp_size, len(endpoints))
        for w in head_writes(self.num_kv_heads, self.tp_size, len(endpoints)):
            if w.prefill_rank == 0 and w.decode_rank == 0:  # the layer-by-layer writes (whole tokens when
                push.heads = (w.src_head_offset, w.dst_head_offset, w.num_heads)  # both sides hold as many)
            else:
                host, port = endpoints[w.decode_rank]
                push.shard_writes.setdefault(w.prefill_rank, []).append(
                    [host, port, w.src_head_offset, w.dst_head_offset, w.num_heads])
        push.planned = True


class _Pusher:
    """GPU: a thread that issues layer l's write once the CUDA event recorded after layer l
    completed, so that the step's stream is never synchronized for a write."""

    def __init__(self, transfer):
        import torch

        self._torch = torch
        self._queue: "queue.Queue" = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="rtpllm-pd-pusher", daemon=True)
        self._thread.start()

    def after_event(self, side: PrefillSide, push: _Push, layer: int) -> None:
        event = self._torch.cuda.Event()
        event.record()
        self._queue.put((event, side, push, layer))

    def _run(self) -> None:
        while True:
            event, side, push, layer = self._queue.get()
            event.synchronize()
            side._put(push, layer, b"")

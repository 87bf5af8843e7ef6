"""Every message that crosses a process link, as a frozen dataclass, and their one codec.

Links (each a socket of length-prefixed frames, engine/link/frames.py):
    server -> engine process (engine_core.py, process_engine.py):
        InitEngine first, then AddRequest, AbortRequest, CallInEngine, StopEngine
    engine process -> server:
        EngineReady or EngineFailed once, then StepOutputs after every step or batch of commands,
        EngineDead if the step loop fails
    engine -> tensor-parallel worker (executor/multiproc.py, executor/worker_main.py):
        InitWorker first, then InitRunner, WorkerStep, StopWorker
    worker -> engine: WorkerLoaded, WorkerReady, WorkerError
    engine <-> worker, PD with tensor parallelism: WorkerPDGrant / WorkerPDRevoke / WorkerPDPush,
        answered by WorkerPDAck / WorkerPDPushed
    engine <-> worker, KV tiers with tensor parallelism: WorkerKVOps, answered by WorkerKVDone

On the wire a message is the tuple (class name, *field values), pickled: `to_wire` and `from_wire`
are the only code that knows this. `from_wire` checks the name, the number of fields and the
type of every field declared with a plain type, so a message from a mismatched peer fails with
`MalformedMessage` naming the message and field instead of being misread.

NOTE: speed. StepOutputs goes out after every engine step, with the outputs of every running
request. Pickling an object other than builtin containers and scalars costs about 1 us more per
object on each side, so its OutputDeltas are columns (one list of builtins per field, not one
object per request), only what comes a few times per request (AddAnswer, PromptHeader,
RequestTimes) is a NamedTuple, and EngineStats travels as a tuple (link/stats_wire.py).
The codec checks field types on every message but StepOutputs and OutputDeltas, whose hot fields
the decoder checks as it reads them (a bad one fails it, and `OutputDeltas.check()` names it).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, NamedTuple, Optional, Union


class MalformedMessage(ValueError):
    """A frame that is not a known message, or whose fields do not match it."""


class LinkMessage:
    """Base of every message class below (registered for the codec by `_register`)."""

    __slots__ = ()


# ---------------------------------------------------------------------- server <-> engine process
@dataclass(frozen=True)
class EngineInfo:
    """What the server needs to know about the served model."""

    model_name: str
    max_model_len: int
    vocab_size: int
    stats: Any  # EngineStats
    startup: Optional[dict] = None  # the engine's start-up phases (StartupPhases.as_dict), for the server's log


@dataclass(frozen=True, slots=True)
class InitEngine(LinkMessage):
    config: Any  # EngineConfig
    log_level: int


@dataclass(frozen=True, slots=True)
class AddRequest(LinkMessage):
    tag: int  # answered by the AddAnswer with this tag
    request_id: str
    prompt: Any  # str, token ids or a prompt dict, as Engine.add_request takes it
    params: Any  # SamplingParams
    arrival_time: float
    stream: bool
    detokenize: bool  # False: the server decodes this request's text itself (output_deltas.py)


@dataclass(frozen=True, slots=True)
class AbortRequest(LinkMessage):
    request_id: str


@dataclass(frozen=True, slots=True)
class CallInEngine(LinkMessage):
    tag: int  # answered by the CallResult with this tag
    fn: Any  # a picklable callable of the Engine


@dataclass(frozen=True, slots=True)
class StopEngine(LinkMessage):
    pass


@dataclass(frozen=True, slots=True)
class EngineReady(LinkMessage):
    info: EngineInfo


@dataclass(frozen=True, slots=True)
class EngineFailed(LinkMessage):
    error: BaseException
    traceback: str


class AddAnswer(NamedTuple):
    tag: int
    error: Optional[BaseException]  # None: the engine took the request


class CallResult(NamedTuple):
    tag: int
    ok: bool
    value: Any  # the return value, or the exception when not ok


class PromptHeader(NamedTuple):
    """Sent with a request's first delta."""

    prompt: Optional[str]
    prompt_token_ids: list
    num_samples: int  # its n: how many entries of the per-sample column are this request's, every time


class RequestTimes(NamedTuple):
    """A request's values that change a few times in its life (RequestMetrics but the last token's
    time, and the cached prompt tokens): sent in its first delta and whenever one changed."""

    arrival_time: float
    first_scheduled_time: Optional[float]
    first_token_time: Optional[float]
    finished_time: Optional[float]
    num_cached_tokens: int


class PromptLogprobsDelta(NamedTuple):
    keep: int  # entries of the previous prompt logprobs that stay (the rest are replaced)
    entries: list  # the entries after those


@dataclass(slots=True)
class OutputDeltas(LinkMessage):
    """What changed in the outputs of the requests one step moved, since each one's previous delta
    (output_deltas.py builds and applies them). Only what moves every step is a column: a request's
    id and last token time, a sample's new token ids; the rest is sparse, sent only where it
    changed (None when nothing did). `check()` names the first field that is malformed (the
    decoder calls it when decoding fails).

    NOTE: speed. This goes out after every step. Each list, dict or object in a pickle costs on
    both sides, so columns are few and the sparse fields are None, not {}, in most steps. Not
    frozen, unlike the other messages: a frozen class's __init__ costs about 0.2 us per field."""

    # Per request, in order:
    request_ids: list
    last_token_time: list
    # Per sample: request 0's samples (PromptHeader.num_samples of them), then request 1's, ...
    new_token_ids: list  # token ids only grow
    # Sparse, by request id:
    headers: Optional[dict]  # -> PromptHeader, in a request's first delta
    times: Optional[dict]  # -> RequestTimes, in its first delta and when one of them changed
    prompt_logprobs: Optional[dict]  # -> PromptLogprobsDelta, while prompt logprobs grow
    # Sparse, by the sample's position in new_token_ids:
    texts: Optional[dict]  # -> (keep, piece) where the engine's text changed: text[:keep] + piece
    logprobs: Optional[dict]  # -> (cumulative logprob, new logprobs), for samples with logprobs
    finishes: Optional[dict]  # -> (finish_reason, stop_reason), in the delta where the sample finished

    @classmethod
    def empty(cls) -> "OutputDeltas":
        return cls([], [], [], None, None, None, None, None, None)

    def check(self) -> None:
        """MalformedMessage naming the first field that is not of its kind, or a per-request column
        of the wrong length, or sparse entries of requests the delta does not hold."""
        for name in ("request_ids", "last_token_time", "new_token_ids"):
            if type(getattr(self, name)) is not list:
                raise MalformedMessage(f"OutputDeltas.{name}: expected a list, got {type(getattr(self, name)).__name__}")
        for name in _SPARSE_NAMES:
            value = getattr(self, name)
            if value is not None and type(value) is not dict:
                raise MalformedMessage(f"OutputDeltas.{name}: expected a dict or None, got {type(value).__name__}")
        if len(self.last_token_time) != len(self.request_ids):
            raise MalformedMessage(f"OutputDeltas.last_token_time: {len(self.last_token_time)} entries for "
                                   f"{len(self.request_ids)} requests")
        for name in ("headers", "times", "prompt_logprobs"):
            sparse = getattr(self, name)
            if sparse and not set(sparse) <= set(self.request_ids):
                strangers = sorted(set(sparse) - set(self.request_ids))
                raise MalformedMessage(f"OutputDeltas.{name}: request ids {strangers} are not among request_ids")
        for name in ("texts", "logprobs", "finishes"):
            sparse = getattr(self, name)
            if sparse and not all(type(k) is int and 0 <= k < len(self.new_token_ids) for k in sparse):
                raise MalformedMessage(f"OutputDeltas.{name}: positions outside the {len(self.new_token_ids)} samples")


_SPARSE_NAMES = ("headers", "times", "prompt_logprobs", "texts", "logprobs", "finishes")


@dataclass(slots=True)
class StepOutputs(LinkMessage):
    """NOTE: not frozen, like OutputDeltas: one goes out after every step."""

    answers: list  # [AddAnswer] for the adds among the commands this step took
    deltas: OutputDeltas  # of the requests the step moved
    stats: Any  # EngineStats in wire form (link/stats_wire.py)
    call_results: list  # [CallResult]
    kv_events: Any  # instance_report.KVEventBatch, or None when there were none


@dataclass(frozen=True, slots=True)
class EngineDead(LinkMessage):
    reason: str


# ---------------------------------------------------------------------- engine <-> tensor-parallel workers
@dataclass(frozen=True, slots=True)
class InitWorker(LinkMessage):
    spec: Any  # executor.worker.WorkerSpec


@dataclass(frozen=True, slots=True)
class InitRunner(LinkMessage):
    max_model_len: int
    extra_kv_bytes_per_block: int  # a draft model's KV beside the target's (rank 0 holds it; all size alike)
    kv_root_hash: int = 0  # the cache identity: the root of the block hashes the ranks' KV tiers key by


@dataclass(frozen=True, slots=True)
class WorkerStep(LinkMessage):
    """Not answered: the ranks meet in the model's collectives, and rank 0 samples."""

    batch: Any  # executor.step_arrays.StepArrays
    prompt_logprob_seqs: list
    pending_positions: Any  # in_flight.PendingInputs.positions, or None
    pending_rows: Any  # in_flight.PendingInputs.rows, or None
    drafts: Any  # a speculative step's draft tokens (int64 numpy array, rank 0's proposal), or None


@dataclass(frozen=True, slots=True)
class StopWorker(LinkMessage):
    pass


@dataclass(frozen=True, slots=True)
class WorkerLoaded(LinkMessage):
    rank: int


@dataclass(frozen=True, slots=True)
class WorkerReady(LinkMessage):
    rank: int
    num_blocks: int
    transfer_port: int = 0  # PD: the port of this rank's KV transfer engine (0: none)


# PD with tensor parallelism (pd/worker_side.py): rank 0 keeps the PD logic; ranks > 0 only move
# their own KV heads, as it tells them.
@dataclass(frozen=True, slots=True)
class WorkerPDGrant(LinkMessage):
    """engine -> decode worker: request `transfer_id` may write `blocks` (answered by WorkerPDAck)."""

    transfer_id: int
    blocks: list


@dataclass(frozen=True, slots=True)
class WorkerPDRevoke(LinkMessage):
    transfer_id: int


@dataclass(frozen=True, slots=True)
class WorkerPDPush(LinkMessage):
    """engine -> prefill worker: write this rank's KV heads of the prompt into decode ranks
    (answered by WorkerPDPushed once every write is final, an empty `writes` too); `writes` holds
    [host, port, src_head_offset, dst_head_offset, num_heads] per decode rank (pd/head_map.py).
    by_layer: sent before the step that computes the prompt's last chunk, each layer is written as
    it is computed; else the prompt is computed and every layer goes in one put per write."""

    transfer_id: int
    writes: list
    local_blocks: list
    remote_blocks: list
    num_tokens: int
    by_layer: bool


@dataclass(frozen=True, slots=True)
class WorkerPDAck(LinkMessage):
    rank: int
    transfer_id: int


@dataclass(frozen=True, slots=True)
class WorkerPDPushed(LinkMessage):
    rank: int
    transfer_id: int
    error: str  # "" when the write is DONE
    bytes: int


# KV tiers with tensor parallelism (engine/kv_tier_mirror.py): each rank keeps its own KV heads in
# tiers of its own, and repeats rank 0's loads and saves on them.
@dataclass(frozen=True, slots=True)
class WorkerKVOps(LinkMessage):
    """engine -> worker: rank 0's tier loads and saves since the last, oldest first, each
    (handle, is_load, hashes, gpu_blocks); sent before the next step, so a save follows the step
    that computed its blocks. Each is answered in a WorkerKVDone once it ends."""

    operations: list


@dataclass(frozen=True, slots=True)
class WorkerKVDone(LinkMessage):
    rank: int
    results: list  # (handle, done) per operation that ended; done False: FAILED


@dataclass(frozen=True, slots=True)
class WorkerError(LinkMessage):
    description: str
    traceback: str


# ---------------------------------------------------------------------- codec
class _Spec(NamedTuple):
    cls: type
    fields: tuple[str, ...]
    values: Any  # message -> tuple of its field values
    checks: tuple[tuple[int, str, tuple[type, ...]], ...]  # (position, field, accepted types)
    nested: tuple[int, ...]  # positions of fields that hold a message (sent in wire form too)


_BY_CLASS: dict[type, tuple[str, _Spec]] = {}
_BY_NAME: dict[str, _Spec] = {}


def _accepted_types(hint: Any) -> Optional[tuple[type, ...]]:
    """The classes a value of type `hint` may have, or None where only Any or a deeper check would do."""
    if hint is Any:
        return None
    if hint is float:
        return (float, int)
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        accepted = [_accepted_types(arg) for arg in typing.get_args(hint)]
        return None if None in accepted else tuple(t for ts in accepted for t in ts)
    if hint is type(None):
        return (type(None),)
    if isinstance(origin, type):
        return (origin,)
    return (hint,) if isinstance(hint, type) else None


def _register(cls: type) -> None:
    fields = tuple(f.name for f in dataclasses.fields(cls))
    hints = typing.get_type_hints(cls)
    nested = tuple(i for i, name in enumerate(fields) if hints[name] in _BY_CLASS)
    # A message with a check() of its own is checked where it is read (OutputDeltas: by the decoder,
    # whose strict zips find a bad column for free, then ask check() for its name).
    checks = () if hasattr(cls, "check") else tuple(
        (i, name, accepted) for i, name in enumerate(fields)
        if i not in nested and (accepted := _accepted_types(hints[name])) is not None)
    # attrgetter of several names gives their values as a tuple (in C: this runs for every frame).
    if len(fields) > 1:
        values = attrgetter(*fields)
    else:
        get = attrgetter(*fields) if fields else None
        values = (lambda message: (get(message),)) if fields else (lambda message: ())
    spec = _Spec(cls, fields, values, checks, nested)
    _BY_CLASS[cls] = (cls.__name__, spec)
    _BY_NAME[cls.__name__] = spec


# NOTE: a message holding another (StepOutputs.deltas) registers after it.
for _cls in (InitEngine, AddRequest, AbortRequest, CallInEngine, StopEngine, EngineReady, EngineFailed, OutputDeltas,
             StepOutputs, EngineDead, InitWorker, InitRunner, WorkerStep, StopWorker, WorkerLoaded, WorkerReady,
             WorkerError, WorkerPDGrant, WorkerPDRevoke, WorkerPDPush, WorkerPDAck, WorkerPDPushed, WorkerKVOps,
             WorkerKVDone):
    _register(_cls)


def to_wire(message: LinkMessage) -> tuple:
    """The plain tuple that travels: (class name, *field values)."""
    try:
        name, spec = _BY_CLASS[type(message)]
    except KeyError:
        raise TypeError(f"link message: {type(message).__name__} is not a registered message class") from None
    values = spec.values(message)
    if spec.nested:
        values = list(values)
        for i in spec.nested:
            values[i] = to_wire(values[i])
    return (name, *values)


def from_wire(wire: Any) -> LinkMessage:
    """The message `to_wire` made; MalformedMessage naming the message and field when it does not fit."""
    if type(wire) is not tuple or not wire:
        raise MalformedMessage(f"link message: expected a (name, *fields) tuple, got {type(wire).__name__}")
    spec = _BY_NAME.get(wire[0]) if type(wire[0]) is str else None
    if spec is None:
        raise MalformedMessage(f"link message: unknown message {wire[0]!r}")
    if len(wire) - 1 != len(spec.fields):
        raise MalformedMessage(f"{wire[0]}: expected {len(spec.fields)} fields {spec.fields}, got {len(wire) - 1}")
    for i, name, accepted in spec.checks:
        value = wire[i + 1]
        if not isinstance(value, accepted):
            raise MalformedMessage(f"{wire[0]}.{name}: expected {' or '.join(t.__name__ for t in accepted)}, "
                                   f"got {type(value).__name__}")
    values = wire[1:]
    if spec.nested:
        values = list(values)
        for i in spec.nested:
            values[i] = from_wire(values[i])
    return spec.cls(*values)

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

On the wire a message is the tuple (class name, *field values), pickled: `to_wire` and `from_wire`
are the only code that knows this. `from_wire` checks the name, the number of fields and the
type of every field declared with a plain type, so a message from a mismatched peer fails with
`MalformedMessage` naming the message and field instead of being misread.

NOTE: speed. StepOutputs goes out after every engine step, with the outputs of every running
request. Pickling an object other than builtin containers and scalars costs about 1 us more per
object on each side, so its OutputDeltas are columns (one list of builtins per field, not one
object per request), and only what comes once per request (AddAnswer, PromptHeader) is a NamedTuple.
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


class PromptLogprobsDelta(NamedTuple):
    keep: int  # entries of the previous prompt logprobs that stay (the rest are replaced)
    entries: list  # the entries after those


@dataclass(slots=True)
class OutputDeltas(LinkMessage):
    """What changed in the outputs of the requests one step moved, since each one's previous delta
    (output_deltas.py builds and applies them), column by column: one list per field costs far
    less to pickle than one object per request. `check()` names the first column that is not a
    list of the right length (the decoder calls it when its strict zips find one).

    NOTE: not frozen, unlike the other messages: its columns are filled in place by the encoder
    anyway, and a frozen class's __init__ costs about 0.2 us per field, per step on each side."""

    # Per request, in order:
    request_ids: list
    num_samples: list  # how many entries of the per-sample columns are this request's (its n)
    num_cached_tokens: list
    finished: list
    # RequestMetrics, per request
    arrival_time: list
    first_scheduled_time: list
    first_token_time: list
    last_token_time: list
    finished_time: list
    # Sparse: what only some of the requests above send.
    headers: dict  # request id -> PromptHeader, in a request's first delta
    prompt_logprobs: dict  # request id -> PromptLogprobsDelta, while prompt logprobs grow
    # Per sample: request 0's samples, then request 1's, ... The text is text[:text_keep] + text_piece
    # (text only grows, except where a stop string cuts it); token ids and logprobs only grow.
    sample_index: list
    text_keep: list
    text_piece: list
    new_token_ids: list
    cumulative_logprob: list  # None without logprobs
    new_logprobs: list  # None without logprobs
    finish_reason: list
    stop_reason: list

    @classmethod
    def empty(cls) -> "OutputDeltas":
        return cls([], [], [], [], [], [], [], [], [], {}, {}, [], [], [], [], [], [], [], [])

    def check(self) -> None:
        """MalformedMessage naming the first column that is not a list of the right length."""
        for name in self.__dataclass_fields__:
            expected = dict if name in ("headers", "prompt_logprobs") else list
            if type(getattr(self, name)) is not expected:
                raise MalformedMessage(f"OutputDeltas.{name}: expected a {expected.__name__}, "
                                       f"got {type(getattr(self, name)).__name__}")
        per_request = len(self.request_ids)
        if list(map(len, _PER_REQUEST(self))).count(per_request) != len(_PER_REQUEST_NAMES):
            name = next(n for n in _PER_REQUEST_NAMES if len(getattr(self, n)) != per_request)
            raise MalformedMessage(f"OutputDeltas.{name}: {len(getattr(self, name))} entries for "
                                   f"{per_request} requests")
        num_samples = sum(self.num_samples)
        if list(map(len, _PER_SAMPLE(self))).count(num_samples) != len(_PER_SAMPLE_NAMES):
            name = next(n for n in _PER_SAMPLE_NAMES if len(getattr(self, n)) != num_samples)
            raise MalformedMessage(f"OutputDeltas.{name}: {len(getattr(self, name))} entries for "
                                   f"{num_samples} samples")
        for name, sparse in (("headers", self.headers), ("prompt_logprobs", self.prompt_logprobs)):
            if sparse and not set(sparse) <= set(self.request_ids):
                strangers = sorted(set(sparse) - set(self.request_ids))
                raise MalformedMessage(f"OutputDeltas.{name}: request ids {strangers} are not among request_ids")


_PER_REQUEST_NAMES = ("num_samples", "num_cached_tokens", "finished", "arrival_time", "first_scheduled_time",
                      "first_token_time", "last_token_time", "finished_time")
_PER_SAMPLE_NAMES = ("sample_index", "text_keep", "text_piece", "new_token_ids", "cumulative_logprob", "new_logprobs",
                     "finish_reason", "stop_reason")
_PER_REQUEST, _PER_SAMPLE = attrgetter(*_PER_REQUEST_NAMES), attrgetter(*_PER_SAMPLE_NAMES)


@dataclass(frozen=True, slots=True)
class StepOutputs(LinkMessage):
    answers: list  # [AddAnswer] for the adds among the commands this step took
    deltas: OutputDeltas  # of the requests the step moved
    stats: Any  # EngineStats
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


@dataclass(frozen=True, slots=True)
class WorkerStep(LinkMessage):
    """Not answered: the ranks meet in the model's collectives, and rank 0 samples."""

    batch: Any  # executor.step_arrays.StepArrays
    prompt_logprob_seqs: list
    pending_positions: Any  # in_flight.PendingInputs.positions, or None
    pending_rows: Any  # in_flight.PendingInputs.rows, or None


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
             WorkerError):
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

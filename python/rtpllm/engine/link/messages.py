"""Every message that crosses a process link, as a frozen dataclass, and their one codec.

Links (each a socket of length-prefixed frames, engine/frames.py):
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

NOTE: speed. StepOutputs goes out after every engine step, with one entry per running request.
Pickling any object other than builtin containers and scalars costs about 1 us more per object on
each side, so the per-request entries inside it (output deltas, output_deltas.py) stay plain tuples
of builtins, and the per-request answers are NamedTuples (built once per request, not per token).
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
    tokenizer: Any  # pickled across: the server tokenizes chat templates and /tokenize itself


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
    detokenize: bool  # False: the server decodes this stream's text itself (output_deltas.py)


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


@dataclass(frozen=True, slots=True)
class StepOutputs(LinkMessage):
    answers: list  # [AddAnswer] for the adds among the commands this step took
    deltas: list  # output deltas of the requests the step moved (output_deltas.py)
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


def _register(cls: type) -> type:
    fields = tuple(f.name for f in dataclasses.fields(cls))
    hints = typing.get_type_hints(cls)
    checks = tuple((i, name, accepted) for i, name in enumerate(fields)
                   if (accepted := _accepted_types(hints[name])) is not None)
    getter = attrgetter(*fields) if len(fields) > 1 else None
    if len(fields) == 1:
        values = (lambda get: lambda message: (get(message),))(attrgetter(fields[0]))
    elif fields:
        values = getter
    else:
        values = lambda message: ()  # noqa: E731
    spec = _Spec(cls, fields, values, checks)
    _BY_CLASS[cls] = (cls.__name__, spec)
    _BY_NAME[cls.__name__] = spec
    return cls


for _cls in (InitEngine, AddRequest, AbortRequest, CallInEngine, StopEngine, EngineReady, EngineFailed, StepOutputs,
             EngineDead, InitWorker, InitRunner, WorkerStep, StopWorker, WorkerLoaded, WorkerReady, WorkerError):
    _register(_cls)


def to_wire(message: LinkMessage) -> tuple:
    """The plain tuple that travels: (class name, *field values)."""
    try:
        name, spec = _BY_CLASS[type(message)]
    except KeyError:
        raise TypeError(f"link message: {type(message).__name__} is not a registered message class") from None
    return (name, *spec.values(message))


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
    return spec.cls(*wire[1:])

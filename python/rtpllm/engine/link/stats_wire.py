"""EngineStats on the link: a tuple of builtins instead of the dataclass.

The engine process sends its counters after every step. Pickled as a dataclass, EngineStats cost
about 3 us to send and 4 us to receive (its class, a dict of field names, a frozen __setattr__ per
field): a quarter of the link's cost per step at batch 1. As a tuple (nested snapshots as tuples
too) it costs well under a microsecond, and the server builds the EngineStats only when something
reads it (`stats_from_wire`, at most once per step).
"""

from __future__ import annotations

import dataclasses
from operator import attrgetter

from rtpllm.engine.link.messages import MalformedMessage
from rtpllm.engine.stats import EngineStats, KVTierSnapshot
from rtpllm.spec.stats import SpecCounters


def _fields(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


_STATS_FIELDS = _fields(EngineStats)
STATS_WIRE_LEN = len(_STATS_FIELDS)
_STATS_VALUES = attrgetter(*_STATS_FIELDS)
_TIER_VALUES = attrgetter(*_fields(KVTierSnapshot))
_SPEC_VALUES = attrgetter(*_fields(SpecCounters))
_SPEC = _STATS_FIELDS.index("spec")
_TIERS = _STATS_FIELDS.index("kv_tiers")


def stats_to_wire(stats: EngineStats) -> tuple:
    values = _STATS_VALUES(stats)
    spec, tiers = values[_SPEC], values[_TIERS]
    if spec is None and not tiers:
        return values
    values = list(values)
    if spec is not None:
        values[_SPEC] = _SPEC_VALUES(spec)
    values[_TIERS] = tuple(map(_TIER_VALUES, tiers))
    return tuple(values)


def stats_from_wire(wire) -> EngineStats:
    """The EngineStats `stats_to_wire` sent; MalformedMessage when `wire` is not of that form."""
    if type(wire) is not tuple or len(wire) != len(_STATS_FIELDS):
        raise MalformedMessage(f"StepOutputs.stats: expected a tuple of {len(_STATS_FIELDS)} EngineStats fields, "
                               f"got {type(wire).__name__}")
    try:
        values = list(wire)
        if values[_SPEC] is not None:
            values[_SPEC] = SpecCounters(*values[_SPEC])
        values[_TIERS] = tuple(KVTierSnapshot(*tier) for tier in values[_TIERS])
        return EngineStats(*values)
    except TypeError as exc:
        raise MalformedMessage(f"StepOutputs.stats: {exc}") from None

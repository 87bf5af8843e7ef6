"""What the server hands the engine with a prefill-decode request, and the small shared rules.

`SamplingParams.kv_transfer_params` carries one of these from the /internal/pd endpoints to the
engine (in its thread or its process: they pickle):
    DecodeKV   the request's prompt KV comes from a prefill peer (decode instance);
    PrefillKV  compute the prompt and write its KV to `destination` (prefill instance).
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass
from typing import Optional

from rtpllm.pd.protocol import KVDestination


@dataclass(frozen=True)
class DecodeKV:
    pd_request_id: str


@dataclass(frozen=True)
class PrefillKV:
    pd_request_id: str
    destination: Optional[KVDestination] = None  # None: it follows (protocol.py, overlap)


@dataclass(frozen=True)
class PDOutcome:
    """How one PD request ended on this instance, for the server (`PrefillResult` or an error)."""

    ok: bool
    error: str = ""
    status: int = 200            # the HTTP status the error maps to (503 peer gone, 504 timed out)
    first_token: int = -1
    prompt_tokens: int = 0
    transferred_blocks: int = 0
    transferred_bytes: int = 0
    prefill_s: float = 0.0
    transfer_s: float = 0.0
    last_write_s: float = 0.0


def transfer_request_id(pd_request_id: str) -> int:
    """The transfer engine's 64-bit request id for a pd_request_id, the same on both sides (the
    notices name it): the router's ids are unique among requests in flight, and 64 bits of
    BLAKE2 make a collision between two of them negligible."""
    return int.from_bytes(hashlib.blake2b(pd_request_id.encode(), digest_size=8).digest(), "little")


@dataclass(frozen=True)
class FirstToken:
    """What the prefill instance sampled, carried to decode with the last layer's notice: the
    token and, when the request asked for logprobs, its position's {token id: logprob} (the
    sampled token first, then the top-N, as `TokenLogprobs`), so that decode's output matches a
    colocated instance's."""

    token: int
    logprobs: Optional[dict] = None


_TOKEN = struct.Struct("<q")
_COUNT = struct.Struct("<I")
_ENTRY = struct.Struct("<qd")  # float64: the sampler's float32 logprob survives exactly


def encode_first_token(first: FirstToken) -> bytes:
    """<token: int64> [<count: uint32> count x <token id: int64, logprob: float64>], little endian;
    the count and entries only with logprobs (8 bytes: the token alone)."""
    payload = _TOKEN.pack(first.token)
    if first.logprobs is None:
        return payload
    payload += _COUNT.pack(len(first.logprobs))
    return payload + b"".join(_ENTRY.pack(t, v) for t, v in first.logprobs.items())


def decode_first_token(payload: bytes) -> Optional[FirstToken]:
    """The payload's FirstToken, None when it is malformed."""
    if len(payload) == _TOKEN.size:
        return FirstToken(_TOKEN.unpack(payload)[0])
    head = _TOKEN.size + _COUNT.size
    if len(payload) < head:
        return None
    (count,) = _COUNT.unpack_from(payload, _TOKEN.size)
    if len(payload) != head + count * _ENTRY.size:
        return None
    entries = (_ENTRY.unpack_from(payload, head + i * _ENTRY.size) for i in range(count))
    return FirstToken(_TOKEN.unpack_from(payload)[0], {t: v for t, v in entries})


def aligned_start(num_cached_tokens: int, local_block_size: int, remote_block_size: int) -> int:
    """The first token a prefill writes: decode's prefix hit rounded down to a boundary of both
    block sizes (a transfer covers whole leading blocks on both sides), 0 when there is none."""
    both = math.lcm(local_block_size, remote_block_size)
    return num_cached_tokens // both * both

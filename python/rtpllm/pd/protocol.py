"""The prefill-decode hand-off between the router and the two instances, as typed messages.

One request, three parties (`rtpllm router --prefill P --decode D`):

1. router -> decode  `POST /internal/pd/decode` with a `DecodeRequest`. The decode instance
   tokenizes the request exactly as `/v1/<endpoint>` would, allocates KV blocks for the whole
   prompt (a local prefix hit counts), and parks the request in WAITING_FOR_KV. It answers with a
   server-sent-event stream whose first event is `{"pd_reserved": <KVDestination>}`; after that
   come the same chunks `/v1/<endpoint>` streams (with `stream: false` in the original request:
   one event holding the complete response JSON), then `data: [DONE]`. An error before or after
   the reservation is one `{"error": {...}}` event (OpenAI error body) followed by `[DONE]`.
   Closing this stream aborts the request and frees its blocks.
2. router -> prefill `POST /internal/pd/prefill` with a `PrefillRequest` (the same body plus the
   decode side's `KVDestination`). The prefill instance computes the prompt, writes each layer's
   KV into the decode instance's blocks as soon as that layer is computed (the transfer engine's
   put; block sizes may differ on the two sides), then sends the first sampled token with the
   last write's notice. It answers with a `PrefillResult` JSON (200), or an OpenAI error body
   (4xx for bad input, 503 when it cannot take the request now, 504 when the transfer timed out).
3. decode: once every layer and the first token have arrived, the request runs on as if it had
   been prefilled locally; its stream (1.) carries the tokens to the router and the client.

Failure policy: every wait is bounded (`pd_timeout_s`). A decode request whose KV does not arrive
in time ends with an error event and frees its blocks; a prefill whose writes fail (decode gone)
frees its blocks and answers 503/504; the router then ends the client's request with that error,
or, with `--pd-retry`, asks another prefill instance once. Never a hang, never a silent
recompute; each outcome is counted on both instances' /metrics.

Added by the instance side (pd/routes.py, pd/decode_side.py, pd/prefill_side.py), compatible with
the above:
- decode: an error before the reservation also carries its HTTP status (400 bad input or wrong
  role, 503 engine gone; a reservation that found no room within pd_timeout_s is a 503 with
  type pd_transfer_failed); the body is still the one error event and [DONE]. Without room the
  reservation queues (first come, first served) until blocks free up, so the first event may take
  up to pd_timeout_s. From the reservation on, the status is 200.
- decode <-> prefill, over the transfer engine: the TransferRequest.request_id of every write is
  the first 8 bytes (little endian) of BLAKE2b(pd_request_id); one write (and notice) per layer;
  the last layer's notice carries the first sampled token as its payload (kv_params.FirstToken:
  an 8-byte little-endian int64; with logprobs asked for, followed by a uint32 count and that many
  (int64 token id, float64 logprob) pairs, the sampled token's first), so that decode reports the
  first position's logprobs a colocated instance would. KVDestination.cache_identity is the pool's cache identity without the block size, as
  16 hex digits. Writes cover tokens [s, num_prompt_tokens) where s is num_cached_tokens rounded
  down to a multiple of both block sizes.
- decode grants each reservation's transfer id its blocks (the transfer engine's write grants,
  revoked when the request ends); a prefill whose destination names other blocks (a wrong or stale
  list) is refused before it writes anything: 400 with param "destination"; 409 when decode holds
  no reservation for the request (it ended, e.g. its KV wait failed, or never existed).
- n > 1: prefill computes the prompt once (sample 0, its first token); decode starts the other
  samples from the transferred prompt blocks. A request asking for prompt logprobs is a 400.
- overlap (what the router does unless --no-pd-overlap): the router sends the prefill request
  without a destination at the same time as the decode request, and the reservation follows in
  `POST /internal/pd/prefill/destination` (`PrefillDestination`; 200 `{}`, 404 when this
  instance has no such prefill in flight, 400 for a bad body). The prefill computes meanwhile and
  holds the layers it finished (their KV stays in its own blocks) until the destination comes, then
  writes them all and the rest layer by layer. A destination may arrive before its prefill request
  (it waits up to pd_timeout_s for it); no destination within pd_timeout_s of the prefill's
  admission ends it with 504.
- tensor parallelism: KVDestination.transfer_endpoints lists the transfer engines of decode's
  ranks 1.. ([host, port]); each prefill rank writes the KV heads it holds into the decode ranks
  that hold them (pd/head_map.py), so the two sides' TP sizes may differ. The last layer's notice
  (rank 0's, with the first token) goes only after every other write is DONE.
- a prefill instance starts no write later than pd_timeout_s after it took the request; a
  decode instance keeps the blocks of a failed or aborted reservation for 3 x pd_timeout_s (or
  until the last notice), so a late write never lands in reused blocks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Optional

ENDPOINTS = ("completions", "chat")
Endpoint = Literal["completions", "chat"]


def _need(data: dict, key: str, kind: type, where: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected an object")
    if key not in data:
        raise ValueError(f"{where}.{key}: missing")
    value = data[key]
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"{where}.{key}: expected {kind.__name__}, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class KVDestination:
    """Where a prefill instance writes one request's KV: the decode instance's reservation."""

    pd_request_id: str          # chosen by the router, unique among its requests in flight
    transfer_host: str          # the decode instance's transfer engine
    transfer_port: int
    cache_identity: str         # model, dtype, KV layout: the prefill side refuses a mismatch
    block_size: int             # the decode pool's tokens per block
    blocks: list[int]           # decode-side block ids covering tokens [0, num_prompt_tokens)
    num_prompt_tokens: int
    num_cached_tokens: int = 0  # decode's own prefix hit: tokens [0, this) need no write
    # Tensor parallelism: the transfer engines of decode's ranks 1.. ([host, port] each; rank 0's is
    # transfer_host:transfer_port). Every rank holds its own KV heads of the same block ids; a
    # prefill instance writes each head into the decode rank that holds it (pd/head_map.py).
    transfer_endpoints: list = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict, where: str = "destination") -> "KVDestination":
        blocks = _need(data, "blocks", list, where)
        if not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in blocks):
            raise ValueError(f"{where}.blocks: expected non-negative block ids")
        dest = cls(pd_request_id=_need(data, "pd_request_id", str, where),
                   transfer_host=_need(data, "transfer_host", str, where),
                   transfer_port=_need(data, "transfer_port", int, where),
                   cache_identity=_need(data, "cache_identity", str, where),
                   block_size=_need(data, "block_size", int, where),
                   blocks=list(blocks),
                   num_prompt_tokens=_need(data, "num_prompt_tokens", int, where),
                   num_cached_tokens=int(data.get("num_cached_tokens", 0)),
                   transfer_endpoints=_endpoints(data.get("transfer_endpoints", []), where + ".transfer_endpoints"))
        if dest.block_size <= 0:
            raise ValueError(f"{where}.block_size: must be positive, got {dest.block_size}")
        if not 0 < dest.transfer_port < 65536:
            raise ValueError(f"{where}.transfer_port: out of range: {dest.transfer_port}")
        if dest.num_prompt_tokens <= 0:
            raise ValueError(f"{where}.num_prompt_tokens: must be positive")
        if not 0 <= dest.num_cached_tokens < dest.num_prompt_tokens:
            raise ValueError(f"{where}.num_cached_tokens: must lie in [0, num_prompt_tokens)")
        needed = -(-dest.num_prompt_tokens // dest.block_size)
        if len(dest.blocks) != needed:
            raise ValueError(f"{where}.blocks: {len(dest.blocks)} blocks do not cover "
                             f"{dest.num_prompt_tokens} tokens of {dest.block_size} per block")
        return dest


def _endpoints(data: Any, where: str) -> list:
    if not isinstance(data, list):
        raise ValueError(f"{where}: expected a list of [host, port]")
    out = []
    for item in data:
        if (not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str) or not isinstance(item[1], int)
                or isinstance(item[1], bool) or not 0 < item[1] < 65536):
            raise ValueError(f"{where}: expected [host, port] pairs with a port in 1..65535, got {item!r}")
        out.append([item[0], item[1]])
    return out


@dataclass(frozen=True)
class DecodeRequest:
    """router -> decode: reserve blocks for `request` and stream its output."""

    pd_request_id: str
    endpoint: Endpoint          # which OpenAI endpoint `request` is a body of
    request: dict               # the client's body, unchanged

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict, where: str = "body") -> "DecodeRequest":
        endpoint = _need(data, "endpoint", str, where)
        if endpoint not in ENDPOINTS:
            raise ValueError(f"{where}.endpoint: must be one of {ENDPOINTS}, got {endpoint!r}")
        return cls(pd_request_id=_need(data, "pd_request_id", str, where), endpoint=endpoint,
                   request=_need(data, "request", dict, where))


@dataclass(frozen=True)
class PrefillRequest:
    """router -> prefill: compute `request`'s prompt and write its KV to `destination`; without
    one, the prefill starts at once and the destination follows (`PrefillDestination`)."""

    pd_request_id: str
    endpoint: Endpoint
    request: dict
    destination: Optional[KVDestination] = None

    def to_json(self) -> dict:
        data = {"pd_request_id": self.pd_request_id, "endpoint": self.endpoint, "request": self.request}
        if self.destination is not None:
            data["destination"] = self.destination.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict, where: str = "body") -> "PrefillRequest":
        head = DecodeRequest.from_json(data, where)
        dest = None
        if isinstance(data, dict) and data.get("destination") is not None:
            dest = _destination_of(head.pd_request_id, data, where)
        return cls(pd_request_id=head.pd_request_id, endpoint=head.endpoint, request=head.request,
                   destination=dest)


@dataclass(frozen=True)
class PrefillDestination:
    """router -> prefill: the reservation of a prefill sent without one."""

    pd_request_id: str
    destination: KVDestination

    def to_json(self) -> dict:
        return {"pd_request_id": self.pd_request_id, "destination": self.destination.to_json()}

    @classmethod
    def from_json(cls, data: dict, where: str = "body") -> "PrefillDestination":
        pd_request_id = _need(data, "pd_request_id", str, where)
        return cls(pd_request_id=pd_request_id, destination=_destination_of(pd_request_id, data, where))


def _destination_of(pd_request_id: str, data: dict, where: str) -> KVDestination:
    dest = KVDestination.from_json(_need(data, "destination", dict, where), where + ".destination")
    if dest.pd_request_id != pd_request_id:
        raise ValueError(f"{where}.destination.pd_request_id: does not match pd_request_id")
    return dest


@dataclass(frozen=True)
class PrefillResult:
    """prefill -> router, once every write has landed (the decode side has the first token)."""

    pd_request_id: str
    prompt_tokens: int
    first_token: int
    transferred_blocks: int = 0
    transferred_bytes: int = 0
    prefill_s: float = 0.0      # from admission to the last chunk's forward launched (on a GPU: not finished)
    transfer_s: float = 0.0     # from the first write to the last notice acknowledged
    last_write_s: float = 0.0   # from admission to the last layer's write (the first token) issued
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict, where: str = "result") -> "PrefillResult":
        return cls(pd_request_id=_need(data, "pd_request_id", str, where),
                   prompt_tokens=_need(data, "prompt_tokens", int, where),
                   first_token=_need(data, "first_token", int, where),
                   transferred_blocks=int(data.get("transferred_blocks", 0)),
                   transferred_bytes=int(data.get("transferred_bytes", 0)),
                   prefill_s=float(data.get("prefill_s", 0.0)),
                   transfer_s=float(data.get("transfer_s", 0.0)),
                   last_write_s=float(data.get("last_write_s", 0.0)),
                   extra=dict(data.get("extra", {})))

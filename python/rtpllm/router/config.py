"""The router's options: one frozen dataclass, validated on construction (the CLI maps onto it)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

POLICIES = ("cache_aware", "round_robin", "least_loaded")


def _url(value: str, param: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise ValueError(f"{param}: expected an http:// or https:// URL, got {value!r}")
    return value.rstrip("/")


@dataclass(frozen=True)
class RouterConfig:
    # Colocated instances (each runs prefill and decode: `rtpllm serve`).
    backends: tuple[str, ...] = ()
    # Or prefill and decode pools (`rtpllm serve --role prefill|decode`; the hand-off is
    # rtpllm/pd/protocol.py, the router's side pd_proxy.py): the policy below picks the prefill
    # instance (cache hits and lanes matter there), the decode instance is the least loaded.
    prefill: tuple[str, ...] = ()
    decode: tuple[str, ...] = ()
    # Bounds on the PD flow's waits (the connection itself: `connect_timeout_s`). Reservation: from
    # sending the decode request to its `pd_reserved` event (a decode instance slower than that is
    # given up and another one tried). Prefill: from sending the prefill request to its answer, and
    # then to decode's first output (which needs the prefill's KV). The decode instance bounds its
    # own wait for the KV too (`rtpllm serve --pd-timeout-s`, default 30 s) and ends the request
    # with an error event when that passes first.
    pd_reserve_timeout_s: float = 30.0
    pd_prefill_timeout_s: float = 30.0
    # A prefill instance that fails (5xx, connection, timeout) is replaced once by another one,
    # writing into the same reservation, instead of failing the client's request; and a
    # reservation lost before any output (the prefill writing it died mid-write, so decode ended
    # it) makes the request start over once, with a new reservation and a prefill that did not fail.
    pd_retry: bool = False
    # The prefill request goes out together with the decode request, the reservation following it
    # (pd_proxy.py): the prefill computes while decode reserves. Off: one after the other.
    pd_overlap: bool = True

    policy: str = "cache_aware"
    # cache_aware cost of an instance, in prompt tokens of work ahead of the request:
    #   cache_weight * (prompt tokens it would have to compute, i.e. not cached there)
    #   + load_weight * (prompt tokens still to compute for requests already sent there
    #                    + decode_weight * requests decoding there, or other clients' requests)
    cache_weight: float = 1.0
    load_weight: float = 1.0
    decode_weight: float = 16.0
    # A prompt block an instance holds in its host (disk) tier saves its prefill too, but is copied
    # up first: it counts as this fraction of a block on the device.
    host_hit_weight: float = 0.8
    disk_hit_weight: float = 0.5
    # Hashes of a prompt just routed count as cached on its instance for this long (until its own
    # KV events confirm them), so that a burst sharing a new prefix lands together.
    predicted_ttl_s: float = 10.0

    # Lanes: prompts longer than this many tokens are "long". They go to `long_lane` instances
    # when given (short prompts then avoid those); otherwise an instance takes at most
    # `max_long_per_instance` long prefills at once and at least one instance stays free of long
    # prefills (more long prompts wait in the router), so short requests always find one.
    long_prompt_threshold: Optional[int] = 2048
    long_lane: tuple[str, ...] = ()
    max_long_per_instance: int = 1

    tokenizer: Optional[str] = None  # default: the model path the first instance reports

    health_interval_s: float = 1.0
    health_timeout_s: float = 2.0
    load_interval_s: float = 0.25
    max_retries: int = 2  # other instances tried after a 503 or connection failure before any output
    connect_timeout_s: float = 5.0

    # Access control, as `rtpllm serve`'s (serving/request_guard.py): clients need `api_key`
    # (Authorization: Bearer ...) everywhere but /health; Host headers must name the router (its
    # bind address, loopback names when bound to loopback, `allowed_hosts`; "*": any). The router
    # reaches instances with `backend_api_key`.
    api_key: Optional[str] = field(default=None, repr=False)
    backend_api_key: Optional[str] = field(default=None, repr=False)
    max_request_bytes: int = 16 << 20
    allowed_hosts: tuple[str, ...] = ()

    host: str = "127.0.0.1"
    port: int = 8100

    def __post_init__(self) -> None:
        object.__setattr__(self, "backends", tuple(_url(u, "backend") for u in self.backends))
        object.__setattr__(self, "long_lane", tuple(_url(u, "long_lane") for u in self.long_lane))
        object.__setattr__(self, "prefill", tuple(_url(u, "prefill") for u in self.prefill))
        object.__setattr__(self, "decode", tuple(_url(u, "decode") for u in self.decode))
        if self.backends and (self.prefill or self.decode):
            raise ValueError("prefill: give either colocated instances (--backend) or prefill and decode "
                             "pools (--prefill, --decode), not both")
        if self.prefill or self.decode:
            for name in ("prefill", "decode"):
                if not getattr(self, name):
                    raise ValueError(f"{name}: prefill-decode routing needs at least one {name} instance URL")
            if set(self.prefill) & set(self.decode):
                raise ValueError(f"decode: {sorted(set(self.prefill) & set(self.decode))[0]} is also a "
                                 "prefill instance (an instance has one role)")
        elif not self.backends:
            raise ValueError("backend: give at least one instance URL")
        for name in ("backends", "prefill", "decode"):
            urls = getattr(self, name)
            if len(set(urls)) != len(urls):
                raise ValueError(f"{name.rstrip('s')}: the same URL is given twice")
        routed = self.prefill if self.pd else self.backends  # the pool the policy and lanes apply to
        unknown = [u for u in self.long_lane if u not in routed]
        if unknown:
            pool = "prefill instances" if self.pd else "backends"
            raise ValueError(f"long_lane: {unknown[0]} is not one of the {pool}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy: expected one of {', '.join(POLICIES)}, got {self.policy!r}")
        for name in ("cache_weight", "load_weight", "decode_weight", "predicted_ttl_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("host_hit_weight", "disk_hit_weight"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}: must be in [0, 1], got {getattr(self, name)}")
        if self.long_prompt_threshold is not None and self.long_prompt_threshold < 1:
            raise ValueError(f"long_prompt_threshold: must be >= 1, got {self.long_prompt_threshold}")
        if self.max_long_per_instance < 1:
            raise ValueError(f"max_long_per_instance: must be >= 1, got {self.max_long_per_instance}")
        for name in ("health_interval_s", "health_timeout_s", "load_interval_s", "connect_timeout_s",
                     "pd_reserve_timeout_s", "pd_prefill_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries: must be >= 0, got {self.max_retries}")
        if self.max_request_bytes < 1:
            raise ValueError(f"max_request_bytes: must be positive, got {self.max_request_bytes}")
        if self.api_key == "":
            raise ValueError("api_key: empty")

    @property
    def pd(self) -> bool:
        """Prefill-decode disaggregation (two pools) rather than colocated instances."""
        return bool(self.prefill)

    @classmethod
    def from_env(cls, **kwargs) -> "RouterConfig":
        """As the constructor; `api_key` defaults to $RTPLLM_API_KEY."""
        if kwargs.get("api_key") is None and os.environ.get("RTPLLM_API_KEY"):
            kwargs["api_key"] = os.environ["RTPLLM_API_KEY"]
        return cls(**kwargs)

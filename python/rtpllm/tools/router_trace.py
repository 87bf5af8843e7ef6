"""The multi-tenant trace the router benchmark (bench/gpu/bench_router.py) and the routing
simulator (tools/router_sim.py) replay: the same requests reach a real pool or a model of one.

- tenant groups, each with a system prompt shared by its conversations;
- multi-turn conversations: turn k's prompt is turn k-1's prompt + a reply + a new user message,
  so its history is cached wherever turn k-1 ran;
- a share of long one-off prompts (over the router's long-prompt threshold: the long lane).
Prompts are token ids, so that their lengths are exact.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class TraceShape:
    duration_s: float
    rate: float  # requests per second (Poisson arrivals of sessions; turns included, on average)
    groups: int
    system_tokens: int
    turns: int
    user_tokens: tuple[int, int]  # new user message length range
    reply_tokens: int  # synthetic assistant reply placed into the history
    turn_gap_s: tuple[float, float]  # between a conversation's turns
    long_share: float  # of sessions
    long_tokens: tuple[int, int]
    max_tokens: int  # generated per request
    vocab: int

    def with_(self, **changes) -> "TraceShape":
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @property
    def mean_prompt_tokens(self) -> float:
        """Average prompt length per request (the trace's prefill work before any cache hit)."""
        user = sum(self.user_tokens) / 2
        turn = self.reply_tokens + user
        conversation = sum(self.system_tokens + user + k * turn for k in range(self.turns))
        long = sum(self.long_tokens) / 2
        sessions = self.long_share + (1 - self.long_share) * self.turns
        return (self.long_share * long + (1 - self.long_share) * conversation) / sessions


@dataclass
class TraceRequest:
    at_s: float
    tokens: list[int]
    kind: str  # "turn" or "long"


def build_trace(shape: TraceShape, seed: int, salt: int = 0) -> list[TraceRequest]:
    """Arrival times and lengths depend on `seed` only; token contents also on `salt` (a run with
    another salt shares no prefix with this one)."""
    timing = random.Random(seed)
    content = random.Random(seed * 7919 + salt)

    def tokens(n: int) -> list[int]:
        return [content.randrange(10, shape.vocab) for _ in range(n)]

    systems = [tokens(shape.system_tokens) for _ in range(shape.groups)]
    # Sessions (a conversation, or one long prompt) arrive as a Poisson process whose rate makes the
    # requests, turns included, arrive at `shape.rate` on average.
    per_session = shape.long_share + (1 - shape.long_share) * shape.turns
    requests: list[TraceRequest] = []
    t = 0.0
    while True:
        t += timing.expovariate(shape.rate / per_session)
        if t >= shape.duration_s:
            break
        if timing.random() < shape.long_share:
            requests.append(TraceRequest(t, tokens(timing.randint(*shape.long_tokens)), "long"))
            continue
        prompt = systems[timing.randrange(shape.groups)] + tokens(timing.randint(*shape.user_tokens))
        at = t
        for _ in range(shape.turns):
            if at >= shape.duration_s:
                break
            requests.append(TraceRequest(at, list(prompt), "turn"))
            prompt += tokens(shape.reply_tokens) + tokens(timing.randint(*shape.user_tokens))
            at += timing.uniform(*shape.turn_gap_s)
    return sorted(requests, key=lambda r: r.at_s)


# The benchmark's GPU trace (a 1B-shaped model, several instances on one H100) and a CPU-sized one.
GPU_TRACE = TraceShape(duration_s=60, rate=10.0, groups=16, system_tokens=256, turns=6, user_tokens=(200, 600),
                       reply_tokens=200, turn_gap_s=(2.0, 6.0), long_share=0.1, long_tokens=(6000, 9000),
                       max_tokens=32, vocab=128000)
CPU_TRACE = TraceShape(duration_s=10, rate=3.0, groups=3, system_tokens=64, turns=3, user_tokens=(16, 48),
                       reply_tokens=16, turn_gap_s=(0.5, 1.5), long_share=0.1, long_tokens=(300, 400),
                       max_tokens=4, vocab=1000)

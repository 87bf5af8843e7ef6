"""What the engine returns per request: the shapes vLLM users know."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

# One position's log-probabilities: token id -> logprob (the sampled token first, then the top-N).
TokenLogprobs = dict[int, float]


@dataclass(slots=True)
class CompletionOutput:
    """One of the `n` samples of a request. `text` and `token_ids` are cumulative."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: Optional[float] = None
    logprobs: Optional[list[TokenLogprobs]] = None
    finish_reason: Optional[str] = None  # "stop", "length", "abort", "error" or None while running
    stop_reason: Optional[int | str] = None  # the stop token id or stop string that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: Optional[float] = None
    first_token_time: Optional[float] = None
    last_token_time: Optional[float] = None
    finished_time: Optional[float] = None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt_logprobs: Optional[list[Optional[TokenLogprobs]]] = None
    num_cached_tokens: int = 0
    metrics: Optional[RequestMetrics] = None

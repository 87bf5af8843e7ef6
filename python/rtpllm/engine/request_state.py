"""Engine-side state of a request: its `n` sequences, their text, logprobs and finish state.

The C++ scheduler owns token ids, blocks and stop-token checks; this side owns what needs the
tokenizer (incremental text, stop strings) and what the user reads back (RequestOutput).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from rtpllm.engine.detokenizer import IncrementalDetokenizer, StopStringChecker
from rtpllm.outputs import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprobs
from rtpllm.sampling_params import SamplingParams


@dataclass
class SequenceState:
    """One of the `n` samples of a request; `seq_id` is its id in the C++ scheduler."""

    seq_id: int
    index: int
    group: "RequestGroup"
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    stop_checker: Optional[StopStringChecker]
    generator: Optional[torch.Generator]
    # Without streaming or stop strings nobody reads the text before the end: decode it once then.
    incremental: bool = True
    output_ids: list[int] = field(default_factory=list)
    text: str = ""  # all complete text so far, before stop-string truncation
    visible_text: str = ""  # what may be shown now: stop strings cut, possible stop prefixes held back
    logprobs: Optional[list[TokenLogprobs]] = None
    cumulative_logprob: float = 0.0
    finish_reason: Optional[str] = None
    stop_reason: Optional[int | str] = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append_tokens(self, token_ids: list[int], logprobs: Optional[list[TokenLogprobs]]) -> bool:
        """Adds newly sampled tokens; returns True when a stop string ended the sequence."""
        self.output_ids.extend(token_ids)
        if logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(logprobs)
            for token, entry in zip(token_ids, logprobs):
                value = entry.get(token)
                if value is not None and math.isfinite(value):
                    self.cumulative_logprob += value
        if not self.incremental:
            return False
        self.text += self.detokenizer.push(token_ids)
        if self.stop_checker is None:
            self.visible_text = self.text
            return False
        match = self.stop_checker.check(self.text)
        if match.stop_string is not None:
            self.visible_text = match.text
            self.finish("stop", match.stop_string)
            return True
        self.visible_text = self.text[:len(self.text) - match.hold_back]
        return False

    def finish(self, reason: str, stop_reason: Optional[int | str] = None) -> None:
        if self.finished:
            return
        self.finish_reason = reason
        self.stop_reason = stop_reason
        if not self.incremental:
            self.text = self.detokenizer.push(self.output_ids) + self.detokenizer.flush()
            self.visible_text = self.text
        elif reason != "stop" or not isinstance(stop_reason, str):
            self.text += self.detokenizer.flush()
            self.visible_text = self.text  # nothing is held back once the sequence is over

    def to_output(self) -> CompletionOutput:
        return CompletionOutput(
            index=self.index, text=self.visible_text, token_ids=list(self.output_ids),
            cumulative_logprob=self.cumulative_logprob if self.logprobs is not None else None,
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
            finish_reason=self.finish_reason, stop_reason=self.stop_reason)


@dataclass
class RequestGroup:
    """A user request: a prompt and its `n` sequences."""

    request_id: str
    prompt: Optional[str]
    prompt_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    stream: bool = True  # report progress every step, not only at the end
    seqs: list[SequenceState] = field(default_factory=list)
    prompt_logprobs: Optional[list[Optional[TokenLogprobs]]] = None
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(seq.finished for seq in self.seqs)

    def to_output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id, prompt=self.prompt, prompt_token_ids=self.prompt_ids,
            outputs=[seq.to_output() for seq in self.seqs], finished=self.finished,
            prompt_logprobs=self.prompt_logprobs, num_cached_tokens=self.num_cached_tokens,
            metrics=self.metrics)

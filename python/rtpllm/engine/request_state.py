"""Engine-side state of a request: its `n` sequences, their text, logprobs and finish state.

The C++ scheduler owns token ids, blocks and stop-token checks; this side owns what needs the
tokenizer (incremental text, stop strings) and what the user reads back (RequestOutput).

With streaming, every step turns every running request into a RequestOutput on the engine thread
(which shares the GIL with the server's event loop), so this is per-token work: keep it plain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from rtpllm.engine.detokenizer import IncrementalDetokenizer, StopStringChecker
from rtpllm.outputs import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprobs
from rtpllm.sampling_params import SamplingParams


@dataclass(slots=True, eq=False)
class SequenceState:
    """One of the `n` samples of a request; `seq_id` is its id in the C++ scheduler."""

    seq_id: int
    index: int
    group: "RequestGroup"
    params: SamplingParams
    detokenizer: Optional[IncrementalDetokenizer]  # None without `detokenize`
    stop_checker: Optional[StopStringChecker]
    generator: Optional[torch.Generator]
    # Without streaming or stop strings nobody reads the text before the end: decode it once then.
    incremental: bool = True
    # False: the caller decodes the streamed token ids itself (the server, for its engine process),
    # so the engine never decodes this sequence's text (it has no stop strings).
    detokenize: bool = True
    output_ids: list[int] = field(default_factory=list)
    text: str = ""  # all complete text so far, before stop-string truncation
    visible_text: str = ""  # what may be shown now: stop strings cut, possible stop prefixes held back
    logprobs: Optional[list[TokenLogprobs]] = None
    cumulative_logprob: float = 0.0
    finish_reason: Optional[str] = None
    stop_reason: Optional[int | str] = None
    # NOTE: the output of a finished sequence never changes; built once, later outputs share it.
    _final_output: Optional[CompletionOutput] = field(default=None, init=False, repr=False)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append_tokens(self, token_ids: list[int], logprobs: Optional[list[TokenLogprobs]]) -> bool:
        """Adds newly sampled tokens; returns True when a stop string ended the sequence."""
        self.output_ids += token_ids
        if logprobs is not None:
            self._append_logprobs(token_ids, logprobs)
        if not self.incremental:
            return False
        delta = self.detokenizer.push(token_ids)
        if self.stop_checker is None:
            if delta:
                self.text += delta
                self.visible_text = self.text
            return False
        self.text += delta
        match = self.stop_checker.check(self.text)
        if match.stop_string is not None:
            self.visible_text = match.text
            self.finish("stop", match.stop_string)
            return True
        self.visible_text = self.text[:len(self.text) - match.hold_back] if match.hold_back else self.text
        return False

    def _append_logprobs(self, token_ids: list[int], logprobs: list[TokenLogprobs]) -> None:
        if self.logprobs is None:
            self.logprobs = []
        self.logprobs += logprobs
        for token, entry in zip(token_ids, logprobs):
            value = entry.get(token)
            if value is not None and math.isfinite(value):
                self.cumulative_logprob += value

    def finish(self, reason: str, stop_reason: Optional[int | str] = None) -> None:
        if self.finished:
            return
        self.finish_reason = reason
        self.stop_reason = stop_reason
        if not self.detokenize:
            return
        if not self.incremental:
            self.text = self.detokenizer.push(self.output_ids) + self.detokenizer.flush()
            self.visible_text = self.text
        elif reason != "stop" or not isinstance(stop_reason, str):
            self.text += self.detokenizer.flush()
            self.visible_text = self.text  # nothing is held back once the sequence is over

    def to_output(self) -> CompletionOutput:
        """A snapshot: its lists are copies, so later tokens do not change an output handed out."""
        if self._final_output is not None:
            return self._final_output
        logprobs = self.logprobs
        # Positional: this runs for every sequence at every step of a stream.
        output = CompletionOutput(self.index, self.visible_text, self.output_ids[:],
                                  None if logprobs is None else self.cumulative_logprob,
                                  None if logprobs is None else logprobs[:], self.finish_reason, self.stop_reason)
        if self.finish_reason is not None:
            self._final_output = output
        return output


@dataclass(slots=True, eq=False)
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
        for seq in self.seqs:
            if seq.finish_reason is None:
                return False
        return True

    def to_output(self) -> RequestOutput:
        seqs = self.seqs
        if len(seqs) == 1:
            output = seqs[0].to_output()
            outputs, finished = [output], output.finish_reason is not None
        else:
            outputs = [seq.to_output() for seq in seqs]
            finished = self.finished
        return RequestOutput(self.request_id, self.prompt, self.prompt_ids, outputs, finished, self.prompt_logprobs,
                             self.num_cached_tokens, self.metrics)

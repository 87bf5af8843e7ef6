"""Request outputs as deltas, for an engine in another process.

`RequestOutput`s are cumulative: every step repeats each request's whole text, token ids and
logprobs. Sent as they are, a request of n tokens would cost O(n^2) bytes over its life. The
engine side (`OutputDeltaEncoder`) sends only what changed since the request's previous output,
read off the engine's request state; the server side (`OutputDeltaDecoder`) rebuilds the
cumulative outputs, equal to the engine's own (`RequestGroup.to_output()`).

For requests registered with `decode_text_of` (streams without stop strings), the engine sends
token ids only and the decoder turns them into text, with the same incremental detokenizer the
engine would have run: that per-token work then happens beside the server's event loop instead of
inside the engine's step loop (as vLLM's front-end process detokenizes for its engine core).

A delta is a plain tuple (cheap to pickle):
    (request_id, header, completions, prompt_logprobs, num_cached_tokens, finished, metrics)
    header: (prompt, prompt_token_ids) in a request's first delta, else None
    completions: per sample (index, text_keep, text_piece, new_token_ids, cumulative_logprob,
                 new_logprobs, finish_reason, stop_reason); the text is text[:text_keep] + piece
                 (text only grows, except where a stop string cuts it), token ids and logprobs only grow
    prompt_logprobs: (keep, new entries) or None
    metrics: the RequestMetrics fields as a tuple, or None
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from rtpllm.engine.detokenizer import IncrementalDetokenizer
from rtpllm.outputs import CompletionOutput, RequestMetrics, RequestOutput

if TYPE_CHECKING:
    from rtpllm.engine.request_state import RequestGroup

Delta = tuple


class _Sent:
    """What the decoder already holds of one request."""

    __slots__ = ("samples", "prompt_logprobs")

    def __init__(self) -> None:
        self.samples: dict[int, tuple[int, int, str]] = {}  # index -> (token ids, logprobs, text)
        self.prompt_logprobs = 0


class OutputDeltaEncoder:
    """Engine side: turns the requests a step moved (`Engine.step_groups()`) into deltas, reading
    their live state: the output the decoder rebuilds is `group.to_output()` at encode time, but
    no cumulative RequestOutput (and no copy of its lists) is built per request and step."""

    def __init__(self) -> None:
        self._sent: dict[str, _Sent] = {}

    def encode(self, groups: list["RequestGroup"]) -> list[Delta]:
        deltas = []
        for group in groups:
            sent = self._sent.get(group.request_id)
            header = None
            if sent is None:
                sent = self._sent[group.request_id] = _Sent()
                header = (group.prompt, group.prompt_ids)
            completions = []
            finished = True
            for seq in group.seqs:
                num_ids, num_logprobs, text = sent.samples.get(seq.index, (0, 0, ""))
                new_text = seq.visible_text
                keep = len(text) if new_text.startswith(text) else 0
                ids = seq.output_ids
                logprobs = seq.logprobs
                completions.append((seq.index, keep, new_text[keep:], ids[num_ids:],
                                    None if logprobs is None else seq.cumulative_logprob,
                                    None if logprobs is None else logprobs[num_logprobs:],
                                    seq.finish_reason, seq.stop_reason))
                sent.samples[seq.index] = (len(ids), 0 if logprobs is None else len(logprobs), new_text)
                finished = finished and seq.finish_reason is not None
            prompt_logprobs = None
            if group.prompt_logprobs is not None:
                prompt_logprobs = (sent.prompt_logprobs, group.prompt_logprobs[sent.prompt_logprobs:])
                sent.prompt_logprobs = len(group.prompt_logprobs)
            metrics = group.metrics
            deltas.append((group.request_id, header, completions, prompt_logprobs, group.num_cached_tokens,
                           finished,
                           None if metrics is None else (metrics.arrival_time, metrics.first_scheduled_time,
                                                         metrics.first_token_time, metrics.last_token_time,
                                                         metrics.finished_time)))
            if finished:
                del self._sent[group.request_id]
        return deltas


class _Mirror:
    __slots__ = ("prompt", "prompt_token_ids", "samples", "prompt_logprobs", "detokenizers", "skip_special_tokens")

    def __init__(self, prompt: Optional[str], prompt_token_ids: list[int],
                 skip_special_tokens: Optional[bool]) -> None:
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.samples: dict[int, CompletionOutput] = {}
        self.prompt_logprobs: Optional[list] = None
        # Set when this side decodes the text: one detokenizer per sample, made on its first tokens.
        self.skip_special_tokens = skip_special_tokens
        self.detokenizers: dict[int, IncrementalDetokenizer] = {}


class OutputDeltaDecoder:
    """Server side: rebuilds cumulative outputs. Outputs already handed out are never changed
    (every output gets its own lists, as the engine's own outputs do). `tokenizer` decodes the
    text of the requests registered with `decode_text_of`."""

    def __init__(self, tokenizer: Any = None) -> None:
        self._tokenizer = tokenizer
        self._requests: dict[str, _Mirror] = {}
        self._decode_here: dict[str, bool] = {}  # request id -> skip_special_tokens, until its first delta

    def decode_text_of(self, request_id: str, skip_special_tokens: bool) -> None:
        """The engine will send this request's token ids without text: decode them here."""
        if self._tokenizer is None:
            raise ValueError("tokenizer: needed to decode a request's text on this side")
        self._decode_here[request_id] = skip_special_tokens

    def forget(self, request_id: str) -> None:
        """The request never started (the engine refused it)."""
        self._decode_here.pop(request_id, None)

    def _text(self, mirror: _Mirror, index: int, previous: Optional[CompletionOutput], keep: int, piece: str,
              new_ids: list[int], finish_reason: Optional[str]) -> str:
        if mirror.skip_special_tokens is None:  # the engine's own text
            if previous is None:
                return piece
            text = previous.text
            return (text if keep == len(text) else text[:keep]) + piece
        detokenizer = mirror.detokenizers.get(index)
        if detokenizer is None:
            detokenizer = mirror.detokenizers[index] = IncrementalDetokenizer(
                self._tokenizer, mirror.prompt_token_ids, mirror.skip_special_tokens)
        text = ("" if previous is None else previous.text) + detokenizer.push(new_ids)
        if finish_reason is not None and (previous is None or previous.finish_reason is None):
            text += detokenizer.flush()
        return text

    def decode(self, deltas: list[Delta]) -> list[RequestOutput]:
        outputs = []
        for request_id, header, completions, prompt_logprobs, num_cached, finished, metrics in deltas:
            if header is not None:
                mirror = self._requests[request_id] = _Mirror(*header, self._decode_here.pop(request_id, None))
            else:
                mirror = self._requests[request_id]
            samples = []
            for index, keep, piece, new_ids, cumulative, new_logprobs, finish_reason, stop_reason in completions:
                previous = mirror.samples.get(index)
                if previous is None:
                    sample = CompletionOutput(index, self._text(mirror, index, None, keep, piece, new_ids,
                                                                finish_reason),
                                              new_ids, cumulative, new_logprobs, finish_reason, stop_reason)
                else:
                    text = previous.text
                    if not piece and keep == len(text) and not new_ids and finish_reason == previous.finish_reason:
                        samples.append(previous)  # unchanged (e.g. a finished sample beside running ones)
                        continue
                    logprobs = previous.logprobs
                    if new_logprobs is not None:
                        logprobs = (logprobs or []) + new_logprobs
                    sample = CompletionOutput(index, self._text(mirror, index, previous, keep, piece, new_ids,
                                                                finish_reason),
                                              previous.token_ids + new_ids, cumulative, logprobs, finish_reason,
                                              stop_reason)
                mirror.samples[index] = sample
                samples.append(sample)
            if prompt_logprobs is not None:
                keep, new_entries = prompt_logprobs
                mirror.prompt_logprobs = (mirror.prompt_logprobs or [])[:keep] + new_entries
            outputs.append(RequestOutput(request_id, mirror.prompt, mirror.prompt_token_ids, samples, finished,
                                         mirror.prompt_logprobs, num_cached,
                                         None if metrics is None else RequestMetrics(*metrics)))
            if finished:
                del self._requests[request_id]
        return outputs

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

The deltas of one step travel as one `OutputDeltas` message (link/messages.py: its fields say
what each column holds).
"""

from __future__ import annotations

from itertools import islice
from typing import TYPE_CHECKING, Any, Optional

from rtpllm.engine.detokenizer import IncrementalDetokenizer
from rtpllm.engine.link.messages import MalformedMessage, OutputDeltas, PromptHeader, PromptLogprobsDelta
from rtpllm.outputs import CompletionOutput, RequestMetrics, RequestOutput

if TYPE_CHECKING:
    from rtpllm.engine.request_state import RequestGroup


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

    def encode(self, groups: list["RequestGroup"]) -> OutputDeltas:
        deltas = OutputDeltas.empty()
        # NOTE: per-token work: the columns' appends are bound once per step.
        add_request_id, add_num_samples = deltas.request_ids.append, deltas.num_samples.append
        add_num_cached, add_finished = deltas.num_cached_tokens.append, deltas.finished.append
        add_arrival, add_scheduled = deltas.arrival_time.append, deltas.first_scheduled_time.append
        add_first_token, add_last_token = deltas.first_token_time.append, deltas.last_token_time.append
        add_finished_time = deltas.finished_time.append
        add_index, add_keep, add_piece = deltas.sample_index.append, deltas.text_keep.append, deltas.text_piece.append
        add_ids, add_cumulative = deltas.new_token_ids.append, deltas.cumulative_logprob.append
        add_logprobs, add_finish = deltas.new_logprobs.append, deltas.finish_reason.append
        add_stop = deltas.stop_reason.append
        for group in groups:
            sent = self._sent.get(group.request_id)
            if sent is None:
                sent = self._sent[group.request_id] = _Sent()
                deltas.headers[group.request_id] = PromptHeader(group.prompt, group.prompt_ids)
            finished = True
            for seq in group.seqs:
                num_ids, num_logprobs, text = sent.samples.get(seq.index, (0, 0, ""))
                new_text = seq.visible_text
                keep = len(text) if new_text.startswith(text) else 0
                ids = seq.output_ids
                logprobs = seq.logprobs
                add_index(seq.index)
                add_keep(keep)
                add_piece(new_text[keep:])
                add_ids(ids[num_ids:])
                if logprobs is None:
                    add_cumulative(None)
                    add_logprobs(None)
                else:
                    add_cumulative(seq.cumulative_logprob)
                    add_logprobs(logprobs[num_logprobs:])
                add_finish(seq.finish_reason)
                add_stop(seq.stop_reason)
                sent.samples[seq.index] = (len(ids), 0 if logprobs is None else len(logprobs), new_text)
                finished = finished and seq.finish_reason is not None
            if group.prompt_logprobs is not None:
                deltas.prompt_logprobs[group.request_id] = PromptLogprobsDelta(
                    sent.prompt_logprobs, group.prompt_logprobs[sent.prompt_logprobs:])
                sent.prompt_logprobs = len(group.prompt_logprobs)
            metrics = group.metrics
            add_request_id(group.request_id)
            add_num_samples(len(group.seqs))
            add_num_cached(group.num_cached_tokens)
            add_finished(finished)
            add_arrival(metrics.arrival_time)
            add_scheduled(metrics.first_scheduled_time)
            add_first_token(metrics.first_token_time)
            add_last_token(metrics.last_token_time)
            add_finished_time(metrics.finished_time)
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

    def decode(self, deltas: OutputDeltas) -> list[RequestOutput]:
        """The cumulative outputs. MalformedMessage naming the column when a column is not a list
        of the right length (the requests before it are decoded then: the caller gives up the link)."""
        try:
            return self._decode(deltas)
        except (TypeError, ValueError):
            deltas.check()  # names the bad column, if a column is what was bad
            raise

    def _decode(self, deltas: OutputDeltas) -> list[RequestOutput]:
        if sum(deltas.num_samples) != len(deltas.sample_index):
            deltas.check()
        outputs = []
        headers, prompt_logprobs = deltas.headers, deltas.prompt_logprobs
        samples_in = zip(deltas.sample_index, deltas.text_keep, deltas.text_piece, deltas.new_token_ids,
                         deltas.cumulative_logprob, deltas.new_logprobs, deltas.finish_reason, deltas.stop_reason,
                         strict=True)
        requests_in = zip(deltas.request_ids, deltas.num_samples, deltas.num_cached_tokens, deltas.finished,
                          deltas.arrival_time, deltas.first_scheduled_time, deltas.first_token_time,
                          deltas.last_token_time, deltas.finished_time, strict=True)
        for request_id, num_samples, num_cached, finished, arrival, scheduled, first_token, last_token, finished_time \
                in requests_in:
            if headers and request_id in headers:
                header = headers[request_id]
                mirror = self._requests[request_id] = _Mirror(header.prompt, header.prompt_token_ids,
                                                              self._decode_here.pop(request_id, None))
            else:
                mirror = self._requests.get(request_id)
                if mirror is None:
                    raise MalformedMessage(f"OutputDeltas.request_ids: {request_id!r} has no header and is not running")
            samples = []
            rows = (next(samples_in),) if num_samples == 1 else islice(samples_in, num_samples)
            for index, keep, piece, new_ids, cumulative, new_logprobs, finish_reason, stop_reason in rows:
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
            if prompt_logprobs and request_id in prompt_logprobs:
                grown = prompt_logprobs[request_id]
                mirror.prompt_logprobs = (mirror.prompt_logprobs or [])[:grown.keep] + grown.entries
            outputs.append(RequestOutput(request_id, mirror.prompt, mirror.prompt_token_ids, samples, finished,
                                         mirror.prompt_logprobs, num_cached,
                                         RequestMetrics(arrival, scheduled, first_token, last_token, finished_time)))
            if finished:
                del self._requests[request_id]
        return outputs

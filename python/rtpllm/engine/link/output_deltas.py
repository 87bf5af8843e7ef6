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
what each holds): per step only new token ids and last token times are columns; texts the engine
decoded, logprobs, finishes, times that changed and first-delta headers are sparse.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from rtpllm.engine.detokenizer import IncrementalDetokenizer
from rtpllm.engine.link.messages import MalformedMessage, OutputDeltas, PromptHeader, PromptLogprobsDelta, RequestTimes
from rtpllm.outputs import CompletionOutput, RequestMetrics, RequestOutput

if TYPE_CHECKING:
    from rtpllm.engine.request_state import RequestGroup


_NOTHING_SENT = (0, 0, "", False)


class _Sent:
    """What the decoder already holds of one request."""

    __slots__ = ("samples", "prompt_logprobs", "times")

    def __init__(self) -> None:
        # index -> (token ids, logprobs, text, finished)
        self.samples: dict[int, tuple[int, int, str, bool]] = {}
        self.prompt_logprobs = 0
        self.times: Optional[tuple] = None  # the RequestTimes values sent last


class OutputDeltaEncoder:
    """Engine side: turns the requests a step moved (`Engine.step_groups()`) into deltas, reading
    their live state: the output the decoder rebuilds is `group.to_output()` at encode time, but
    no cumulative RequestOutput (and no copy of its lists) is built per request and step."""

    def __init__(self) -> None:
        self._sent: dict[str, _Sent] = {}

    def encode(self, groups: list["RequestGroup"]) -> OutputDeltas:
        request_ids, last_token_times, new_token_ids = [], [], []
        headers = times = prompt_logprobs = texts = logprobs_out = finishes = None
        add_ids = new_token_ids.append  # NOTE: per-token work: bound once per step
        for group in groups:
            request_id = group.request_id
            sent = self._sent.get(request_id)
            if sent is None:
                sent = self._sent[request_id] = _Sent()
                if headers is None:
                    headers = {}
                headers[request_id] = PromptHeader(group.prompt, group.prompt_ids, len(group.seqs))
            metrics = group.metrics
            now = (metrics.arrival_time, metrics.first_scheduled_time, metrics.first_token_time, metrics.finished_time,
                   group.num_cached_tokens)
            if now != sent.times:
                if times is None:
                    times = {}
                times[request_id] = RequestTimes(*now)
                sent.times = now
            finished = True
            for seq in group.seqs:
                position = len(new_token_ids)
                num_ids, num_logprobs, text, was_finished = sent.samples.get(seq.index, _NOTHING_SENT)
                ids = seq.output_ids
                add_ids(ids[num_ids:])
                new_text = seq.visible_text
                if new_text is not text and new_text != text:
                    keep = len(text) if new_text.startswith(text) else 0
                    if texts is None:
                        texts = {}
                    texts[position] = (keep, new_text[keep:])
                logprobs = seq.logprobs
                if logprobs is not None:
                    if logprobs_out is None:
                        logprobs_out = {}
                    logprobs_out[position] = (seq.cumulative_logprob, logprobs[num_logprobs:])
                is_finished = seq.finish_reason is not None
                if is_finished and not was_finished:
                    if finishes is None:
                        finishes = {}
                    finishes[position] = (seq.finish_reason, seq.stop_reason)
                sent.samples[seq.index] = (len(ids), 0 if logprobs is None else len(logprobs), new_text, is_finished)
                finished = finished and is_finished
            if group.prompt_logprobs is not None:
                if prompt_logprobs is None:
                    prompt_logprobs = {}
                prompt_logprobs[request_id] = PromptLogprobsDelta(sent.prompt_logprobs,
                                                                  group.prompt_logprobs[sent.prompt_logprobs:])
                sent.prompt_logprobs = len(group.prompt_logprobs)
            request_ids.append(request_id)
            last_token_times.append(metrics.last_token_time)
            if finished:
                del self._sent[request_id]
        return OutputDeltas(request_ids, last_token_times, new_token_ids, headers, times, prompt_logprobs, texts,
                            logprobs_out, finishes)


class _Mirror:
    __slots__ = ("prompt", "prompt_token_ids", "num_samples", "times", "samples", "prompt_logprobs", "detokenizers",
                 "skip_special_tokens")

    def __init__(self, header: PromptHeader, times: RequestTimes, skip_special_tokens: Optional[bool]) -> None:
        self.prompt = header.prompt
        self.prompt_token_ids = header.prompt_token_ids
        self.num_samples = header.num_samples
        self.times = times
        self.samples: list[Optional[CompletionOutput]] = [None] * header.num_samples
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

    def _text(self, mirror: _Mirror, index: int, previous: Optional[CompletionOutput], text_delta: Optional[tuple],
              new_ids: list[int], finish_reason: Optional[str]) -> str:
        text = "" if previous is None else previous.text
        if mirror.skip_special_tokens is None:  # the engine's own text
            if text_delta is None:
                return text
            keep, piece = text_delta
            return (text if keep == len(text) else text[:keep]) + piece
        detokenizer = mirror.detokenizers.get(index)
        if detokenizer is None:
            detokenizer = mirror.detokenizers[index] = IncrementalDetokenizer(
                self._tokenizer, mirror.prompt_token_ids, mirror.skip_special_tokens)
        text += detokenizer.push(new_ids)
        if finish_reason is not None and (previous is None or previous.finish_reason is None):
            text += detokenizer.flush()
        return text

    def decode(self, deltas: OutputDeltas) -> list[RequestOutput]:
        """The cumulative outputs. MalformedMessage naming the field when the deltas do not fit
        (the requests before it are decoded then: the caller gives up the link)."""
        try:
            return self._decode(deltas)
        except MalformedMessage:
            raise
        except (TypeError, ValueError, IndexError, AttributeError, KeyError) as exc:
            deltas.check()  # names the bad field, if a field's kind or length is what was bad
            if isinstance(exc, IndexError):
                raise MalformedMessage("OutputDeltas.new_token_ids: fewer entries than the requests' samples") from exc
            raise MalformedMessage(f"OutputDeltas: cannot be decoded ({type(exc).__name__}: {exc})") from exc

    def _decode(self, deltas: OutputDeltas) -> list[RequestOutput]:
        outputs = []
        headers, times, prompt_logprobs = deltas.headers, deltas.times, deltas.prompt_logprobs
        texts, logprobs, finishes = deltas.texts, deltas.logprobs, deltas.finishes
        new_token_ids = deltas.new_token_ids
        position = 0
        for request_id, last_token_time in zip(deltas.request_ids, deltas.last_token_time, strict=True):
            if headers and request_id in headers:
                if not times or request_id not in times:
                    raise MalformedMessage(f"OutputDeltas.times: the new request {request_id!r} has none")
                mirror = self._requests[request_id] = _Mirror(headers[request_id], times[request_id],
                                                              self._decode_here.pop(request_id, None))
            else:
                mirror = self._requests.get(request_id)
                if mirror is None:
                    raise MalformedMessage(f"OutputDeltas.request_ids: {request_id!r} has no header and is not running")
                if times and request_id in times:
                    mirror.times = times[request_id]
            samples, finished = [], True
            previous_samples = mirror.samples
            for index in range(mirror.num_samples):
                new_ids = new_token_ids[position]
                text_delta = texts.get(position) if texts else None
                logprob_delta = logprobs.get(position) if logprobs else None
                finish = finishes.get(position) if finishes else None
                position += 1
                previous = previous_samples[index]
                if previous is None:
                    finish_reason, stop_reason = finish or (None, None)
                    cumulative, new_logprobs = logprob_delta or (None, None)
                    sample = CompletionOutput(index, self._text(mirror, index, None, text_delta, new_ids, finish_reason),
                                              new_ids, cumulative, new_logprobs, finish_reason, stop_reason)
                elif not new_ids and text_delta is None and logprob_delta is None and finish is None:
                    samples.append(previous)  # unchanged (e.g. a finished sample beside running ones)
                    finished = finished and previous.finish_reason is not None
                    continue
                else:
                    if finish is None:
                        finish_reason, stop_reason = previous.finish_reason, previous.stop_reason
                    else:
                        finish_reason, stop_reason = finish
                    cumulative, all_logprobs = previous.cumulative_logprob, previous.logprobs
                    if logprob_delta is not None:
                        cumulative, new_logprobs = logprob_delta
                        all_logprobs = (all_logprobs or []) + new_logprobs
                    if text_delta is None and mirror.skip_special_tokens is None:
                        text = previous.text  # the engine decodes, and the text did not change
                    else:
                        text = self._text(mirror, index, previous, text_delta, new_ids, finish_reason)
                    sample = CompletionOutput(index, text, previous.token_ids + new_ids, cumulative, all_logprobs,
                                              finish_reason, stop_reason)
                previous_samples[index] = sample
                samples.append(sample)
                finished = finished and sample.finish_reason is not None
            if prompt_logprobs and request_id in prompt_logprobs:
                grown = prompt_logprobs[request_id]
                mirror.prompt_logprobs = (mirror.prompt_logprobs or [])[:grown.keep] + grown.entries
            at = mirror.times
            outputs.append(RequestOutput(request_id, mirror.prompt, mirror.prompt_token_ids, samples, finished,
                                         mirror.prompt_logprobs, at.num_cached_tokens,
                                         RequestMetrics(at.arrival_time, at.first_scheduled_time, at.first_token_time,
                                                        last_token_time, at.finished_time)))
            if finished:
                del self._requests[request_id]
        if position != len(new_token_ids):
            raise MalformedMessage(f"OutputDeltas.new_token_ids: {len(new_token_ids)} entries for {position} samples")
        return outputs

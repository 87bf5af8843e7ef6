"""The offline API and the engine's request handling: outputs, sampling options, bad input, no leaks."""

import pytest

from checkpoints import checkpoint_path
from rtpllm import LLM, SamplingParams
from rtpllm.engine.detokenizer import IncrementalDetokenizer, StopStringChecker
from rtpllm.engine.request_state import RequestGroup, SequenceState
from rtpllm.outputs import RequestMetrics


@pytest.fixture(scope="module")
def llm():
    return LLM(model=checkpoint_path("llama3"), num_blocks=96, block_size=8, max_model_len=256)


def _stream_texts(engine, request_id, prompt, params):
    engine.add_request(request_id, prompt, params, stream=True)
    seen = []
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == request_id
            seen.append(out.outputs[0].text)
            final = out
    return seen, final


def test_streamed_text_grows_and_equals_the_offline_text(llm):
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    offline = llm.generate(["the quick brown fox"], params)[0].outputs[0]
    seen, final = _stream_texts(llm.engine, "streamed", "the quick brown fox", params)
    assert all(later.startswith(earlier) for earlier, later in zip(seen, seen[1:]))
    assert final.finished and final.outputs[0].text == offline.text
    assert final.outputs[0].token_ids == offline.token_ids
    assert offline.text == llm.get_tokenizer().decode(offline.token_ids, skip_special_tokens=True)
    assert offline.finish_reason == "length" and len(offline.token_ids) == 24


def test_stop_string_cuts_the_text_and_finishes_with_stop(llm):
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    full = llm.generate(["hello world"], params)[0].outputs[0].text
    stop = full[5:8]
    assert stop and stop not in full[:5], "the test needs a stop string that first occurs at 5"
    out = llm.generate(["hello world"], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                                                       stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full[:5]
    assert llm.engine.check_kv_pool_free()


def test_stop_token_id_finishes_with_that_token(llm):
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    tokens = llm.generate(["hello world"], params)[0].outputs[0].token_ids
    stop_id = tokens[3]
    out = llm.generate(["hello world"], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                                                       stop_token_ids=[stop_id]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    assert out.token_ids == tokens[:tokens.index(stop_id) + 1]


def test_seeded_sampling_is_reproducible_and_n_samples_differ(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=1234, n=3, ignore_eos=True)
    first = llm.generate(["a seeded prompt"], params)[0]
    # The same request again, now sharing the batch with an unseeded one: same tokens.
    again = llm.generate(["a seeded prompt", "another prompt"],
                         [params, SamplingParams(temperature=1.0, max_tokens=16)])[0]
    assert [o.token_ids for o in first.outputs] == [o.token_ids for o in again.outputs]
    assert len({tuple(o.token_ids) for o in first.outputs}) > 1, "the n samples are distinct streams"
    assert [o.index for o in first.outputs] == [0, 1, 2]


def test_token_id_prompts_and_logprobs(llm):
    out = llm.generate([[5, 6, 7, 8]], SamplingParams(temperature=0.0, max_tokens=4, logprobs=3))[0]
    assert out.prompt_token_ids == [5, 6, 7, 8] and out.prompt is None
    completion = out.outputs[0]
    assert len(completion.logprobs) == len(completion.token_ids)
    for token, entry in zip(completion.token_ids, completion.logprobs):
        assert token in entry and len(entry) >= 3
        assert entry[token] == max(entry.values()), "greedy picks the most likely token"


def test_chat_uses_the_template(llm):
    messages = [{"role": "user", "content": "hi there"}]
    out = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=4))[0]
    rendered = llm.get_tokenizer().apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert out.prompt_token_ids == llm.get_tokenizer().encode(rendered, add_special_tokens=False)


@pytest.mark.parametrize("prompt, field", [
    ("", "prompt"), ([], "prompt"), ([10**6], "prompt"), ("x" * 2000, "prompt"), (3.5, "prompt"),
])
def test_bad_prompts_raise_and_leave_the_engine_clean(llm, prompt, field):
    with pytest.raises(ValueError, match=field):
        llm.generate([prompt], SamplingParams(max_tokens=4))
    assert llm.engine.check_kv_pool_free()
    assert not llm.engine.has_unfinished_requests()
    # The engine still serves.
    assert llm.generate(["still alive"], SamplingParams(max_tokens=2))[0].outputs[0].token_ids


def test_a_bad_prompt_in_a_batch_adds_none_of_it(llm):
    with pytest.raises(ValueError, match="prompt"):
        llm.generate(["fine", ""], SamplingParams(max_tokens=4))
    assert llm.engine.check_kv_pool_free() and not llm.engine.has_unfinished_requests()


def test_a_batch_larger_than_one_slice_joins_in_slices(llm):
    """`generate` adds a long batch a slice at a time between steps: every request still comes
    back, in order; a bad prompt in a later slice raises and leaves nothing running."""
    prompts = [f"prompt number {i}" for i in range(300)]
    outputs = llm.generate(prompts, SamplingParams(max_tokens=2, ignore_eos=True))
    assert [o.prompt for o in outputs] == prompts and all(len(o.outputs[0].token_ids) == 2 for o in outputs)
    with pytest.raises(ValueError, match="prompt"):
        llm.generate(prompts[:280] + [""], SamplingParams(max_tokens=2))
    assert llm.engine.check_kv_pool_free() and not llm.engine.has_unfinished_requests()


def test_abort_frees_blocks_and_reports_abort(llm):
    engine = llm.engine
    engine.add_request("to-abort", "some prompt that runs", SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    engine.abort_request("to-abort")
    outputs = engine.step()
    assert [o.outputs[0].finish_reason for o in outputs] == ["abort"]
    assert engine.check_kv_pool_free() and not engine.has_unfinished_requests()


def test_streamed_outputs_are_snapshots_that_later_steps_leave_alone(llm):
    engine = llm.engine
    params = SamplingParams(temperature=1.0, max_tokens=12, seed=7, n=2, logprobs=2, ignore_eos=True)
    engine.add_request("snapshots", "a prompt to stream", params, stream=True)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    final = outputs[-1]
    assert final.finished and not any(o.finished for o in outputs[:-1])
    for step, output in enumerate(outputs, start=1):
        for completion, last in zip(output.outputs, final.outputs):
            # Each output still holds what it held when it was handed out: its step's tokens.
            assert completion.token_ids == last.token_ids[:step]
            assert completion.logprobs == last.logprobs[:step]
            assert last.text.startswith(completion.text)
    assert engine.check_kv_pool_free()


def _group_of(tokenizer, n: int, stop: list[str]):
    params = SamplingParams(n=n, stop=stop)
    group = RequestGroup(request_id="r", prompt=None, prompt_ids=[5, 6], params=params,
                         metrics=RequestMetrics(arrival_time=0.0))
    for index in range(n):
        group.seqs.append(SequenceState(
            seq_id=index, index=index, group=group, params=params,
            detokenizer=IncrementalDetokenizer(tokenizer, group.prompt_ids),
            stop_checker=StopStringChecker(stop) if stop else None, generator=None))
    return group


def test_a_sample_that_finished_early_reports_the_same_output_until_the_request_ends(llm):
    tokenizer = llm.get_tokenizer()
    texts = [" one two three four five", " six seven eight nine ten"]
    ids = [tokenizer.encode(text, add_special_tokens=False) for text in texts]
    steps = min(len(i) for i in ids)
    group = _group_of(tokenizer, n=2, stop=[" two"])
    first, second = group.seqs
    seen = []
    for step in range(steps):
        for seq, tokens in zip(group.seqs, ids):
            if not seq.finished:
                seq.append_tokens(tokens[step:step + 1], None)
        seen.append(group.to_output())
    assert first.finish_reason == "stop" and first.stop_reason == " two" and not group.finished
    second.finish("length")
    end = group.to_output()
    assert group.finished and end.finished and not any(o.finished for o in seen)
    assert [o.text for o in end.outputs] == [" one", tokenizer.decode(ids[1][:steps])]
    stopped_at = next(step for step, o in enumerate(seen) if o.outputs[0].finished)
    assert all(o.outputs[0] == end.outputs[0] for o in seen[stopped_at:])
    assert [len(o.outputs[1].token_ids) for o in seen] == list(range(1, steps + 1))


def test_max_model_len_above_the_model_is_rejected():
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(model=checkpoint_path("llama3"), num_blocks=8, max_model_len=10**6)


def test_missing_model_folder_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        LLM(model=str(tmp_path / "does-not-exist"), num_blocks=8)

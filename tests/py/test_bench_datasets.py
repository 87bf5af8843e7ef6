"""Benchmark datasets: ShareGPT read record by record (truncated files included), exact random
lengths, shared prefixes that really are shared, multi-turn conversations."""

import json

import pytest

from checkpoints import tokenizer_for
from rtpllm.benchmarks.datasets import (iter_records, sample_multi_turn, sample_random, sample_shared_prefix,
                                        sample_sharegpt, token_count)
from rtpllm.benchmarks.datasets.sharegpt import default_sharegpt_path


@pytest.fixture(scope="module")
def tokenizer():
    return tokenizer_for(add_bos=True)


def _conversation(i: int, turns: int = 1) -> dict:
    messages = []
    for t in range(turns):
        messages.append({"from": "human", "value": f"Question {i}.{t}: please explain topic number {i} in depth"})
        messages.append({"from": "gpt", "value": f"Answer {i}.{t}: " + "details and more details " * (3 + i % 5)})
    return {"id": f"c{i}", "conversations": messages}


def _write_sharegpt(path, records, cut_tail: int = 0) -> None:
    text = json.dumps(records, indent=2)
    path.write_text(text[:len(text) - cut_tail] if cut_tail else text)


def test_truncated_file_yields_every_complete_record(tmp_path):
    records = [_conversation(i) for i in range(40)]
    path = tmp_path / "cut.json"
    _write_sharegpt(path, records, cut_tail=120)  # the last record loses its end
    # A tiny chunk size forces records to straddle chunk boundaries.
    assert list(iter_records(path, chunk_chars=64)) == records[:-1]


def test_whole_file_reads_to_the_closing_bracket(tmp_path):
    records = [_conversation(i) for i in range(5)]
    path = tmp_path / "whole.json"
    _write_sharegpt(path, records)
    assert list(iter_records(path, chunk_chars=50)) == records


def test_non_array_file_is_rejected(tmp_path):
    path = tmp_path / "object.json"
    path.write_text('{"conversations": []}')
    with pytest.raises(ValueError, match="dataset-path"):
        list(iter_records(path))


def test_installed_sharegpt_package_is_readable():
    first = next(iter_records(default_sharegpt_path()))
    assert first["conversations"][0]["from"] == "human"


def test_sharegpt_sampling_filters_and_measures_lengths(tmp_path, tokenizer):
    records = [_conversation(i) for i in range(30)]
    records.append({"id": "short", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]})
    records.append({"id": "gpt-first", "conversations": [{"from": "gpt", "value": "x" * 50}]})
    path = tmp_path / "data.json"
    _write_sharegpt(path, records)
    requests = sample_sharegpt(tokenizer, 20, path, seed=3)
    assert len(requests) == 20
    assert all(r.prompt.startswith("Question") for r in requests)  # "hi"/"yo" is under 4 tokens
    for r in requests:
        assert r.prompt_len == token_count(tokenizer, r.prompt) and r.expected_output_len >= 4
    assert [r.prompt for r in sample_sharegpt(tokenizer, 20, path, seed=3)] == [r.prompt for r in requests]
    assert [r.prompt for r in sample_sharegpt(tokenizer, 20, path, seed=4)] != [r.prompt for r in requests]
    fixed = sample_sharegpt(tokenizer, 5, path, output_len=7)
    assert {r.expected_output_len for r in fixed} == {7}
    with pytest.raises(ValueError, match="num-prompts"):
        sample_sharegpt(tokenizer, 100, path)


def test_random_prompts_have_exact_token_lengths(tokenizer):
    requests = sample_random(tokenizer, 20, input_len=40, output_len=16, range_ratio=0.5, seed=1)
    for r in requests:
        assert 20 <= r.prompt_len <= 60 and 8 <= r.expected_output_len <= 24
        assert token_count(tokenizer, r.prompt) == r.prompt_len
    assert len({r.prompt_len for r in requests}) > 1
    single = sample_random(tokenizer, 10, input_len=1, output_len=1)
    assert all(token_count(tokenizer, r.prompt) == 1 for r in single)
    with pytest.raises(ValueError, match="random-range-ratio"):
        sample_random(tokenizer, 1, 10, 10, range_ratio=1.5)


def test_random_prefix_is_shared_by_every_prompt(tokenizer):
    requests = sample_random(tokenizer, 6, input_len=10, output_len=4, prefix_len=30, seed=2)
    common = requests[0].prompt
    for r in requests[1:]:
        while not r.prompt.startswith(common):
            common = common[:-1]
    assert token_count(tokenizer, common) >= 25


def test_shared_prefix_groups(tokenizer):
    requests = sample_shared_prefix(tokenizer, num_groups=3, prompts_per_group=4, prefix_len=50, suffix_len=8,
                                    output_len=5, seed=0)
    assert len(requests) == 12 and {r.expected_output_len for r in requests} == {5}
    prefixes = {}
    for r in requests:
        prefixes.setdefault(r.prompt[:40], []).append(r)
    assert sorted(len(group) for group in prefixes.values()) == [4, 4, 4]
    assert len({r.prompt for r in requests}) == 12
    with pytest.raises(ValueError, match="prefix-len"):
        sample_shared_prefix(tokenizer, 1, 1, 0, 8, 5)


def test_multi_turn_conversations_keep_their_turns_in_order(tmp_path, tokenizer):
    records = [_conversation(i, turns=1 + i % 4) for i in range(20)]
    path = tmp_path / "multi.json"
    _write_sharegpt(path, records)
    conversations = sample_multi_turn(tokenizer, 5, path, max_turns=3, output_len=6)
    assert len(conversations) == 5
    for c in conversations:
        assert 2 <= c.num_turns <= 3
        index = c.prompt.split(" ")[1].split(".")[0]
        assert [t.user_message.split(" ")[1] for t in c.next_turns] == [f"{index}.{t + 1}:"
                                                                        for t in range(c.num_turns - 1)]
        assert {t.expected_output_len for t in c.next_turns} == {6}

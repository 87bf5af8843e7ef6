"""Tensor parallelism on the CPU (gloo, one process per rank): the engine's greedy tokens at
TP=2 and TP=4 equal TP=1's (float32) on every architecture, including KV heads fewer than ranks
(replicated) and vocabularies that do not divide by the rank count (padded); a worker that dies
is reported by rank and the engine stops without hanging; `rtpllm serve --tensor-parallel-size 2`
serves.

Each engine starts its workers (a few seconds on 2 cores), so each case runs one engine through
several scheduling situations at once: chunked prefill mixed with decodes, a prefix-cache hit,
a seeded sampled request with logprobs and prompt logprobs.
"""

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from checkpoints import Variant, build_checkpoint, checkpoint_path
from rtpllm import LLM, SamplingParams
from rtpllm.engine.executor import WorkerFailedError
from rtpllm.layers.parallel import RowParallelLinear, VocabParallelEmbedding

NEW_TOKENS = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
SAMPLED = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=2,
                         prompt_logprobs=1)  # every prompt position's logits, on every rank
ENGINE = dict(num_blocks=64, block_size=8, max_num_batched_tokens=32)  # 32: prompts prefill in chunks

# Beyond tests/py/checkpoints.py: vocabularies that 2 and 4 do not divide (521 with q/k/v biases,
# 517 tied to the embedding), and 8 q heads over 2 KV heads.
TP_VARIANTS = {
    "qwen2_v521": Variant("Qwen2Config", dict(hidden_size=128, intermediate_size=192, num_attention_heads=8,
                                              num_key_value_heads=2), add_bos=False, vocab_size=521, seed=21),
    "qwen3_v517": Variant("Qwen3Config", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                              num_key_value_heads=2, head_dim=32, tie_word_embeddings=True),
                          add_bos=False, vocab_size=517, seed=22),
}
CASES = [(name, tp) for name in ("llama3", "mistral", "qwen2_v521", "qwen3_v517") for tp in (2, 4)]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    paths = {name: checkpoint_path(name) for name in ("llama3", "mistral")}
    for name, variant in TP_VARIANTS.items():
        paths[name] = str(tmp_path_factory.mktemp(name))
        build_checkpoint(variant, paths[name])
    return paths


def _prompts(seed: int) -> list[list[int]]:
    """Three plain prompts, then two that share a 24-token prefix."""
    rng = random.Random(seed)
    prefix = [rng.randrange(3, 500) for _ in range(24)]
    plain = [[rng.randrange(3, 500) for _ in range(n)] for n in (5, 17, 45)]
    return plain + [prefix + [rng.randrange(3, 500) for _ in range(n)] for n in (3, 9)]


def _run(llm: LLM, prompts: list[list[int]]) -> dict:
    # One batch: greedy prompts (one with the shared prefix) beside a seeded sampled one...
    first = llm.generate(prompts[:4] + prompts[:1], [GREEDY] * 4 + [SAMPLED])
    # ...then the other shared-prefix prompt, which finds the prefix in the cache.
    cached = llm.generate(prompts[4:], GREEDY)
    sampled = first[-1].outputs[0]
    return dict(greedy=[list(o.outputs[0].token_ids) for o in first[:4] + cached],
                sampled=list(sampled.token_ids), logprobs=sampled.logprobs + first[-1].prompt_logprobs[1:],
                prefix_hits=llm.engine.stats().prefix_cache_hits, pool_free=llm.engine.check_kv_pool_free())


@pytest.fixture(scope="module")
def reference(paths):
    """TP=1 results per checkpoint, computed once."""
    results = {}

    def get(name: str) -> dict:
        if name not in results:
            results[name] = _run(LLM(model=paths[name], **ENGINE), _prompts(len(name)))
        return results[name]
    return get


def _children(pid: int = 0) -> set[int]:
    pid = pid or os.getpid()
    pids = set()
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                pids |= {int(child) for child in f.read().split()}
    except FileNotFoundError:
        pass  # it has exited
    return pids


def _descendants(pid: int) -> set[int]:
    found = _children(pid)
    for child in list(found):
        found |= _descendants(child)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"  # a zombie has exited


@pytest.mark.parametrize("name, tp", CASES, ids=[f"{n}-tp{tp}" for n, tp in CASES])
def test_tensor_parallel_tokens_equal_one_rank(paths, reference, name, tp):
    expected = reference(name)
    llm = LLM(model=paths[name], tensor_parallel_size=tp, **ENGINE)
    try:
        assert len(_children()) >= tp - 1, "one worker process per rank beyond rank 0"
        got = _run(llm, _prompts(len(name)))
    finally:
        llm.engine.shutdown()
    assert got["greedy"] == expected["greedy"]
    assert got["prefix_hits"] == expected["prefix_hits"] >= 24
    assert got["sampled"] == expected["sampled"]
    for ours, theirs in zip(got["logprobs"], expected["logprobs"]):
        assert ours.keys() == theirs.keys()
        assert max(abs(ours[t] - theirs[t]) for t in ours) < 1e-4
    assert got["pool_free"]


def test_tensor_parallel_with_asynchronous_scheduling(paths, reference):
    # Placeholder inputs read the tokens rank 0 sampled, which every rank received by broadcast.
    llm = LLM(model=paths["qwen2_v521"], tensor_parallel_size=2, async_scheduling=True, **ENGINE)
    try:
        prompts = _prompts(len("qwen2_v521"))[:4]
        got = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, GREEDY)]
        assert got == reference("qwen2_v521")["greedy"][:4]
    finally:
        llm.engine.shutdown()


def test_one_rank_builds_no_parallel_layers_and_calls_the_runner_directly(paths):
    llm = LLM(model=paths["llama3"], **ENGINE)
    assert llm.engine.executor.execute == llm.engine.runner.execute  # no forwarding layer per step
    kinds = {type(m) for m in llm.engine.runner.model.modules()}
    assert not kinds & {RowParallelLinear, VocabParallelEmbedding}
    assert not torch.distributed.is_initialized()


def test_a_worker_killed_mid_generation_is_reported_and_the_engine_stops(paths):
    # Rank 2 of 4 dies while the ranks are stepping: ranks 0, 1 and 3 may be inside a collective.
    tp, victim = 4, 2
    llm = LLM(model=paths["llama3"], tensor_parallel_size=tp, **ENGINE)
    workers = sorted(_children())
    assert len(workers) == tp - 1
    errors = []

    def generate():
        try:
            long = SamplingParams(temperature=0.0, max_tokens=900, ignore_eos=True)
            llm.generate([[5, 6, 7]], long)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            errors.append(exc)

    try:
        thread = threading.Thread(target=generate)
        thread.start()
        time.sleep(1.0)
        os.kill(workers[victim - 1], signal.SIGKILL)  # workers are started in rank order
        thread.join(timeout=30)
        assert not thread.is_alive(), "the engine hung on a dead worker"
        assert len(errors) == 1 and isinstance(errors[0], WorkerFailedError), errors
        assert errors[0].rank == victim and f"rank {victim} exited unexpectedly (exit code -9)" in str(errors[0])
        with pytest.raises(WorkerFailedError):
            llm.generate([[5, 6]], GREEDY)  # the engine stays failed, fast
    finally:
        started = time.monotonic()
        llm.engine.shutdown()
    assert time.monotonic() - started < 15
    assert not _children() & set(workers), "every worker process has ended"
    assert not torch.distributed.is_initialized()


def test_a_model_that_does_not_split_fails_at_start_and_leaves_no_worker(paths):
    with pytest.raises(ValueError, match="tensor_parallel_size: 3 does not divide num_attention_heads=4"):
        LLM(model=paths["llama3"], tensor_parallel_size=3, **ENGINE)
    deadline = time.monotonic() + 15
    while _children() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _children()
    assert not torch.distributed.is_initialized()


def test_serve_with_tensor_parallel_size_2(paths, reference):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "rtpllm.serving.cli", "serve", "--model", paths["qwen3_v517"], "--port", str(port),
               "--tensor-parallel-size", "2", "--num-blocks", "64", "--block-size", "8",
               "--max-num-batched-tokens", "32", "--disable-uvicorn-access-log"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "server did not come up"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        engine_and_worker = _descendants(process.pid)
        assert len(engine_and_worker) == 2, "the engine process and its rank-1 worker"
        prompt = _prompts(len("qwen3_v517"))[2]
        body = {"prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}
        reply = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
        expected = LLM(model=paths["qwen3_v517"], **ENGINE).generate([prompt], GREEDY)[0].outputs[0].text
        assert reply["choices"][0]["text"] == expected
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        deadline = time.monotonic() + 15
        while any(_alive(pid) for pid in engine_and_worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in engine_and_worker), "the engine and its worker ended with the server"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

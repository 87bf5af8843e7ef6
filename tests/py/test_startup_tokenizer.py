"""Where start-up loads tokenizers: the engine process loads none until a request needs one (its
server tokenizes and detokenizes), the offline engine loads its own beside the weights, and
`--tokenizer` is the tokenizer everyone loads."""

import asyncio
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from checkpoints import checkpoint_path
from rtpllm import SamplingParams
from rtpllm.config import EngineConfig
from rtpllm.engine.engine import Engine
from rtpllm.engine.link.process_engine import ProcessEngine
from rtpllm.loader.lazy_tokenizer import LazyTokenizer
from rtpllm.loader.tokenizer_loader import load_tokenizer, special_token_id, tokenizers_backend_for
from server_harness import run_engine

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("variant", ["llama3", "qwen2"])
def test_the_eos_id_read_from_the_files_is_the_tokenizers(variant):
    path = checkpoint_path(variant)
    assert special_token_id(path, "eos_token") == AutoTokenizer.from_pretrained(path).eos_token_id
    assert special_token_id(path, "no_such_token") is None


@pytest.mark.parametrize("variant, direct", [("llama3", True), ("mistral", True), ("qwen2", False), ("qwen3", False)])
def test_the_tokenizer_loaded_without_autoconfig_is_autotokenizers(variant, direct):
    """load_tokenizer skips AutoTokenizer (and its AutoConfig step) only where AutoTokenizer would
    pick TokenizersBackend too (qwen2/qwen3: transformers uses its own Qwen2Tokenizer)."""
    path = checkpoint_path(variant)
    assert (tokenizers_backend_for(path) is not None) == direct
    ours, theirs = load_tokenizer(path), AutoTokenizer.from_pretrained(path)
    assert type(ours) is type(theirs)
    text = "Hello <|im_start|> world\n\n  ü 你好 <|im_end|>"
    assert ours.encode(text) == theirs.encode(text)
    assert ours.encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False)
    ids = theirs.encode(text)
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    chat = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, len(ours), ours.all_special_ids) == \
        (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id, len(theirs), theirs.all_special_ids)


def test_a_lazy_tokenizer_loads_once_and_repeats_its_error(tmp_path):
    tokenizer = LazyTokenizer(checkpoint_path("llama3"))
    assert not tokenizer.loaded
    assert tokenizer.get() is tokenizer.get() and tokenizer.loaded and tokenizer.seconds > 0
    assert [name for name, _ in tokenizer.parts] == ["imports", "files", "thread CPU"]
    assert sum(seconds for _, seconds in tokenizer.parts[:2]) <= tokenizer.seconds
    broken = LazyTokenizer(str(tmp_path))  # a folder without tokenizer files
    for _ in range(2):
        with pytest.raises(FileNotFoundError, match="tokenizer"):
            broken.get()


def test_an_engine_with_the_tokenizer_on_demand_loads_it_only_when_a_request_needs_it():
    path = checkpoint_path("llama3")
    offline = Engine(EngineConfig.from_kwargs(model=path, num_blocks=32))
    engine = Engine(EngineConfig.from_kwargs(model=path, num_blocks=32), tokenizer_on_demand=True)
    assert not engine.tokenizer_loaded
    assert engine.eos_token_ids == offline.eos_token_ids and engine.vocab_size == offline.vocab_size
    assert "model" in [name for name, _ in engine.startup.phases]
    assert not engine.startup.parallel  # no tokenizer thread ran meanwhile

    # Token ids in, token ids out (the server decodes): no tokenizer.
    assert not engine.needs_tokenizer([5, 6, 7], detokenize=False)
    engine.add_request("ids", [5, 6, 7], GREEDY, detokenize=False)
    while engine.has_unfinished_requests():
        engine.step()
    assert not engine.tokenizer_loaded

    # A text prompt (or text the engine must decode) needs it: asking starts the load.
    assert engine.needs_tokenizer("Hello", detokenize=True)
    engine.add_request("text", "Hello", GREEDY)  # waits for the load
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    offline.add_request("text", "Hello", GREEDY)
    expected = []
    while offline.has_unfinished_requests():
        expected += offline.step()
    assert outputs[-1].outputs[0].text == expected[-1].outputs[0].text
    assert engine.tokenizer_loaded and not engine.needs_tokenizer("Hello")


def test_the_tokenizer_option_is_the_tokenizer_everyone_loads():
    model, other = checkpoint_path("llama3"), checkpoint_path("qwen2")  # BOS first, and not
    want = AutoTokenizer.from_pretrained(other).encode("hello world")
    assert want != AutoTokenizer.from_pretrained(model).encode("hello world")
    engine = Engine(EngineConfig.from_kwargs(model=model, tokenizer=other, num_blocks=32))
    assert engine.tokenizer.encode("hello world") == want
    process = ProcessEngine.from_config(EngineConfig.from_kwargs(model=model, tokenizer=other, num_blocks=32))
    try:
        assert process.tokenizer.encode("hello world") == want
    finally:
        process.close()


def test_the_engine_process_starts_without_a_tokenizer_and_serves_stop_strings():
    path = checkpoint_path("llama3")
    engine = ProcessEngine.from_config(EngineConfig.from_kwargs(model=path, num_blocks=64))
    report = engine.startup_report
    assert [phase["name"] for phase in report["phases"]][1] == "model"
    assert not report["parallel"]  # no tokenizer loaded meanwhile
    stop = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, stop=["e"])
    offline = Engine(EngineConfig.from_kwargs(model=path, num_blocks=64))

    async def body(engine):
        async def last(prompt, params, request_id):
            outputs = [output async for output in engine.generate(prompt, params, request_id)]
            return outputs[-1]

        # The stop-string request waits in the engine while its tokenizer loads; the others,
        # sent after it (token ids, decoded here), are answered in the meantime or after.
        return await asyncio.gather(last([5, 6, 7], stop, "stop"), last([5, 6, 7], GREEDY, "ids"),
                                    last([9, 10], GREEDY, "more"))

    finals = run_engine(engine, body)
    for request_id, prompt, params in (("stop", [5, 6, 7], stop), ("ids", [5, 6, 7], GREEDY),
                                       ("more", [9, 10], GREEDY)):
        offline.add_request(request_id, prompt, params)
    expected = {}
    while offline.has_unfinished_requests():
        expected.update((output.request_id, output) for output in offline.step())
    for final in finals:
        want = expected[final.request_id].outputs[0]
        got = final.outputs[0]
        assert (got.text, got.token_ids, got.finish_reason, got.stop_reason) == \
            (want.text, want.token_ids, want.finish_reason, want.stop_reason)


def test_the_engine_loop_holds_only_what_waits_for_the_tokenizer():
    """EngineCoreLoop._hold: an add that needs the tokenizer waits, with its abort and a stop after
    it, in order; every other command runs at once, and the held ones run once it has loaded."""
    import socket

    from rtpllm.engine.link.engine_core import EngineCoreLoop
    from rtpllm.engine.link.messages import AbortRequest, AddRequest, CallInEngine, StopEngine

    class Engine:
        tokenizer_loaded = False

        def needs_tokenizer(self, prompt, detokenize):
            return not self.tokenizer_loaded and isinstance(prompt, str)

    def add(request_id, prompt):
        return AddRequest(0, request_id, prompt, GREEDY, 0.0, True, False)

    engine, (a, b) = Engine(), socket.socketpair()
    try:
        loop = EngineCoreLoop(engine, a)
        commands = [add("text", "hi"), add("ids", [1, 2]), AbortRequest("text"), AbortRequest("ids"),
                    CallInEngine(1, len), StopEngine()]
        assert loop._hold(commands) == [commands[1], commands[3], commands[4]]
        later = [add("more", [3])]
        assert loop._hold(later) == later  # still loading: others keep coming
        engine.tokenizer_loaded = True
        assert loop._hold([]) == [commands[0], commands[2], commands[5]]
        assert loop._hold([]) == []
    finally:
        a.close()
        b.close()


def test_the_server_process_imports_neither_torch_nor_transformers():
    # The server imports its HTTP stack while the engine process loads the model; torch (1-5 s)
    # and transformers belong to the engine process and to the tokenizer thread only.
    code = ("import sys, rtpllm.serving.openai_server, rtpllm.serving.cli; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out

"""The server's tokenizer load decides AutoTokenizer's choice from tables read off transformers'
source (loader/auto_tokenizer_tables.py) instead of importing them: the tables must be the ones
transformers uses, whatever it cannot read must leave the choice to AutoTokenizer, and the
tokenizer must be AutoTokenizer's for the folders start-up benchmarks load (a Llama-3.1-shaped
128k-token one, and one laid out as transformers 4 saved Llama 3's on the Hub)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from checkpoints import checkpoint_path
from rtpllm.loader import auto_tokenizer_tables as tables_module
from rtpllm.loader.auto_tokenizer_tables import UNKNOWN, auto_tokenizer_tables, tables_from_source
from rtpllm.loader.tokenizer_loader import load_tokenizer, tokenizers_backend_for
from rtpllm.tools.random_checkpoint import main as write_random_checkpoint


def test_the_tables_read_from_the_source_are_the_ones_transformers_imports():
    from transformers.models.auto import tokenization_auto

    tables = auto_tokenizer_tables()
    assert tables is not None
    incorrect = tokenization_auto.MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS
    assert tables.models_with_incorrect_hub_class == frozenset(incorrect)
    read = dict(tables.class_for_model_type)
    # transformers adds every model with an incorrect Hub class to its mapping after the literal.
    for model_type in tables.models_with_incorrect_hub_class:
        read.setdefault(model_type, "TokenizersBackend")
    assert UNKNOWN not in read.values()  # every condition in the installed file was answered
    assert read == dict(tokenization_auto.TOKENIZER_MAPPING_NAMES)


SOURCE = '''
TOKENIZER_MAPPING_NAMES = OrderedDict[str, str | None](
    [
        ("plain", "TokenizersBackend"),
        ("fast", "PreTrainedTokenizerFast" if is_tokenizers_available() else None),
        ("own", "Qwen2Tokenizer" if is_tokenizers_available() else None),
        ("needs_spm", "LlamaTokenizer" if is_sentencepiece_available() else None),
        ("mistral", "MistralCommonBackend" if is_mistral_common_available()
                    else ("TokenizersBackend" if is_tokenizers_available() else None)),
        ("odd", "X" if some_flag else None),
        ("odd_call", "X" if is_frob_available() else None),
    ]
)
MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS: set[str] = {"qwen2", "phi3"}
'''


def test_conditions_are_answered_by_transformers_and_the_rest_is_unknown():
    answers = {"is_tokenizers_available": True, "is_sentencepiece_available": False,
               "is_mistral_common_available": False}
    tables = tables_from_source(SOURCE, answers.get)
    assert tables.models_with_incorrect_hub_class == {"qwen2", "phi3"}
    assert tables.class_for_model_type == {
        "plain": "TokenizersBackend", "fast": "PreTrainedTokenizerFast", "own": "Qwen2Tokenizer",
        "needs_spm": None, "mistral": "TokenizersBackend", "odd": UNKNOWN, "odd_call": UNKNOWN}
    answers["is_mistral_common_available"] = True
    assert tables_from_source(SOURCE, answers.get).class_for_model_type["mistral"] == "MistralCommonBackend"


@pytest.mark.parametrize("source", [
    "x = 1\n",  # neither table
    SOURCE.replace("MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS", "RENAMED"),
    SOURCE.replace('("plain", "TokenizersBackend"),', '("plain", "TokenizersBackend", "extra"),'),
    SOURCE.replace('{"qwen2", "phi3"}', 'set(NAMES)'),
])
def test_a_file_laid_out_otherwise_reads_as_no_tables(source):
    assert tables_from_source(source, lambda name: True) is None


def _llama31_like_folder(root) -> str:
    """The 128k-token Llama-3.1-shaped tokenizer bench_startup's checkpoint has (config only)."""
    out = str(root / "llama-3.1-8b")
    write_random_checkpoint(["--shape", "llama-3.1-8b", "--no-weights", "--out", out])
    return out


def _transformers4_llama3_folder(root) -> str:
    """The llama3 test checkpoint's tokenizer as Llama 3's Hub folders have it (transformers 4):
    PreTrainedTokenizerFast, the added tokens in tokenizer_config.json, the template inside it."""
    out = str(root / "llama3-hub-layout")
    shutil.copytree(checkpoint_path("llama3"), out)
    config_path = os.path.join(out, "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    with open(os.path.join(out, "tokenizer.json"), encoding="utf-8") as f:
        added = json.load(f)["added_tokens"]
    template_path = os.path.join(out, "chat_template.jinja")
    with open(template_path, encoding="utf-8") as f:
        config["chat_template"] = f.read().replace("<|im_start|>", "<|im_start|> ")  # a visibly other template
    os.remove(template_path)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["added_tokens_decoder"] = {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added}
    config["clean_up_tokenization_spaces"] = True
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f)
    return out


@pytest.mark.parametrize("make_folder", [_llama31_like_folder, _transformers4_llama3_folder])
def test_the_directly_loaded_tokenizer_is_autotokenizers(make_folder, tmp_path):
    path = make_folder(tmp_path)
    assert tokenizers_backend_for(path) is not None  # the direct load, not AutoTokenizer
    ours, theirs = load_tokenizer(path), AutoTokenizer.from_pretrained(path)
    assert type(ours) is type(theirs)
    special = " ".join(theirs.all_special_tokens)
    texts = ["", "Hello world", f"{special} and text\n\n  ü 你好 <|im_end|>x", "  spaces  ,  don't  . ",
             "<|begin_of_text|><|im_start|>user\nhi<|im_end|>"]
    for text in texts:
        for add_special in (True, False):
            assert ours.encode(text, add_special_tokens=add_special) == \
                theirs.encode(text, add_special_tokens=add_special), text
        ids = theirs.encode(text)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
        assert ours.convert_ids_to_tokens(ids) == theirs.convert_ids_to_tokens(ids)
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"}]
    for generation_prompt in (True, False):
        assert ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation_prompt) == \
            theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation_prompt)
    assert ours.chat_template == theirs.chat_template
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, len(ours), ours.all_special_ids,
            ours.model_max_length, ours.clean_up_tokenization_spaces) == \
        (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id, len(theirs), theirs.all_special_ids,
         theirs.model_max_length, theirs.clean_up_tokenization_spaces)
    assert ours.get_added_vocab() == theirs.get_added_vocab()


def test_without_tables_or_with_an_unknown_class_autotokenizer_decides(tmp_path, monkeypatch):
    path = _llama31_like_folder(tmp_path)
    assert tokenizers_backend_for(path) is not None
    monkeypatch.setattr(tables_module, "auto_tokenizer_tables", lambda: None)
    monkeypatch.setattr("rtpllm.loader.tokenizer_loader.auto_tokenizer_tables", lambda: None)
    assert tokenizers_backend_for(path) is None  # e.g. transformers 4, or another layout
    unknown = tables_module.AutoTokenizerTables({"llama": UNKNOWN}, frozenset())
    monkeypatch.setattr("rtpllm.loader.tokenizer_loader.auto_tokenizer_tables", lambda: unknown)
    assert tokenizers_backend_for(path) is None
    assert type(load_tokenizer(path)) is type(AutoTokenizer.from_pretrained(path))  # through AutoTokenizer


def test_loading_the_tokenizer_imports_no_autotokenizer_machinery():
    # tokenization_auto imports torch (and, in transformers 5.17, torch._dynamo, the generation
    # utilities, accelerate): seconds of imports holding the GIL on the server's tokenizer thread.
    # Only where transformers' tokenizer class itself imports torch (5.17) may torch be imported.
    probe = ("import sys, {what}; "
             "print(sorted(m for m in ('torch', 'torch._dynamo', 'transformers.models.auto.tokenization_auto', "
             "'transformers.generation.utils') if m in sys.modules))")
    run = lambda code: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,  # noqa: E731
                                      check=True).stdout.strip()
    class_alone = run(probe.format(what="transformers; transformers.TokenizersBackend"))
    load = "rtpllm.loader.tokenizer_loader as t; t.load_tokenizer(" + repr(checkpoint_path("llama3")) + ")"
    assert run(probe.format(what=load)) == class_alone
    assert "tokenization_auto" not in class_alone and "_dynamo" not in class_alone

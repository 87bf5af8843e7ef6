"""SpeculativeConfig: vLLM's spelling, validated at start with errors naming the field."""

import argparse

import pytest

from rtpllm.config import EngineConfig, SpeculativeConfig
from rtpllm.serving.engine_args import add_engine_args, engine_config_from_args


def test_cli_flag_takes_json():
    parser = add_engine_args(argparse.ArgumentParser())
    args = parser.parse_args(["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3, '
                                                      '"prompt_lookup_max": 4}'])
    spec = engine_config_from_args(args).speculative_config
    assert spec == SpeculativeConfig(method="ngram", num_speculative_tokens=3, prompt_lookup_min=2, prompt_lookup_max=4)


def test_llm_style_dict_and_defaults():
    config = EngineConfig.from_kwargs(speculative_config={"method": "draft_model", "model": "/m",
                                                          "num_speculative_tokens": 5})
    assert config.speculative_config.model == "/m" and config.speculative_config.adaptive
    assert EngineConfig.from_kwargs().speculative_config is None
    ngram = SpeculativeConfig("ngram", 2)
    assert (ngram.prompt_lookup_min, ngram.prompt_lookup_max) == (2, 5)


@pytest.mark.parametrize("value, field", [
    ({"method": "medusa", "num_speculative_tokens": 2}, "speculative_config.method"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 17}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 2, "model": "/x"}, "speculative_config.model"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 3},
     "prompt_lookup_max"),
    ({"method": "eagle3", "num_speculative_tokens": 2}, "speculative_config.model"),
    ({"method": "draft_model", "num_speculative_tokens": 2, "model": "/m", "prompt_lookup_max": 3},
     "prompt_lookup_min"),
    ({"method": "ngram", "num_speculative_tokens": 2, "typo": 1}, "unknown key"),
    ({"method": "ngram"}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 2, "verify_graph_max_batch": 300}, "verify_graph_max_batch"),
    ({"method": "ngram", "num_speculative_tokens": 2, "verify_graph_max_batch": -1}, "verify_graph_max_batch"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
])
def test_bad_configs_name_the_field(value, field):
    with pytest.raises(ValueError, match=field):
        EngineConfig.from_kwargs(speculative_config=value)

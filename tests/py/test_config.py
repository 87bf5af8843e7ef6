"""Engine options and sampling parameters: vLLM names map onto the config, bad values name their field."""

import pytest

from rtpllm import EngineConfig, SamplingParams


def test_from_kwargs_maps_vllm_names_onto_dataclasses():
    config = EngineConfig.from_kwargs(model="m", dtype="fp32", block_size=32, max_num_batched_tokens=64,
                                      max_num_seqs=4, enable_prefix_caching=False, enable_chunked_prefill=False,
                                      gpu_memory_utilization=0.5, num_blocks=10, max_model_len=128)
    assert config.model.model == "m" and config.model.dtype == "float32"
    assert config.cache.block_size == 32 and config.cache.num_blocks == 10
    assert config.cache.enable_prefix_caching is False and config.cache.gpu_memory_utilization == 0.5
    assert config.scheduler.max_num_batched_tokens == 64 and config.scheduler.max_num_seqs == 4
    assert config.scheduler.enable_chunked_prefill is False
    assert config.model.max_model_len == 128


def test_defaults_turn_prefix_caching_and_chunked_prefill_on():
    config = EngineConfig.from_kwargs()
    assert config.cache.enable_prefix_caching and config.scheduler.enable_chunked_prefill
    assert config.model.model is None  # the built-in default model


@pytest.mark.parametrize("options, field", [
    ({"block_size": 0}, "block_size"),
    ({"block_size": 24}, "block_size"),
    ({"max_num_batched_tokens": -1}, "max_num_batched_tokens"),
    ({"max_num_seqs": 0}, "max_num_seqs"),
    ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
    ({"dtype": "int8"}, "dtype"),
    ({"max_model_len": 0}, "max_model_len"),
    ({"num_blocks": 0}, "num_blocks"),
    ({"device": "tpu"}, "device"),
])
def test_bad_engine_options_name_the_field(options, field):
    with pytest.raises(ValueError, match=field):
        EngineConfig.from_kwargs(**options)


def test_unknown_engine_option_is_rejected():
    with pytest.raises(TypeError, match="no_such_option"):
        EngineConfig.from_kwargs(no_such_option=1)


@pytest.mark.parametrize("options, field", [
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"temperature": -1.0}, "temperature"),
    ({"n": 0}, "n"),
    ({"min_p": 2.0}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"stop": [""]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"logprobs": -1}, "logprobs"),
])
def test_bad_sampling_params_name_the_field(options, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**options)


def test_sampling_params_normalize_stop_and_top_k():
    params = SamplingParams(stop="###", top_k=-1, temperature=0)
    assert params.stop_strings == ["###"] and params.top_k == 0 and params.greedy

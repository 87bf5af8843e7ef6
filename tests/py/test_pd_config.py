"""Prefill-decode options: validated with errors naming the field, mapped from the CLI, combinations
that cannot work refused at start; and the small shared rules of the instance side."""

import struct

import pytest

from rtpllm.config import EngineConfig
from rtpllm.pd.kv_params import FirstToken, aligned_start, decode_first_token, encode_first_token, transfer_request_id
from rtpllm.serving.cli import build_parser
from rtpllm.serving.engine_args import engine_config_from_args


def test_cli_flags_map_onto_pd_config():
    args = build_parser().parse_args(["serve", "--role", "decode", "--pd-timeout-s", "7.5",
                                      "--pd-transfer-host", "10.0.0.2", "--pd-transfer-port", "5555"])
    pd = engine_config_from_args(args).pd
    assert (pd.role, pd.pd_timeout_s, pd.pd_transfer_host, pd.pd_transfer_port) == ("decode", 7.5, "10.0.0.2", 5555)
    assert EngineConfig().pd.role == "both" and not EngineConfig().pd.enabled
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--role", "router"])


@pytest.mark.parametrize("options,field", [
    (dict(role="middle"), "role"),
    (dict(role="decode", pd_timeout_s=0), "pd_timeout_s"),
    (dict(role="decode", pd_transfer_port=70000), "pd_transfer_port"),
    (dict(role="decode", pd_transfer_host=""), "pd_transfer_host"),
    (dict(role="prefill", speculative_config={"method": "ngram", "num_speculative_tokens": 2}), "speculative_config"),
    (dict(role="decode", tensor_parallel_size=2, pd_transfer_port=65535), "pd_transfer_port"),
    (dict(role="decode", speculative_config={"method": "eagle3", "num_speculative_tokens": 2, "model": "/x"}),
     "speculative_config.method"),
])
def test_bad_pd_options_name_the_field(options, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        EngineConfig.from_kwargs(**options)


def test_tensor_parallel_instances_may_disaggregate():
    for role in ("prefill", "decode"):
        config = EngineConfig.from_kwargs(role=role, tensor_parallel_size=2, pd_transfer_port=5555)
        assert (config.pd.role, config.parallel.tensor_parallel_size) == (role, 2)


def test_decode_instances_may_speculate_with_proposers_that_need_nothing_from_prefill():
    for spec in ({"method": "ngram", "num_speculative_tokens": 2},
                 {"method": "draft_model", "num_speculative_tokens": 3, "model": "/draft"}):
        config = EngineConfig.from_kwargs(role="decode", speculative_config=spec)
        assert config.speculative_config.method == spec["method"]


def test_writes_start_at_a_boundary_of_both_block_sizes():
    assert aligned_start(0, 64, 16) == 0
    assert aligned_start(48, 64, 16) == 0     # decode's hit is not a prefill block boundary: write it all
    assert aligned_start(130, 64, 16) == 128
    assert aligned_start(40, 8, 12) == 24     # lcm 24


def test_transfer_ids_and_first_token_payload():
    assert transfer_request_id("req-1") == transfer_request_id("req-1") != transfer_request_id("req-2")
    assert 0 <= transfer_request_id("x") < 2**64
    assert decode_first_token(encode_first_token(FirstToken(128001))) == FirstToken(128001)
    # With logprobs: the sampled token's first, then the top-N, in order, float32 values exact.
    first = FirstToken(7, {7: -0.25, 3: -1.5, 9: -2.0000001192092896})
    payload = encode_first_token(first)
    assert decode_first_token(payload) == first and list(decode_first_token(payload).logprobs) == [7, 3, 9]
    assert len(payload) < 4096  # a notice's payload limit, even with top_logprobs=20
    assert len(encode_first_token(FirstToken(1, {t: -1.0 for t in range(21)}))) < 4096
    for bad in (b"bad", payload[:-1], payload + b"x", struct.pack("<qI", 1, 1)):  # one entry announced, none sent
        assert decode_first_token(bad) is None

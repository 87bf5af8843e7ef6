"""Tensor parallelism's split, without processes: which rows each rank holds, that the shards
tile every checkpoint tensor, and that reading only a shard (safetensors slices) gives the same
parameters as reading whole tensors and slicing them."""

import pytest
import torch

from checkpoints import checkpoint_path
from rtpllm.config import EngineConfig
from rtpllm.distributed.partition import split_heads, split_vocab
from rtpllm.engine.executor import create_executor
from rtpllm.loader.hf_checkpoint import iter_safetensors, read_json, safetensors_files
from rtpllm.models.llama_arch import LlamaArch
from rtpllm.models.llama_shards import check_tensor_parallel, llama_tensor_shard, rank_local_arch


def test_kv_heads_fewer_than_ranks_are_replicated_next_to_their_q_heads():
    # 8 q heads, 2 KV heads, 4 ranks: rank r holds q heads 2r, 2r+1, which attend with KV head r // 2.
    for rank in range(4):
        kv = split_heads(2, rank, 4, "num_key_value_heads")
        assert (kv.start, kv.stop, kv.size) == (rank // 2, rank // 2 + 1, 1)
        q = split_heads(8, rank, 4, "num_attention_heads")
        assert all(head // 4 == kv.start for head in range(q.start, q.stop))
    with pytest.raises(ValueError, match="tensor_parallel_size: 4 is neither a divisor nor a multiple"):
        split_heads(3, 0, 4, "num_key_value_heads")


def test_a_vocabulary_that_does_not_divide_pads_the_last_shard():
    shards = [split_vocab(521, rank, 4) for rank in range(4)]
    assert [s.size for s in shards] == [131] * 4
    assert [(s.start, s.stop) for s in shards] == [(0, 131), (131, 262), (262, 393), (393, 521)]
    last = shards[-1]
    table = torch.arange(521 * 3, dtype=torch.float32).view(521, 3)
    taken = last.take(table, "embed")
    assert taken.shape == (131, 3)
    assert torch.equal(taken[:128], table[393:]) and not taken[128:].any()
    # A reader that already read only the shard's rows hands those over: the same result.
    assert torch.equal(last.take(table[393:], "embed"), taken)
    with pytest.raises(ValueError, match="embed: has 7 rows"):
        last.take(table[:7], "embed")


@pytest.mark.parametrize("world", [2, 4])
def test_the_shards_of_every_rank_tile_each_checkpoint_tensor(world):
    path = checkpoint_path("llama3")
    arch = LlamaArch.from_hf_config(read_json(f"{path}/config.json"))
    for name, tensor in iter_safetensors(safetensors_files(path)):
        shards = [llama_tensor_shard(name, arch, rank, world) for rank in range(world)]
        if shards[0] is None:
            assert name.endswith("norm.weight"), f"{name} is replicated"
            continue
        covered = torch.zeros(tensor.shape[shards[0].dim], dtype=torch.int32)
        for shard in shards:
            covered[shard.start:shard.stop] += 1
        replicated = name.endswith(("k_proj.weight", "v_proj.weight")) and arch.num_kv_heads < world
        assert (covered == (world // arch.num_kv_heads if replicated else 1)).all(), name


def test_reading_only_the_shards_equals_slicing_whole_tensors():
    path = checkpoint_path("hd128_sharded")  # several safetensors files, bf16
    arch = LlamaArch.from_hf_config(read_json(f"{path}/config.json"))
    files = safetensors_files(path)
    whole = dict(iter_safetensors(files))
    for rank in range(2):
        shard_of = lambda name: llama_tensor_shard(name, arch, rank, 2)  # noqa: E731
        for name, part in iter_safetensors(files, shard_of):
            shard = shard_of(name)
            expected = whole[name] if shard is None else shard.take(whole[name], name)
            assert torch.equal(part if shard is None else shard.take(part, name), expected), name
            if shard is not None and shard.length < shard.full:
                assert part.shape[shard.dim] == shard.length, f"{name}: read only the shard's rows"


def test_a_model_that_does_not_split_names_tensor_parallel_size():
    arch = LlamaArch.from_hf_config(read_json(f"{checkpoint_path('llama3')}/config.json"))  # 4 heads, 2 KV heads
    check_tensor_parallel(arch, 4)
    with pytest.raises(ValueError, match="tensor_parallel_size: 3 does not divide num_attention_heads=4"):
        check_tensor_parallel(arch, 3)
    with pytest.raises(ValueError, match="tensor_parallel_size: 8 does not divide num_attention_heads=4"):
        check_tensor_parallel(arch, 8)
    local = rank_local_arch(arch, 3, 4)
    assert (local.num_heads, local.num_kv_heads, local.hidden_size) == (1, 1, arch.hidden_size)


def test_more_ranks_than_gpus_is_an_error_at_start():
    config = EngineConfig.from_kwargs(model=checkpoint_path("llama3"), tensor_parallel_size=2)
    gpus = torch.cuda.device_count()
    if gpus >= 2:
        pytest.skip("this host has enough GPUs")
    with pytest.raises(ValueError, match=f"tensor_parallel_size: 2 needs 2 GPUs, torch sees {gpus}"):
        create_executor(config, config.model.model, torch.device("cuda", 0), torch.bfloat16)

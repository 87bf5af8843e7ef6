"""Tensor-parallel ranks read their slices through the C++ reader (row ranges, strided column
slices, padded vocabulary shards): every rank's parameters are bit-identical to reading the
slices with safetensors and handing them to `load_weights`. No processes: a rank's model is
built and loaded without joining its group."""

import pytest
import torch

from checkpoints import checkpoint_path
from rtpllm.distributed.tp_group import TPGroup
from rtpllm.loader import load_model_and_tokenizer
from rtpllm.loader.hf_checkpoint import iter_safetensors, read_json, safetensors_files
from rtpllm.models.llama import LlamaForCausalLM
from rtpllm.models.llama_arch import LlamaArch
from rtpllm.models.llama_shards import check_tensor_parallel


def _safetensors_slices(path: str, arch: LlamaArch, tp: TPGroup, dtype: torch.dtype) -> LlamaForCausalLM:
    model = LlamaForCausalLM(arch, dtype=dtype, tp=tp)
    model.load_weights(iter_safetensors(safetensors_files(path), model.checkpoint_shard))
    return model


# llama3: GQA (KV heads replicated at 4 ranks); qwen2: q/k/v biases and a padded vocabulary;
# qwen3: q/k norms, tied embeddings; hd128_sharded: bf16 in several files; gqa9x3 at 3 ranks: a
# vocabulary that does not divide (the last shard is zero-padded).
@pytest.mark.parametrize("variant", ["llama3", "qwen2", "qwen3", "hd128_sharded", "gqa9x3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_each_rank_reads_exactly_its_safetensors_slices(variant, dtype):
    path = checkpoint_path(variant)
    arch = LlamaArch.from_hf_config(read_json(f"{path}/config.json"))
    for world in (2, 3, 4):
        try:
            check_tensor_parallel(arch, world)
        except ValueError:
            continue
        for rank in range(world):
            tp = TPGroup(rank, world, torch.device("cpu"))
            ours = load_model_and_tokenizer(path, dtype=dtype, tensor_parallel=tp).model
            expected = _safetensors_slices(path, arch, tp, dtype)
            theirs = dict(expected.named_parameters())
            for name, param in ours.named_parameters():
                assert param.shape == theirs[name].shape, f"world {world} rank {rank}: {name}"
                assert torch.equal(param, theirs[name]), f"world {world} rank {rank}: {name}"

"""The C++ weight loader onto the GPU: pinned staging buffers, copies on the loader's own stream.

- Every tensor of sharded bf16 / fp16 / fp32 checkpoints (q|k|v and gate|up fused or not) lands
  in the model's parameters on the GPU bit-identical to what `safetensors` reads.
- A bf16 checkpoint into a float32 model converts on the device and equals torch's conversion.
- Row and column slices (what a tensor-parallel rank asks for) land exactly, O_DIRECT or not.
- A model loaded onto the GPU gives the same parameters as one loaded on the CPU.
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "py"))
from sharded_checkpoints import sharded_checkpoint  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from rtpllm import _C  # noqa: E402
from rtpllm.loader import load_model_and_tokenizer  # noqa: E402
from rtpllm.loader.reader import LoaderSettings  # noqa: E402
from rtpllm.loader.safetensors_loader import read_tensors  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SETTINGS = LoaderSettings(num_threads=4, chunk_bytes=64 << 10, progress=False)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.uint8).cpu()


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_tensors_on_the_gpu_bit_identical(tmp_path, dtype_name, fused):
    _, files = sharded_checkpoint(tmp_path, DTYPES[dtype_name], fused)
    ours = read_tensors(files, device="cuda", settings=SETTINGS)
    expected = {k: v for f in files for k, v in load_file(f).items()}
    assert ours.keys() == expected.keys()
    for name, tensor in expected.items():
        assert ours[name].is_cuda
        assert torch.equal(bits(ours[name]), bits(tensor)), name


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_model_on_the_gpu_equals_the_cpu_load(tmp_path, fused):
    folder, _ = sharded_checkpoint(tmp_path, torch.bfloat16, fused)
    on_gpu = load_model_and_tokenizer(str(folder), dtype=torch.bfloat16, device="cuda", loader_settings=SETTINGS)
    on_cpu = load_model_and_tokenizer(str(folder), dtype=torch.bfloat16, device="cpu", loader_settings=SETTINGS)
    cpu_params = dict(on_cpu.model.named_parameters())
    for name, param in on_gpu.model.named_parameters():
        assert param.is_cuda
        assert torch.equal(bits(param), bits(cpu_params[name])), name


def test_dtype_conversion_runs_on_the_device(tmp_path):
    folder, files = sharded_checkpoint(tmp_path, torch.bfloat16, fused=False)
    model = load_model_and_tokenizer(str(folder), dtype=torch.float32, device="cuda", loader_settings=SETTINGS).model
    stored = {k: v for f in files for k, v in load_file(f).items()}
    assert torch.equal(model.model.embed_tokens.weight.cpu(), stored["model.embed_tokens.weight"].float())
    down = model.model.layers[1].mlp.down_proj.weight
    assert torch.equal(down.cpu(), stored["model.layers.1.mlp.down_proj.weight"].float())


@pytest.mark.parametrize("direct_io", ["always", "never"])
def test_row_and_column_slices_on_the_gpu(tmp_path, direct_io):
    matrix = torch.randn(301, 257, dtype=torch.float32)
    path = str(tmp_path / "m.safetensors")
    save_file({"pad": torch.zeros(5), "m": matrix}, path)
    loader = _C.loader.WeightLoader(num_threads=3, chunk_bytes=8192, direct_io=direct_io,
                                    cuda_device=torch.cuda.current_device())
    rows = torch.empty(100, 257, device="cuda")
    cols = torch.empty(301, 64, device="cuda")
    row_bytes = 257 * 4
    job = loader.start([
        _C.loader.TensorRequest(path, "m", rows.data_ptr(), rows.numel() * 4, begin=150 * row_bytes),
        _C.loader.TensorRequest(path, "m", cols.data_ptr(), cols.numel() * 4, begin=64 * 4, row_bytes=64 * 4,
                                rows=301, src_stride=row_bytes, dst_stride=64 * 4),
    ])
    job.finish()
    assert torch.equal(rows.cpu(), matrix[150:250])
    assert torch.equal(cols.cpu(), matrix[:, 64:128])

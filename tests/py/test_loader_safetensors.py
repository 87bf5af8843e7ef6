"""The C++ safetensors reader (rtpllm._C.loader through rtpllm.loader.safetensors_loader).

Every tensor it loads is bit-identical to what `safetensors` reads, for sharded checkpoints with
fused (qkv_proj, gate_up_proj) and unfused layouts in bf16, fp16 and fp32; bad files fail with an
error naming the file and the tensor.
"""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
import torch
from checkpoints import checkpoint_path
from sharded_checkpoints import BASE_VARIANT, sharded_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rtpllm import _C
from rtpllm.loader import load_model_and_tokenizer
from rtpllm.loader.safetensors_loader import LoaderSettings, read_tensors

_BASE = BASE_VARIANT
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Small chunks and several threads, so even a tiny checkpoint is read in many pieces concurrently.
_SETTINGS = LoaderSettings(num_threads=3, chunk_bytes=64 << 10, progress=False)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.uint8)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("dtype_name", list(_DTYPES))
def test_every_tensor_bit_identical_to_safetensors(tmp_path, dtype_name, fused):
    _, files = sharded_checkpoint(tmp_path, _DTYPES[dtype_name], fused)
    ours = read_tensors(files, settings=_SETTINGS)
    count = 0
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                expected = f.get_tensor(name)
                assert ours[name].dtype == expected.dtype and ours[name].shape == expected.shape, name
                assert torch.equal(_bits(ours[name]), _bits(expected)), name
                count += 1
    assert count == len(ours)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("dtype_name", list(_DTYPES))
def test_model_parameters_hold_the_checkpoint_bytes(tmp_path, dtype_name, fused):
    dtype = _DTYPES[dtype_name]
    folder, files = sharded_checkpoint(tmp_path, dtype, fused)
    model = load_model_and_tokenizer(str(folder), dtype=dtype, loader_settings=_SETTINGS).model
    stored = {}
    for path in files:
        stored.update(load_file(path))
    layer = model.model.layers[1]
    prefix = "model.layers.1."
    if fused:
        qkv = stored[prefix + "self_attn.qkv_proj.weight"]
        gate_up = stored[prefix + "mlp.gate_up_proj.weight"]
    else:
        qkv = torch.cat([stored[prefix + f"self_attn.{p}_proj.weight"] for p in "qkv"])
        gate_up = torch.cat([stored[prefix + "mlp.gate_proj.weight"], stored[prefix + "mlp.up_proj.weight"]])
    assert torch.equal(_bits(layer.self_attn.qkv_proj.weight), _bits(qkv))
    assert torch.equal(_bits(layer.mlp.gate_up_proj.weight), _bits(gate_up))
    assert torch.equal(_bits(layer.self_attn.o_proj.weight), _bits(stored[prefix + "self_attn.o_proj.weight"]))
    assert torch.equal(_bits(model.model.embed_tokens.weight), _bits(stored["model.embed_tokens.weight"]))
    assert torch.equal(_bits(model.lm_head.weight), _bits(stored["lm_head.weight"]))
    assert torch.equal(_bits(model.model.norm.weight), _bits(stored["model.norm.weight"]))


def test_dtype_conversion_matches_torch(tmp_path):
    folder, files = sharded_checkpoint(tmp_path, torch.bfloat16, fused=False)
    model = load_model_and_tokenizer(str(folder), dtype=torch.float32, loader_settings=_SETTINGS).model
    stored = load_file(files[0]) | {k: v for f in files[1:] for k, v in load_file(f).items()}
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(model.model.embed_tokens.weight, stored["model.embed_tokens.weight"].float())
    k = model.model.layers[0].self_attn.qkv_proj.weight[model.model.layers[0].self_attn.qkv_proj.shard_rows["k_proj"]]
    assert torch.equal(k, stored["model.layers.0.self_attn.k_proj.weight"].float())


@pytest.mark.parametrize("direct_io", ["always", "never"])
def test_row_and_column_slices(tmp_path, direct_io):
    """What a tensor-parallel rank asks for: a byte range (rows) and a strided request (columns)."""
    matrix = torch.randn(37, 53, dtype=torch.float32)
    path = str(tmp_path / "m.safetensors")
    save_file({"pad": torch.zeros(3), "m": matrix}, path)
    loader = _C.loader.WeightLoader(num_threads=2, chunk_bytes=4096, direct_io=direct_io)
    rows = torch.empty(10, 53)
    cols = torch.empty(37, 7)
    row_bytes = 53 * 4
    requests = [
        _C.loader.TensorRequest(path, "m", rows.data_ptr(), rows.numel() * 4, begin=5 * row_bytes),
        _C.loader.TensorRequest(path, "m", cols.data_ptr(), cols.numel() * 4, begin=20 * 4, row_bytes=7 * 4,
                                rows=37, src_stride=row_bytes, dst_stride=7 * 4),
    ]
    job = loader.start(requests)
    stats = job.finish()
    assert stats.bytes_copied == job.total_bytes == (rows.numel() + cols.numel()) * 4
    assert torch.equal(rows, matrix[5:15])
    assert torch.equal(cols, matrix[:, 20:27])


def test_request_past_the_tensor_names_file_and_tensor(tmp_path):
    path = str(tmp_path / "m.safetensors")
    save_file({"m": torch.zeros(4, 4)}, path)
    out = torch.empty(5, 4)
    loader = _C.loader.WeightLoader()
    with pytest.raises(ValueError, match=r"m.safetensors: tensor m: requested bytes .* reach past"):
        loader.start([_C.loader.TensorRequest(path, "m", out.data_ptr(), 80)])


# ------------------------------------------------------------------------------------------ errors
@pytest.fixture
def sharded(tmp_path):
    folder, files = sharded_checkpoint(tmp_path, torch.bfloat16, fused=False)
    return folder, files


def _first_tensor(path: str) -> str:
    return _C.loader.read_safetensors_header(path).tensors[0].name


def _last_tensor(path: str) -> str:
    return _C.loader.read_safetensors_header(path).tensors[-1].name


def test_truncated_shard_names_file_and_tensor(sharded):
    folder, files = sharded
    victim = files[1]
    last = _last_tensor(victim)
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) - 100)
    pattern = rf"{os.path.basename(victim)}.*tensor {last}.*truncated"
    with pytest.raises(ValueError, match=pattern):
        load_model_and_tokenizer(str(folder), dtype=torch.bfloat16)


def _rewrite_header(path: str, edit) -> None:
    with open(path, "rb") as f:
        data = f.read()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    edit(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (length - len(text))  # same length: the data stays where it was
    assert len(text) == length
    with open(path, "wb") as f:
        f.write(data[:8] + text + data[8 + length:])


def test_header_lying_about_offsets_names_file_and_tensor(sharded):
    folder, files = sharded
    victim = next(f for f in files if len(_C.loader.read_safetensors_header(f).tensors) >= 2)
    name = _first_tensor(victim)

    def shift(header):  # the first tensor claims the second one's bytes too
        begin, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = [begin + 64, end + 64]

    _rewrite_header(victim, shift)
    with pytest.raises(ValueError, match=rf"{os.path.basename(victim)}.*{name}.*overlap"):
        load_model_and_tokenizer(str(folder), dtype=torch.bfloat16)


def test_header_with_wrong_size_names_file_and_tensor(sharded):
    folder, files = sharded
    victim = files[2]
    name = _first_tensor(victim)

    def grow(header):
        header[name]["shape"] = [header[name]["shape"][0] + 1] + header[name]["shape"][1:]

    _rewrite_header(victim, grow)
    with pytest.raises(ValueError, match=rf"{os.path.basename(victim)}.*tensor {name}: .*needs"):
        load_model_and_tokenizer(str(folder), dtype=torch.bfloat16)


def test_missing_tensor_is_named(sharded):
    folder, files = sharded
    state = load_file(files[1])
    name = sorted(state)[0]
    del state[name]
    save_file(state, files[1])
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    del index["weight_map"][name]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"missing 1 tensor\(s\): {name}"):
        load_model_and_tokenizer(str(folder), dtype=torch.bfloat16)


def test_index_listing_a_tensor_its_shard_lacks_names_both(sharded):
    folder, files = sharded
    state = load_file(files[1])
    name = sorted(state)[0]
    del state[name]
    save_file(state, files[1])
    with pytest.raises(ValueError, match=rf"tensor {name} is listed in {os.path.basename(files[1])}"):
        load_model_and_tokenizer(str(folder), dtype=torch.bfloat16)


def test_index_pointing_at_a_missing_file_names_file_and_tensor(sharded):
    folder, files = sharded
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "model-00099-of-00099.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match=rf"missing shard model-00099-of-00099.safetensors .*tensor {name}"):
        load_model_and_tokenizer(str(folder), dtype=torch.bfloat16)


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="junk.safetensors: not a valid safetensors file .*header length"):
        read_tensors([str(path)])


# ------------------------------------------------------------------------------------- dummy format
def test_dummy_format_reads_no_weights(tmp_path):
    folder = shutil.copytree(checkpoint_path(_BASE), tmp_path / "no-weights",
                             ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    loaded = load_model_and_tokenizer(str(folder), load_format="dummy")
    params = list(loaded.model.parameters())
    assert all(p.abs().max() <= 1e-3 and torch.isfinite(p).all() for p in params)
    assert any(p.abs().max() > 0 for p in params)


def test_unknown_load_format():
    with pytest.raises(ValueError, match="load_format: must be one of"):
        load_model_and_tokenizer(checkpoint_path(_BASE), load_format="pt")


def test_dummy_format_through_llm_and_cli(tmp_path):
    from rtpllm.engine.llm import LLM
    from rtpllm.sampling_params import SamplingParams
    from rtpllm.serving.cli import build_parser
    from rtpllm.serving.engine_args import engine_config_from_args

    args = build_parser().parse_args(["generate", "--load-format", "dummy", "hi"])
    assert engine_config_from_args(args).model.load_format == "dummy"
    folder = shutil.copytree(checkpoint_path(_BASE), tmp_path / "no-weights",
                             ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    llm = LLM(model=str(folder), load_format="dummy", device="cpu", num_blocks=16)
    out = llm.generate(["hello"], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3


def test_raw_byte_ranges_of_any_file(tmp_path):
    """How GGUF tensors are read: byte ranges of a file with no safetensors header."""
    from rtpllm.loader.reader import read_file_ranges

    data = bytes(range(256)) * 40
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    first, second = read_file_ranges(str(path), [(5, 100), (9000, 1240)], "cpu", _SETTINGS)
    assert first.numpy().tobytes() == data[5:105]
    assert second.numpy().tobytes() == data[9000:]
    with pytest.raises(ValueError, match=r"blob.bin: raw read: requested bytes \[10000, 10241\) reach past"):
        read_file_ranges(str(path), [(10000, 241)], "cpu", _SETTINGS)

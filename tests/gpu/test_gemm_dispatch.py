"""The GEMM dispatch table on the GPU: every entry names a built kernel, and for every shape the
table holds the chosen backend matches an fp32 reference (checked on sampled rows so that the
largest shapes stay cheap); unknown shapes fall back to cuBLAS / the GEMV."""

import pytest
import torch

from rtpllm.layers import gemm_dispatch
from rtpllm.layers.gemm_dispatch import CUBLAS, GEMV, DEFAULT_TABLE, GemmTable, choose, linear
from rtpllm.layers.sm90_gemm import kernels

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                                reason="the dispatch table is measured on Hopper")


def table_shapes():
    if not DEFAULT_TABLE.exists():
        return []
    table = GemmTable.load(DEFAULT_TABLE, None, torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    return sorted(table.entries)


def test_every_entry_names_a_built_kernel():
    GemmTable.load(DEFAULT_TABLE, set(kernels()))  # raises naming the entry otherwise


@pytest.mark.parametrize("dtype_name, n, k, bucket", table_shapes())
def test_table_choice_matches_fp32(dtype_name, n, k, bucket):
    dtype = getattr(torch, dtype_name)
    # The bucket's top and an odd M inside it.
    ms = sorted({bucket, max(1, bucket - bucket // 3 - 1)})
    w = torch.randn(n, k, device="cuda", dtype=dtype) / k ** 0.5
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        y = linear(x, w)
        rows = torch.randperm(m, device="cuda")[:64]
        expected = x[rows].float() @ w.float().T
        error = ((y[rows].float() - expected).norm() / expected.norm()).item()
        assert not y[rows].isnan().any()
        assert error < 8e-3, f"{choose(m, n, k, dtype)} at m={m}: relative error {error:.2e}"


def test_unknown_shapes_fall_back():
    assert choose(3, 136, 72, torch.bfloat16) == GEMV
    assert choose(33, 136, 72, torch.bfloat16) == CUBLAS
    x = torch.randn(33, 72, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(136, 72, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(linear(x, w), torch.nn.functional.linear(x, w))


def test_forced_sm90_kernels_are_built():
    assert {gemm_dispatch.FORCED_SM90_DECODE.kernel, gemm_dispatch.FORCED_SM90_PREFILL.kernel} <= set(kernels())


def test_cublas_override(monkeypatch):
    monkeypatch.setenv("RTPLLM_GEMM", "cublas")
    gemm_dispatch.choose.cache_clear()
    try:
        assert choose(1, 4096, 4096, torch.bfloat16) == CUBLAS
    finally:
        monkeypatch.delenv("RTPLLM_GEMM")
        gemm_dispatch.choose.cache_clear()

"""The GEMM dispatch table on the GPU: every entry names a built kernel, and for every shape the
table holds the chosen backend matches an fp32 reference (checked on sampled rows so that the
largest shapes stay cheap); unknown shapes fall back to cuBLAS / the GEMV; the norm-fused
projection agrees with the separate norm and projection."""

import pytest
import torch

from rtpllm.layers import gemm_dispatch
from rtpllm.layers.gemm_dispatch import (CUBLAS, GEMV, DEFAULT_TABLE, GemmTable, choose, linear, linear_silu_and_mul,
                                         norm_linear)
from rtpllm.layers.norm import RMSNorm
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


@pytest.mark.parametrize("m", [1, 4, 9])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_norm_linear_agrees_with_the_norm_then_the_projection(m, gated, with_residual):
    """Decode sizes take the GEMV's norm prologue, larger ones the norm kernel and a GEMM: both give
    the same residual stream, and projections within bf16 rounding of each other."""
    k, n = 1024, 136  # not in the table: the GEMV for m <= 4, cuBLAS above
    norm = RMSNorm(k, 1e-5, torch.bfloat16).cuda()
    norm.weight.copy_(1 + 0.2 * torch.randn(k))
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn(m, k, device="cuda", dtype=torch.bfloat16) if with_residual else None
    w = torch.randn(2 * n if gated else n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
    y, stream = norm_linear(norm, x.clone(), None if residual is None else residual.clone(), w, gated=gated)
    if residual is None:
        hidden, expected_stream = norm(x.clone()), x
    else:
        hidden, expected_stream = norm(x.clone(), residual.clone())
    expected = linear_silu_and_mul(hidden, w) if gated else linear(hidden, w)
    assert torch.equal(stream, expected_stream)
    if m > 4:
        assert torch.equal(y, expected), "the same kernels as the separate norm and projection"
    error = ((y.float() - expected.float()).norm() / expected.float().norm()).item()
    assert error < 1e-2, f"relative error {error:.2e}"

"""The CUTLASS sm90 GEMMs against an fp32 reference: every built kernel, both dtypes, odd sizes (M
and N, K off the tile), split-K and stream-K, bias and residual epilogues; the output is poisoned
with NaN first so an element a kernel forgets to write fails the test."""

import pytest
import torch

from rtpllm.layers.sm90_gemm import kernels, sm90_gemm, sm90_gemm_applies, workspace_bytes_needed

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                                reason="the sm90 kernels need a Hopper GPU")

KERNELS = sorted(kernels()) if torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0) else []
SHAPES = [(1, 128, 64), (3, 1000, 1000), (17, 264, 4104), (100, 4096, 512), (300, 1032, 2056)]  # (M, N, K)
# Relative Frobenius error of a 16-bit output against fp32: bf16 keeps 8 bits, fp16 11.
TOLERANCE = {torch.bfloat16: 8e-3, torch.float16: 1.5e-3}


def operands(m, n, k, dtype, *, bias=False, residual=False):
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    w = torch.randn(n, k, device="cuda", dtype=dtype) / k ** 0.5
    b = torch.randn(n, device="cuda", dtype=dtype) if bias else None
    r = torch.randn(m, n, device="cuda", dtype=dtype) if residual else None
    return x, w, b, r


def reference(x, w, b=None, r=None):
    y = x.float() @ w.float().T
    if b is not None:
        y = y + b.float()
    if r is not None:
        y = y + r.float()
    return y


def run_checked(x, w, b, r, kernel, splits):
    out = torch.full((x.shape[0], w.shape[0]), float("nan"), device="cuda", dtype=x.dtype)
    y = sm90_gemm(x, w, b, r, kernel=kernel, splits=splits, out=out)
    assert y is out
    assert not y.isnan().any(), f"{kernel}: every output element is written"
    expected = reference(x, w, b, r)
    error = ((y.float() - expected).norm() / expected.norm()).item()
    assert error < TOLERANCE[x.dtype], f"{kernel} splits={splits}: relative error {error:.2e}"


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m, n, k", SHAPES)
def test_every_kernel_matches_fp32(kernel, dtype, m, n, k):
    x, w, _, _ = operands(m, n, k, dtype)
    run_checked(x, w, None, None, kernel, 1)


@pytest.mark.parametrize("kernel", [k for k in KERNELS if kernels()[k].stream_k])
@pytest.mark.parametrize("splits", [0, 2, 3, 7])
@pytest.mark.parametrize("m, n, k", [(1, 128, 64), (5, 4096, 4104), (64, 1032, 14336)])
def test_split_k_and_stream_k_match_fp32(kernel, splits, m, n, k):
    x, w, _, _ = operands(m, n, k, torch.bfloat16)
    run_checked(x, w, None, None, kernel, splits)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("bias, residual", [(True, False), (False, True), (True, True)])
def test_bias_and_residual_epilogues(kernel, bias, residual):
    x, w, b, r = operands(37, 1000, 520, torch.bfloat16, bias=bias, residual=residual)
    splits = 3 if kernels()[kernel].stream_k else 1
    run_checked(x, w, b, r, kernel, splits)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("swizzle", [2, 8])
def test_swizzled_rasterization_matches_fp32(kernel, swizzle):
    x, w, _, _ = operands(1000, 2056, 264, torch.bfloat16)
    out = torch.full((1000, 2056), float("nan"), device="cuda", dtype=torch.bfloat16)
    sm90_gemm(x, w, kernel=kernel, swizzle=swizzle, out=out)
    expected = reference(x, w)
    assert not out.isnan().any()
    assert ((out.float() - expected).norm() / expected.norm()).item() < 8e-3


def test_strided_rows_in_and_out():
    x_base = torch.randn(20, 4096 + 64, device="cuda", dtype=torch.bfloat16)
    x = x_base[:, :4096]
    w = torch.randn(1024, 4096, device="cuda", dtype=torch.bfloat16) / 64
    r_base = torch.randn(20, 1024 + 8, device="cuda", dtype=torch.bfloat16)
    r = r_base[:, :1024]
    out_base = torch.full((20, 1024 + 16), float("nan"), device="cuda", dtype=torch.bfloat16)
    out = out_base[:, :1024]
    for kernel in KERNELS:
        out.fill_(float("nan"))
        sm90_gemm(x, w, None, r, kernel=kernel, out=out)
        expected = reference(x, w, None, r)
        assert ((out.float() - expected).norm() / expected.norm()).item() < 8e-3, kernel
        assert out_base[:, 1024:].isnan().all(), f"{kernel} wrote past the row's end"


def test_workspace_fits_the_decode_shapes():
    x = torch.randn(64, 14336, device="cuda", dtype=torch.bfloat16)
    w = torch.empty(4096, 14336, device="cuda", dtype=torch.bfloat16)
    for kernel in (k for k in KERNELS if kernels()[k].stream_k):
        for splits in (0, 2, 8):
            assert workspace_bytes_needed(x, w, kernel=kernel, splits=splits) <= 64 << 20


def test_rejects_what_it_cannot_serve():
    kernel = KERNELS[0]
    w = torch.randn(128, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="kernel:"):
        sm90_gemm(torch.randn(2, 64, device="cuda", dtype=torch.bfloat16), w, kernel="no_such_kernel")
    odd_n = torch.randn(100 + 4, 64, device="cuda", dtype=torch.bfloat16)[:101]
    assert not sm90_gemm_applies(torch.randn(2, 64, device="cuda", dtype=torch.bfloat16), odd_n.contiguous())
    with pytest.raises(ValueError, match="x:"):
        sm90_gemm(torch.randn(2, 64, device="cuda", dtype=torch.bfloat16), odd_n.contiguous(), kernel=kernel)
    with pytest.raises(ValueError, match="x:"):
        sm90_gemm(torch.randn(2, 64, device="cuda", dtype=torch.float32), w.float(), kernel=kernel)
    with pytest.raises(ValueError, match="bias:"):
        sm90_gemm(torch.randn(2, 64, device="cuda", dtype=torch.bfloat16), w,
                  torch.randn(127, device="cuda", dtype=torch.bfloat16), kernel=kernel)
    with pytest.raises(ValueError, match="residual:"):
        sm90_gemm(torch.randn(2, 64, device="cuda", dtype=torch.bfloat16), w,
                  residual=torch.randn(3, 128, device="cuda", dtype=torch.bfloat16), kernel=kernel)
    persistent = next(k for k in KERNELS if not kernels()[k].stream_k)
    with pytest.raises(ValueError, match="splits:"):
        sm90_gemm(torch.randn(2, 64, device="cuda", dtype=torch.bfloat16), w, kernel=persistent, splits=2)
    with pytest.raises(ValueError, match="swizzle:"):
        sm90_gemm(torch.randn(2, 64, device="cuda", dtype=torch.bfloat16), w, kernel=kernel, swizzle=3)

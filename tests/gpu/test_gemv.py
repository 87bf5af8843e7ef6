"""The decode GEMV kernel against an fp32 reference: odd sizes, biases, strided rows, every output written."""

import pytest
import torch

from rtpllm.layers import cuda_ops
from rtpllm.layers.cuda_gemm import gemv, gemv_silu_and_mul


def reference(x, w, bias):
    y = x.float() @ w.float().T
    return y if bias is None else y + bias.float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("n, k", [(1, 8), (17, 64), (1000, 4096), (4096, 14336), (6145, 520), (3, 3000 * 8)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv_matches_fp32_reference(dtype, m, n, k, with_bias):
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    w = torch.randn(n, k, device="cuda", dtype=dtype) / k ** 0.5
    bias = torch.randn(n, device="cuda", dtype=dtype) if with_bias else None
    y = gemv(x, w, bias)
    expected = reference(x, w, bias)
    assert not y.isnan().any(), "every output element is written"
    error = ((y.float() - expected).norm() / expected.norm()).item()
    assert error < 8e-3, f"relative error {error:.2e}"


def test_gemv_reads_strided_activation_rows():
    base = torch.randn(3, 4096 + 64, device="cuda", dtype=torch.bfloat16)
    x = base[:, :4096]  # row stride 4160: a view into a wider buffer
    w = torch.randn(512, 4096, device="cuda", dtype=torch.bfloat16) / 64
    expected = reference(x, w, None)
    error = ((gemv(x, w).float() - expected).norm() / expected.norm()).item()
    assert error < 8e-3


def test_gemv_rejects_what_it_cannot_serve():
    w = torch.randn(16, 100, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="x:"):
        gemv(torch.randn(1, 100, device="cuda", dtype=torch.bfloat16), w)  # k not a multiple of 8
    with pytest.raises(ValueError, match="x:"):
        gemv(torch.randn(1, 96, device="cuda", dtype=torch.float32), w[:, :96].float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 4])
@pytest.mark.parametrize("n, k", [(1, 8), (17, 64), (14336, 4096), (1001, 520)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv_silu_and_mul_equals_the_unfused_path(dtype, m, n, k, with_bias):
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    gate_up = torch.randn(2 * n, k, device="cuda", dtype=dtype) / k ** 0.5
    bias = torch.randn(2 * n, device="cuda", dtype=dtype) if with_bias else None
    fused = gemv_silu_and_mul(x, gate_up, bias)
    if n % 8 == 0:  # widths the unfused silu_and_mul kernel takes
        unfused = cuda_ops.silu_and_mul(gemv(x, gate_up, bias))
        assert torch.equal(fused, unfused), "rounds exactly where gemv + silu_and_mul round"
    gate, up = reference(x, gate_up, bias).chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    error = ((fused.float() - expected).norm() / expected.norm()).item()
    assert error < 1.5e-2, f"relative error {error:.2e}"


def test_gemv_silu_and_mul_rejects_odd_rows():
    with pytest.raises(ValueError, match="gate_up:"):
        gemv_silu_and_mul(torch.randn(1, 64, device="cuda", dtype=torch.bfloat16),
                          torch.randn(33, 64, device="cuda", dtype=torch.bfloat16))

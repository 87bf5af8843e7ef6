"""The decode GEMV kernel against an fp32 reference: odd sizes, biases, strided rows, every output written."""

import pytest
import torch

from rtpllm.layers.cuda_gemm import gemv, gemv_applies, linear


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


def test_linear_falls_back_beyond_the_gemv_sizes():
    x = torch.randn(33, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(128, 256, device="cuda", dtype=torch.bfloat16)
    assert not gemv_applies(x, w)
    torch.testing.assert_close(linear(x, w), torch.nn.functional.linear(x, w))


def test_gemv_rejects_what_it_cannot_serve():
    w = torch.randn(16, 100, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="x:"):
        gemv(torch.randn(1, 100, device="cuda", dtype=torch.bfloat16), w)  # k not a multiple of 8
    with pytest.raises(ValueError, match="x:"):
        gemv(torch.randn(1, 96, device="cuda", dtype=torch.float32), w[:, :96].float())

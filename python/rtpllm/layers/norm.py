"""RMSNorm, optionally fused with the residual add that precedes it in every decoder layer."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from rtpllm.layers.cuda_dispatch import use_cuda_kernels


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim, computed in float32.

    NOTE: the order of casts matches Hugging Face Llama (normalize in float32, cast back to the
    input dtype, then scale by the weight), so bf16 outputs round the same way.
    """

    def __init__(self, hidden_size: int, eps: float, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        """Without `residual`: returns norm(x). With it: adds it to x first and returns
        (norm(x + residual), x + residual); the sum is the next layer's residual stream.

        On a GPU with our kernels, one fused kernel does both in place (x and residual are
        scratch of the decoder layer, so overwriting them is safe)."""
        if use_cuda_kernels(x) and (x.dim() == 2 or x.is_contiguous()):
            from rtpllm.layers import cuda_ops

            if residual is None:
                return cuda_ops.rms_norm(x, self.weight, self.eps)
            if x.dim() == 2:
                cuda_ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
                return x, residual
        if residual is not None:
            x = x + residual
            return self._normalize(x), x
        return self._normalize(x)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"

"""The gated activation of Llama-family MLPs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rtpllm.layers.cuda_dispatch import use_cuda_kernels


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2 * d] (gate then up, as the fused gate_up projection lays them out) -> silu(gate) * up [..., d]."""
    if use_cuda_kernels(gate_up) and gate_up.dim() == 2 and gate_up.shape[1] % 16 == 0:
        from rtpllm.layers import cuda_ops

        return cuda_ops.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up

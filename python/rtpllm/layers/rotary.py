"""Rotary position embeddings (RoPE) in the "rotate half" layout that Hugging Face Llama uses.

`RopeConfig` says how the rotation frequencies are derived (plain, linear scaling, or Llama 3.1's
wavelength-dependent scaling); `RotaryEmbedding` turns that into a cos/sin table indexed by
position and rotates q and k with it. Attention backends own the call, so a CUDA backend can read
the same table inside a fused RoPE + KV-cache-write kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

ROPE_SCALINGS = ("none", "linear", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    scaling: str = "none"  # one of ROPE_SCALINGS
    factor: float = 1.0  # linear / llama3: how much longer the context is than in pretraining
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: Optional[int] = None  # llama3 only: the pretraining context
    # GGUF files carry Llama 3.1's scaling as one divisor per frequency (tensor `rope_freqs.weight`)
    # instead of the four llama3 numbers above; applied before any linear scaling, as llama.cpp does.
    freq_factors: Optional[tuple[float, ...]] = None

    def __post_init__(self) -> None:
        if not self.theta > 0:
            raise ValueError(f"rope.theta: must be positive, got {self.theta}")
        if self.scaling not in ROPE_SCALINGS:
            raise ValueError(f"rope.scaling: {self.scaling!r} is not supported (supported: {ROPE_SCALINGS})")
        if self.scaling != "none" and not self.factor > 0:
            raise ValueError(f"rope.factor: must be positive for {self.scaling} scaling, got {self.factor}")
        if self.scaling == "llama3":
            if self.original_max_position_embeddings is None or self.original_max_position_embeddings <= 0:
                raise ValueError("rope.original_max_position_embeddings: llama3 scaling needs a positive value, "
                                 f"got {self.original_max_position_embeddings}")
            if not self.high_freq_factor > self.low_freq_factor > 0:
                raise ValueError("rope: llama3 scaling needs high_freq_factor > low_freq_factor > 0, got "
                                 f"{self.high_freq_factor} and {self.low_freq_factor}")
        if self.freq_factors is not None:
            if any(not f > 0 for f in self.freq_factors):
                raise ValueError("rope.freq_factors: every factor must be positive")
            if self.scaling == "llama3":
                raise ValueError("rope.freq_factors: already encode llama3 scaling; give one or the other")


def rope_inv_freq(rope: RopeConfig, rotary_dim: int) -> torch.Tensor:
    """The rotation frequency of each pair of dimensions, float32 [rotary_dim // 2], on the default device."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).to(torch.float32) / rotary_dim
    inv_freq = 1.0 / (rope.theta ** exponents)
    if rope.freq_factors is not None:
        if len(rope.freq_factors) != rotary_dim // 2:
            raise ValueError(f"rope.freq_factors: expected {rotary_dim // 2} factors for rotary dim {rotary_dim}, "
                             f"got {len(rope.freq_factors)}")
        inv_freq = inv_freq / torch.tensor(rope.freq_factors, dtype=torch.float32)
    if rope.scaling == "linear":
        return inv_freq / rope.factor
    if rope.scaling == "llama3":
        return _llama3_scaled(inv_freq, rope)
    return inv_freq


def _llama3_scaled(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    # Llama 3.1: long wavelengths (beyond the pretraining context / low_freq_factor) are slowed down
    # by `factor`, short ones are kept, and the band in between is interpolated smoothly.
    old_context = rope.original_max_position_embeddings
    low_freq_wavelen = old_context / rope.low_freq_factor
    high_freq_wavelen = old_context / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_context / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Rotates q and k by position. The table is float32 [max_positions, head_dim]: cos of each
    frequency in the first half, sin in the second, built on the device current at construction.

    NOTE: the table stays float32 even in a bf16 model: rounding cos/sin to bf16 visibly shifts
    far positions. Build the model in its final dtype rather than calling `.to(dtype)` on it.
    """

    def __init__(self, head_dim: int, rope: RopeConfig, max_positions: int):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim: RoPE needs an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        self.max_positions = max_positions
        inv_freq = rope_inv_freq(rope, head_dim)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32, device=inv_freq.device), inv_freq)
        self.register_buffer("cos_sin_cache", torch.cat([freqs.cos(), freqs.sin()], dim=-1), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions int64 [T]; q [T, num_heads, head_dim]; k [T, num_kv_heads, head_dim]."""
        cos, sin = self.cos_sin_cache.index_select(0, positions).unsqueeze(1).chunk(2, dim=-1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

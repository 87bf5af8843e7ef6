"""Builds the speculative decoder a SpeculativeConfig asks for (the engine's one entry point)."""

from __future__ import annotations

from typing import Optional

import torch

from rtpllm.config import SpeculativeConfig
from rtpllm.spec.decoder import SpeculativeDecoder


def build_speculative_decoder(config: SpeculativeConfig, *, target_model, target_arch, device: torch.device,
                              dtype: torch.dtype, block_size: int, attn_backend_factory,
                              max_model_len: int, target_path: Optional[str] = None) -> SpeculativeDecoder:
    """Loads what the method needs (a draft checkpoint, EAGLE-3 heads) and checks it against the
    target: a draft must share the target's vocabulary. Raises ValueError naming the field."""
    if config.method == "ngram":
        from rtpllm.spec.ngram import NgramProposer
        return SpeculativeDecoder(config, NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max, device),
                                  device)
    if config.method == "draft_model":
        from rtpllm.spec.draft_model import DraftModelProposer
        proposer = DraftModelProposer.load(config.model, target_arch=target_arch, device=device, dtype=dtype,
                                           block_size=block_size, attn_backend_factory=attn_backend_factory)
        if proposer.arch.max_position_embeddings < max_model_len:
            raise ValueError(f"speculative_config.model: the draft serves contexts up to "
                             f"{proposer.arch.max_position_embeddings} tokens, max_model_len is {max_model_len}; "
                             f"lower max_model_len or pick another draft")
        return SpeculativeDecoder(config, proposer, device, draft_param_ratio=_param_ratio(proposer.model, target_model))
    from rtpllm.spec.eagle3 import Eagle3Proposer
    proposer = Eagle3Proposer.load(config.model, target_model=target_model, target_arch=target_arch, device=device,
                                   dtype=dtype, block_size=block_size, attn_backend_factory=attn_backend_factory,
                                   target_path=target_path)
    return SpeculativeDecoder(config, proposer, device, draft_param_ratio=_param_ratio(proposer.model, target_model))


def _param_ratio(draft: torch.nn.Module, target: torch.nn.Module) -> float:
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return count(draft) / max(count(target), 1)

"""EAGLE-3 drafting (Li et al. 2025) in the checkpoint layout vLLM and SGLang load.

An EAGLE-3 head is one decoder layer that drafts from the target's own features: the residual
stream entering three target layers (low, middle, high; `eagle_aux_hidden_state_layer_ids`, by
default layers 2, L/2 and L-3) is concatenated and projected by `fc` to one hidden vector per
token. The layer's attention reads [input_layernorm(embed(next token)), hidden_norm(feature)]
(twice the hidden size wide); a final norm and `lm_head` give logits over a smaller draft
vocabulary, mapped to target ids by `d2t` (target id = draft id + d2t[draft id]).

Checkpoint (config.json + safetensors): `midlayer.{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj,
input_layernorm, hidden_norm, post_attention_layernorm}.weight`, `fc.weight` [hidden, 3 * target
hidden], `norm.weight`, `lm_head.weight` [draft vocab, hidden], `d2t` [draft vocab], `t2d` (unused),
optionally `embed_tokens.weight` (else the target's embedding is shared). config.json: a Llama
config with `num_hidden_layers` 1, `draft_vocab_size`, optional `target_hidden_size`,
`norm_before_residual`, `eagle_aux_hidden_state_layer_ids`.

Alignment: draft row i sits at position i and reads (feature of target position i, token i + 1),
so it predicts token i + 2. The target writes its features for every token it computes into a
per-slot feature cache (same block ids as its KV, like the draft model's KV pool); a proposal
first catches the draft's KV up over the positions verified since the last one (with the
target's features), then extends with its own hidden state as the feature for each new draft.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Iterable, Optional

import numpy as np
import torch
from torch import nn

from rtpllm.engine.kv_cache import allocate_kv_caches, kv_bytes_per_block
from rtpllm.layers.linear import Embedding, FusedLinear, Linear, copy_checked
from rtpllm.layers.norm import RMSNorm
from rtpllm.layers.parallel import VocabParallelEmbedding
from rtpllm.layers.rotary import RotaryEmbedding
from rtpllm.layers.torch_attention import TorchAttentionBackend
from rtpllm.loader.hf_checkpoint import iter_safetensors, safetensors_files
from rtpllm.models.llama import LlamaAttention, LlamaMLP
from rtpllm.models.llama_arch import LlamaArch
from rtpllm.spec.draft_model import DraftModelProposer, _DraftState, draft_metadata
from rtpllm.spec.penalties import DraftPenalties
from rtpllm.spec.proposer import Proposal, SpecSequence, to_device

_FIELD = "speculative_config.model"
_FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
          "up_proj": "gate_up_proj"}


def default_aux_layers(num_target_layers: int) -> tuple[int, ...]:
    return (2, num_target_layers // 2, num_target_layers - 3)


class Eagle3Head(nn.Module):
    def __init__(self, arch: LlamaArch, target_hidden_size: int, draft_vocab_size: int, target_vocab_size: int,
                 norm_before_residual: bool, own_embedding: bool, rotary: RotaryEmbedding, backend,
                 dtype: Optional[torch.dtype]):
        super().__init__()
        h = arch.hidden_size
        self.norm_before_residual = norm_before_residual
        self.target_vocab_size = target_vocab_size
        self.fc = Linear(3 * target_hidden_size, h, bias=False, dtype=dtype)
        self.input_layernorm = RMSNorm(h, arch.rms_norm_eps, dtype)
        self.hidden_norm = RMSNorm(h, arch.rms_norm_eps, dtype)
        self.self_attn = LlamaAttention(arch, rotary, backend, dtype)
        # The attention reads the embedding and the feature side by side: twice the width.
        self.self_attn.qkv_proj = FusedLinear(
            2 * h, [("q_proj", arch.q_size), ("k_proj", arch.kv_size), ("v_proj", arch.kv_size)],
            bias=arch.qkv_bias, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(h, arch.rms_norm_eps, dtype)
        self.mlp = LlamaMLP(arch, dtype)
        self.norm = RMSNorm(h, arch.rms_norm_eps, dtype)
        self.lm_head = Linear(h, draft_vocab_size, bias=False, dtype=dtype)
        self.embed_tokens = Embedding(target_vocab_size, h, dtype) if own_embedding else None
        self.register_buffer("d2t", torch.zeros(draft_vocab_size, dtype=torch.int64))

    def combine(self, aux: list[torch.Tensor]) -> torch.Tensor:
        """The target's three aux hidden states [T, target hidden] -> features [T, hidden]."""
        return self.fc(torch.cat(aux, dim=-1))

    def forward(self, embeds: torch.Tensor, features: torch.Tensor, positions: torch.Tensor,
                kv_cache: torch.Tensor, meta) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (normed hidden for the logits, the pre-norm hidden the next draft step reads)."""
        embeds = self.input_layernorm(embeds)
        if self.norm_before_residual:
            feature = self.hidden_norm(features)
            residual = feature.clone()
        else:
            residual = features.clone()
            feature = self.hidden_norm(features)
        x = self.self_attn(positions, torch.cat([embeds, feature], dim=-1), kv_cache, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        x = self.mlp(x)
        normed, prenorm = self.norm(x, residual)
        return normed, prenorm

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the target vocabulary: draft ids mapped by d2t, -inf for ids it cannot draft."""
        draft = torch.nn.functional.linear(hidden, self.lm_head.weight).float()
        full = draft.new_full((draft.shape[0], self.target_vocab_size), float("-inf"))
        targets = torch.arange(draft.shape[1], device=draft.device) + self.d2t
        full[:, targets] = draft
        return full

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
        params = dict(self.named_parameters())
        params["d2t"] = self.d2t
        loaded: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            for prefix in ("midlayer.", "layers.0."):
                if name.startswith(prefix):
                    name = name[len(prefix):]
            if name == "t2d":
                continue
            parts = name.rsplit(".", 2)
            if len(parts) == 3 and parts[1] in _FUSED:
                module = self.get_submodule(f"{parts[0]}.{_FUSED[parts[1]]}")
                copy_checked(module.shard_view(parts[1], parts[2], name), tensor, name)
            elif name == "d2t":
                if tensor.shape != self.d2t.shape:
                    raise ValueError(f"{_FIELD}: {source}: d2t has shape {list(tensor.shape)}, expected "
                                     f"{list(self.d2t.shape)}")
                self.d2t.copy_(tensor.to(torch.int64))
            elif name in params:
                copy_checked(params[name], tensor, name)
            else:
                raise ValueError(f"{_FIELD}: {source}: unexpected tensor {name!r} in an EAGLE-3 checkpoint")
            loaded.add(name)
        expected = {n for n in params if n != "d2t"} | {"d2t"}
        fused = {f"{m}.{s}.weight" for m, shards in (("self_attn", ("q_proj", "k_proj", "v_proj")),
                                                     ("mlp", ("gate_proj", "up_proj"))) for s in shards}
        expected = (expected - {"self_attn.qkv_proj.weight", "mlp.gate_up_proj.weight"}) | fused
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"{_FIELD}: {source} is missing EAGLE-3 tensor(s) {missing[:6]}")
        targets = torch.arange(self.d2t.shape[0]) + self.d2t.cpu()
        if int(targets.min()) < 0 or int(targets.max()) >= self.target_vocab_size:
            raise ValueError(f"{_FIELD}: {source}: d2t maps draft ids outside the target's vocabulary "
                             f"of {self.target_vocab_size}")


class Eagle3Proposer(DraftModelProposer):
    name = "eagle3"
    needs_target_features = True

    def __init__(self, head: Eagle3Head, arch: LlamaArch, target_model, aux_layers: tuple[int, ...],
                 device: torch.device, dtype: torch.dtype, block_size: int):
        super().__init__(head, arch, device, dtype, block_size)
        self.head = head
        self.target_model = target_model
        self.aux_layers = aux_layers
        feature_bytes = block_size * arch.hidden_size * torch.empty((), dtype=dtype).element_size()
        self.kv_bytes_per_block = kv_bytes_per_block(1, arch.num_kv_heads, arch.head_dim, block_size, dtype) \
            + feature_bytes
        self.features: Optional[torch.Tensor] = None  # [num_blocks * block_size, hidden]: per KV slot
        target_model.aux_hidden_layers = aux_layers

    @classmethod
    def load(cls, path: str, *, target_model, target_arch, device: torch.device, dtype: torch.dtype,
             block_size: int, attn_backend_factory: Optional[Callable] = None,
             target_path: Optional[str] = None) -> "Eagle3Proposer":
        """`target_path`: the target's checkpoint, read for its embedding when the target's is split
        over tensor-parallel ranks and the head has none of its own."""
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{_FIELD}: {config_path} does not exist")
        with open(config_path) as f:
            config = json.load(f)
        vocab = config.get("vocab_size")
        if vocab != target_arch.vocab_size:
            raise ValueError(f"{_FIELD}: the EAGLE-3 head's vocabulary has {vocab} tokens, the target's "
                             f"{target_arch.vocab_size}")
        if config.get("num_hidden_layers", 1) != 1:
            raise ValueError(f"{_FIELD}: EAGLE-3 heads with {config['num_hidden_layers']} layers are not "
                             "supported (one decoder layer)")
        arch = LlamaArch.from_hf_config({**config, "architectures": ["LlamaForCausalLM"]}, config_path)
        target_hidden = int(config.get("target_hidden_size") or arch.hidden_size)
        if target_hidden != target_arch.hidden_size:
            raise ValueError(f"{_FIELD}: the head expects target hidden size {target_hidden}, the target has "
                             f"{target_arch.hidden_size}")
        eagle = config.get("eagle_config") or {}
        aux = tuple(config.get("eagle_aux_hidden_state_layer_ids") or eagle.get("eagle_aux_hidden_state_layer_ids")
                    or default_aux_layers(target_arch.num_layers))
        if len(aux) != 3 or not all(0 <= a < target_arch.num_layers for a in aux):
            raise ValueError(f"{_FIELD}: eagle_aux_hidden_state_layer_ids must be three layer indices in "
                             f"[0, {target_arch.num_layers}), got {list(aux)}")
        files = safetensors_files(path)
        names = set()
        for name, _ in iter_safetensors(files):
            names.add(name.removeprefix("model."))
        backend = attn_backend_factory(arch) if attn_backend_factory is not None else TorchAttentionBackend()
        with torch.device(device):
            # On the device from the start: the CUDA attention backend reads its cos/sin table as built.
            rotary = RotaryEmbedding(arch.head_dim, arch.rope,
                                     max(arch.max_position_embeddings, target_arch.max_position_embeddings))
            head = Eagle3Head(arch, target_hidden, int(config.get("draft_vocab_size") or vocab), vocab,
                              bool(config.get("norm_before_residual", False)), "embed_tokens.weight" in names,
                              rotary, backend, dtype)
        head.load_weights(iter_safetensors(files), path)
        if head.embed_tokens is None and isinstance(target_model.model.embed_tokens, VocabParallelEmbedding):
            head.embed_tokens = _whole_target_embedding(target_path, target_arch, dtype)
        head.to(device)
        return cls(head, arch, target_model, aux, device, dtype, block_size)

    def capture_graphs(self, runner) -> None:
        pass  # the head runs eagerly (its forward takes the features as well as the tokens)

    def bind(self, num_blocks: int) -> None:
        self.kv_caches = allocate_kv_caches(1, num_blocks, self.block_size, self.arch.num_kv_heads, self.arch.head_dim,
                                            self.dtype, self.device)
        self.features = torch.zeros(num_blocks * self.block_size, self.arch.hidden_size, dtype=self.dtype,
                                    device=self.device)

    @torch.inference_mode()
    def record_features(self, slot_mapping: torch.Tensor) -> None:
        """After a target forward: its tokens' features into their KV slots."""
        aux = self.target_model.aux_hidden_states
        self.features.index_copy_(0, slot_mapping.long(), self.head.combine(aux).to(self.dtype))

    def _embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        embed = self.head.embed_tokens or self.target_model.model.embed_tokens
        return embed(token_ids)

    @torch.inference_mode()
    def propose(self, batch, seqs: list[SpecSequence]) -> Proposal:
        rows = [batch.block_tables[seq.batch_index] for seq in seqs]
        lengths = [seq.token_ids.shape[0] for seq in seqs]
        # Row i reads token i + 1: rows start .. n - 2 catch up with the target's features.
        starts = [min(self._valid_prefix(seq, row), n - 2) for seq, row, n in zip(seqs, rows, lengths)]
        sampling = self._sampling_batch(seqs)
        self._penalties = DraftPenalties.build(seqs, self.device)  # drafts see the penalised view too
        inputs = [seq.token_ids[s + 1:n] for seq, s, n in zip(seqs, starts, lengths)]
        lens = np.array([x.shape[0] for x in inputs], dtype=np.int64)
        positions = np.concatenate([np.arange(s, s + m) for s, m in zip(starts, lens)])
        token_ids = to_device(np.concatenate(inputs).astype(np.int64), self.device)
        meta, pos, last = draft_metadata(positions, np.repeat(np.arange(len(seqs)), lens),
                                         np.asarray(starts, dtype=np.int64), lens, rows, self.block_size, self.device)
        features = self.features.index_select(0, meta.slot_mapping)
        normed, prenorm = self.head(self._embed(token_ids), features, pos, self.kv_caches[0], meta)
        drafts, probs = self._draw(self.head.compute_logits(normed.index_select(0, last)), sampling,
                                   list(range(len(seqs))))
        hidden = prenorm.index_select(0, last)
        steps_tokens, steps_probs = [drafts], [probs]
        active = list(range(len(seqs)))
        for j in range(1, max(seq.num_drafts for seq in seqs)):
            keep = [i for i, s in enumerate(active) if seqs[s].num_drafts > j]
            active = [active[i] for i in keep]
            index = to_device(keep, self.device, torch.int64)
            prev, hidden = steps_tokens[-1].index_select(0, index), hidden.index_select(0, index)
            pos_np = np.array([lengths[i] - 2 + j for i in active], dtype=np.int64)
            meta, pos, _ = draft_metadata(pos_np, np.arange(len(active)), pos_np, np.ones(len(active), dtype=np.int64),
                                          [rows[i] for i in active], self.block_size, self.device)
            normed, hidden = self.head(self._embed(prev), hidden, pos, self.kv_caches[0], meta)
            drafts, probs = self._draw(self.head.compute_logits(normed), sampling, active)
            steps_tokens.append(drafts)
            steps_probs.append(probs)
        for seq, row, n in zip(seqs, rows, lengths):
            # Rows up to n - 2 used the target's features; later ones the draft's own: redone next time.
            self._states[seq.seq_id] = _DraftState(valid=n - 1, blocks=tuple(row[:-(-(n - 1) // self.block_size)]))
        return self._assemble(seqs, steps_tokens, steps_probs)

    def verified(self, seq_id: int, num_accepted: int) -> None:
        pass  # the KV rows written with the target's features stay valid whatever was accepted


def _whole_target_embedding(target_path: Optional[str], target_arch: LlamaArch, dtype: torch.dtype) -> Embedding:
    """Tensor parallelism: each rank holds a slice of the target's vocabulary, and looking a token up
    is an all-reduce over the ranks; the head runs on rank 0 alone, so it gets the whole table (one
    more copy of the embedding on rank 0), read from the target's safetensors checkpoint."""
    from rtpllm.loader.safetensors_loader import read_tensors

    try:
        files = safetensors_files(target_path) if target_path is not None else []
    except FileNotFoundError:
        files = []
    if not files:
        raise ValueError(f"{_FIELD}: EAGLE-3 with tensor parallelism reads the target's embedding from its "
                         f"safetensors checkpoint, and {target_path!r} has none (a GGUF target, or a head with "
                         f"embed_tokens.weight of its own, would do)")
    name = "model.embed_tokens.weight"
    weight = read_tensors(files, [name])[name]
    if tuple(weight.shape) != (target_arch.vocab_size, target_arch.hidden_size):
        raise ValueError(f"{_FIELD}: the target's {name} is {list(weight.shape)}, expected "
                         f"[{target_arch.vocab_size}, {target_arch.hidden_size}]")
    embedding = Embedding(target_arch.vocab_size, target_arch.hidden_size, dtype)
    with torch.no_grad():
        embedding.weight.copy_(weight.to(dtype))
    return embedding

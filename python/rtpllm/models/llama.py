"""One model definition for the Llama family: Llama 2/3, Mistral, Qwen2 and Qwen3.

The variants differ only in switches on `LlamaArch` (q/k/v and o biases, Qwen3's per-head q/k
RMSNorm, tied embeddings, RoPE scaling). Parameter names follow the Hugging Face checkpoints,
except that q/k/v and gate/up are fused into `qkv_proj` and `gate_up_proj` so one GEMM computes
each; `load_weights` is the one place that maps checkpoint tensors onto parameters.

Forward contract (see docs/architecture.md, "Models"):
    hidden = model(input_ids [T] int64, positions [T] int64, kv_caches, meta)   # [T, hidden_size]
    logits = model.compute_logits(hidden[rows])                                 # [n, vocab] float32
with one kv cache [2, num_blocks, block_size, num_kv_heads, head_dim] per layer.

With a tensor-parallel group (`tp`), each rank builds and loads its shard (models/llama_shards.py,
layers/parallel.py): its heads (and KV caches of its KV heads), its part of the MLP, its slice of
the vocabulary; `compute_logits` still returns the whole vocabulary on every rank.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from rtpllm.distributed.tp_group import TPGroup
from rtpllm.layers.attention_metadata import AttentionBackend, AttentionMetadata
from rtpllm.layers.gemm_dispatch import linear, linear_silu_and_mul
from rtpllm.layers.linear import Embedding, FusedLinear, Linear, copy_checked
from rtpllm.layers.norm import RMSNorm
from rtpllm.layers.parallel import RowParallelLinear, VocabParallelEmbedding, gather_vocab_logits
from rtpllm.layers.rotary import RotaryEmbedding
from rtpllm.layers.torch_attention import TorchAttentionBackend
from rtpllm.models.llama_arch import LlamaArch
from rtpllm.models.llama_shards import check_tensor_parallel, kv_rows, llama_tensor_shard, mlp_rows, q_rows, vocab_rows

# Checkpoint projection -> our fused projection that holds it as a shard of the same name.
_FUSED_INTO = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
               "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
_FUSED_NAME = re.compile(r"^(.*)\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.(weight|bias)$")
# Checkpoint tensors that carry nothing we use (precomputed RoPE frequencies in old exports).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
_FUSED_PROJECTIONS = (".qkv_proj", ".gate_up_proj")


class LlamaAttention(nn.Module):
    def __init__(self, arch: LlamaArch, rotary: RotaryEmbedding, backend: AttentionBackend,
                 dtype: Optional[torch.dtype], tp: Optional[TPGroup] = None):
        super().__init__()
        q_size, kv_size = _local_rows(q_rows, arch, tp), _local_rows(kv_rows, arch, tp)
        self.num_heads = q_size // arch.head_dim
        self.num_kv_heads = kv_size // arch.head_dim
        self.head_dim = arch.head_dim
        self.scale = arch.head_dim ** -0.5
        self.qkv_proj = FusedLinear(arch.hidden_size,
                                    [("q_proj", q_size), ("k_proj", kv_size), ("v_proj", kv_size)],
                                    bias=arch.qkv_bias, dtype=dtype)
        self.o_proj = _output_projection(q_size, arch.hidden_size, arch.o_bias, dtype, tp)
        self.q_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps, dtype) if arch.qk_norm else None
        self.k_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps, dtype) if arch.qk_norm else None
        # Shared by every layer; kept out of the module tree so it is not registered once per layer.
        self._rotary = (rotary,)
        self.backend = backend

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))
        q = q.unflatten(-1, (self.num_heads, self.head_dim))
        k = k.unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = v.unflatten(-1, (self.num_kv_heads, self.head_dim))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        out = self.backend.forward(q, k, v, positions, self._rotary[0], kv_cache, meta, self.scale)
        return self.o_proj(out.flatten(1))


class LlamaMLP(nn.Module):
    def __init__(self, arch: LlamaArch, dtype: Optional[torch.dtype], tp: Optional[TPGroup] = None):
        super().__init__()
        size = _local_rows(mlp_rows, arch, tp)
        self.gate_up_proj = FusedLinear(arch.hidden_size, [("gate_proj", size), ("up_proj", size)],
                                        bias=arch.mlp_bias, dtype=dtype)
        self.down_proj = _output_projection(size, arch.hidden_size, arch.mlp_bias, dtype, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj
        return self.down_proj(linear_silu_and_mul(x, gate_up.weight, gate_up.bias))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, arch: LlamaArch, rotary: RotaryEmbedding, backend: AttentionBackend,
                 dtype: Optional[torch.dtype], tp: Optional[TPGroup] = None):
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)
        self.self_attn = LlamaAttention(arch, rotary, backend, dtype, tp)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)
        self.mlp = LlamaMLP(arch, dtype, tp)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: Optional[torch.Tensor],
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        # `residual` carries the un-normalized stream; each norm adds the previous block's output to it.
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, arch: LlamaArch, backend: AttentionBackend, dtype: Optional[torch.dtype],
                 tp: Optional[TPGroup] = None):
        super().__init__()
        if tp is None:
            self.embed_tokens = Embedding(arch.vocab_size, arch.hidden_size, dtype)
        else:
            self.embed_tokens = VocabParallelEmbedding(vocab_rows(arch, tp.rank, tp.world_size), arch.hidden_size,
                                                       dtype, tp)
        self.rotary = RotaryEmbedding(arch.head_dim, arch.rope, arch.max_position_embeddings)
        self.layers = nn.ModuleList(LlamaDecoderLayer(arch, self.rotary, backend, dtype, tp)
                                    for _ in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)


class LlamaForCausalLM(nn.Module):
    """Build it on the target device and in the target dtype (`with torch.device(...)`), then
    `load_weights`: parameters start uninitialized. With `tp`, it is this rank's shard (the
    attention backend then serves the rank's heads: see llama_shards.rank_local_arch)."""

    def __init__(self, arch: LlamaArch, attn_backend: Optional[AttentionBackend] = None,
                 dtype: Optional[torch.dtype] = None, tp: Optional[TPGroup] = None):
        super().__init__()
        if tp is not None and tp.world_size == 1:
            tp = None  # one rank: the plain layers, no collectives
        if tp is not None:
            check_tensor_parallel(arch, tp.world_size)
        self.arch = arch
        self.tp = tp
        self.attn_backend = attn_backend if attn_backend is not None else TorchAttentionBackend()
        self.model = LlamaModel(arch, self.attn_backend, dtype, tp)
        # EAGLE-3 drafting reads the residual stream entering these layers (spec/eagle3.py); each
        # forward then leaves them in `aux_hidden_states`, [T, hidden_size] each.
        self.aux_hidden_layers: tuple[int, ...] = ()
        self.aux_hidden_states: list[torch.Tensor] = []
        # Called with each layer's index once that layer ran (its KV is in the cache): prefill-decode
        # disaggregation pushes a layer's KV while the next layers compute (rtpllm/pd/layer_pusher.py).
        self.layer_hook: Optional[Callable[[int], None]] = None
        if arch.tie_word_embeddings:
            self.lm_head = None
        else:
            vocab = arch.vocab_size if tp is None else vocab_rows(arch, tp.rank, tp.world_size).size
            self.lm_head = Linear(arch.hidden_size, vocab, bias=False, dtype=dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        if len(kv_caches) != self.arch.num_layers:
            raise ValueError(f"kv_caches: expected one cache per layer ({self.arch.num_layers}), got {len(kv_caches)}")
        hidden = self.model.embed_tokens(input_ids)
        residual = None
        aux = self.aux_hidden_layers
        captured: dict[int, torch.Tensor] = {}
        for index, (layer, kv_cache) in enumerate(zip(self.model.layers, kv_caches)):
            if index in aux:
                # A copy: the fused norm kernels update the residual stream in place.
                captured[index] = hidden.clone() if residual is None else hidden + residual
            hidden, residual = layer(positions, hidden, residual, kv_cache, meta)
            if self.layer_hook is not None:
                self.layer_hook(index)
        if aux:
            self.aux_hidden_states = [captured[index] for index in aux]
        hidden, _ = self.model.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, hidden_size] -> [n, vocab_size] float32."""
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        if self.tp is not None:
            return gather_vocab_logits(linear(hidden, weight), self.tp, self.arch.vocab_size)
        return linear(hidden, weight).float()

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copies checkpoint tensors named as in Hugging Face Llama checkpoints
        (`model.layers.0.self_attn.q_proj.weight`, ...) into the parameters, converting dtype and
        device. Under tensor parallelism each tensor may be the whole checkpoint tensor or already
        this rank's shard (`checkpoint_shard`). Raises ValueError on an unknown tensor, a shape
        mismatch, a tensor given twice, or any parameter left unloaded."""
        loaded: set[str] = set()
        for name, tensor in weights:
            destination = self.weight_destination(name)
            if destination is None:
                continue
            if name in loaded:
                raise ValueError(f"{name}: appears twice in the checkpoint")
            shard = self.checkpoint_shard(name)
            if shard is not None:
                tensor = shard.take(tensor, name)
            copy_checked(destination, tensor, name)
            loaded.add(name)
        self.check_all_loaded(loaded)

    def weight_destination(self, name: str) -> Optional[torch.Tensor]:
        """The storage checkpoint tensor `name` fills: its parameter, or its rows of a fused
        parameter (a contiguous view, so a loader may write the bytes straight to its data_ptr).
        None for a tensor we skip; raises ValueError for one this configuration does not have."""
        if name.endswith(_IGNORED_SUFFIXES) or (self.lm_head is None and name == "lm_head.weight"):
            # A tied checkpoint may still store lm_head.weight (a copy of the embedding).
            return None
        fused = _FUSED_NAME.match(name)
        if fused and f"{fused.group(1)}.{_FUSED_INTO[fused.group(2)]}.weight" in self._params:
            prefix, projection, kind = fused.groups()
            return self.get_submodule(f"{prefix}.{_FUSED_INTO[projection]}").shard_view(projection, kind, name)
        if name in self._params:
            return self._params[name]
        raise ValueError(f"{name}: unexpected tensor in the checkpoint (not part of this "
                         f"{self.arch.architecture} configuration)")

    def check_all_loaded(self, loaded: set[str]) -> None:
        """Raises ValueError naming the checkpoint tensors this configuration needs that are not in
        `loaded`. A checkpoint that stores a fused projection (`qkv_proj`) supplies all its shards."""
        supplied = set(loaded)
        for name in loaded:
            module_name, _, kind = name.rpartition(".")
            if module_name.endswith(_FUSED_PROJECTIONS):
                owner = module_name.rpartition(".")[0]
                supplied.update(f"{owner}.{shard}.{kind}" for shard in self.get_submodule(module_name).shard_rows)
        missing = [name for name in self.checkpoint_tensor_names() if name not in supplied]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ValueError(f"checkpoint is missing {len(missing)} tensor(s): {shown}")

    def checkpoint_shard(self, name: str):
        """The slice of checkpoint tensor `name` this rank holds (a TensorShard), or None: whole."""
        return None if self.tp is None else llama_tensor_shard(name, self.arch, self.tp.rank, self.tp.world_size)

    @property
    def _params(self) -> dict[str, torch.Tensor]:
        # Built once: the parameters are fixed at construction (loading writes into them).
        if "_param_index" not in self.__dict__:
            self.__dict__["_param_index"] = dict(self.named_parameters())
        return self.__dict__["_param_index"]

    def checkpoint_tensor_names(self) -> list[str]:
        """The Hugging Face names of every tensor this configuration needs from a checkpoint."""
        names = []
        for name, module in self.named_modules():
            kinds = [kind for kind, _ in module.named_parameters(recurse=False)]
            if isinstance(module, FusedLinear):
                prefix = name.rsplit(".", 1)[0]
                names += [f"{prefix}.{shard}.{kind}" for shard in module.shard_rows for kind in kinds]
            else:
                names += [f"{name}.{kind}" for kind in kinds]
        return names


def _local_rows(rows_of, arch: LlamaArch, tp: Optional[TPGroup]) -> int:
    """Rows this rank holds of a column-parallel projection (all of them without a group)."""
    return rows_of(arch, 0, 1).size if tp is None else rows_of(arch, tp.rank, tp.world_size).size


def _output_projection(in_features: int, out_features: int, bias: bool, dtype: Optional[torch.dtype],
                       tp: Optional[TPGroup]) -> Linear:
    """o_proj / down_proj: row-parallel (an all-reduce of the partial sums) under tensor parallelism."""
    if tp is None:
        return Linear(in_features, out_features, bias=bias, dtype=dtype)
    return RowParallelLinear(in_features, out_features, bias, dtype, tp)

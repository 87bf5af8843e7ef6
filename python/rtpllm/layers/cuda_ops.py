"""Checked Python wrappers over the CUDA kernels bound in `rtpllm._C.ops`.

Each wrapper validates devices, dtypes, shapes, strides and alignment (raising ValueError that
names the bad argument), then passes raw pointers and the current stream to the kernel. Nothing
here synchronises the device, so every call can be captured in a CUDA graph.

Fused elementwise ops (16-bit activations: float16 / bfloat16):
    rms_norm(x, weight, eps, out=None) -> out
    fused_add_rms_norm(x, residual, weight, eps)            in place: residual += x; x = norm(residual)
    rope_and_cache_write(q, k, v, positions, cos_sin_cache, kv_cache, slot_mapping)
    silu_and_mul(x, out=None) -> out
    embedding(ids, table, out=None) -> out
Paged decode attention (plan on the host, then launch):
    workspace = allocate_decode_workspace(device)
    plan = plan_paged_decode(num_seqs, num_heads, num_kv_heads, head_dim, block_size, dtype,
                             max_seq_len, workspace)
    out = paged_decode_attention(q, kv_cache, block_tables, seq_lens, scale, plan, out=None, rope=None)
    (rope=DecodeRope(k, v, positions, cos_sin_cache, slot_mapping): RoPE and the cache write fused in)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

_HALF_DTYPES = (torch.float16, torch.bfloat16)
_VEC = 8  # elements in one 16-byte vector of a 16-bit type; kernels move data in these units
DEFAULT_DECODE_WORKSPACE_BYTES = 32 << 20
MAX_DECODE_SPLITS = 64  # cuda/attention/paged_decode_split_merge.cuh: kMaxSplits


@functools.cache
def kernel_ops():
    from rtpllm import _C

    if not getattr(_C, "has_cuda", False):
        raise RuntimeError("rtpllm._C was built without the CUDA kernels; rebuild with "
                           "`RTPLLM_CUDA=1 pip install --no-build-isolation -e .`")
    return _C.ops


@functools.cache
def scalar_type(dtype: torch.dtype):
    return getattr(kernel_ops().ScalarType, str(dtype).removeprefix("torch."))


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _require(cond: bool, name: str, message: Union[str, Callable[[], str]]) -> None:
    # Checks run on every launch; a formatted message is a lambda so that it costs nothing unless raised.
    if not cond:
        raise ValueError(f"{name}: {message() if callable(message) else message}")


def _check_tensor(t: torch.Tensor, name: str, *, device: Optional[torch.device] = None,
                  dtypes: tuple[torch.dtype, ...] = (), ndim: Optional[int] = None) -> None:
    _require(isinstance(t, torch.Tensor), name, lambda: f"expected a torch.Tensor, got {type(t).__name__}")
    _require(t.is_cuda, name, lambda: f"must be on a CUDA device, got {t.device}")
    if device is not None:
        _require(t.device == device, name, lambda: f"must be on {device}, got {t.device}")
    if dtypes:
        _require(t.dtype in dtypes, name, lambda: f"dtype must be one of {[str(d) for d in dtypes]}, got {t.dtype}")
    if ndim is not None:
        _require(t.dim() == ndim, name, lambda: f"expected {ndim} dims, got shape {tuple(t.shape)}")


def _check_shape(t: torch.Tensor, name: str, shape: tuple) -> None:
    _require(tuple(t.shape) == tuple(shape), name, lambda: f"expected shape {tuple(shape)}, got {tuple(t.shape)}")


def _check_rows(t: torch.Tensor, name: str) -> None:
    """A 2-D tensor whose rows are contiguous, 16-byte aligned and a whole number of vectors apart."""
    _require(t.stride(-1) == 1, name, lambda: f"last dim must be contiguous, got strides {t.stride()}")
    _require(t.shape[0] <= 1 or t.stride(0) % _VEC == 0, name,
             lambda: f"row stride must be a multiple of {_VEC} elements, got {t.stride(0)}")
    _require(t.data_ptr() % 16 == 0, name, "data must be 16-byte aligned")


def _check_heads(t: torch.Tensor, name: str, vec_token_stride: bool = True) -> None:
    """[tokens, heads, head_dim] with each token's heads packed (a view into a fused qkv is fine)."""
    _require(t.stride(-1) == 1 and t.stride(-2) == t.shape[-1], name,
             lambda: f"heads of a token must be contiguous, got strides {t.stride()}")
    if vec_token_stride:
        _require(t.shape[0] <= 1 or t.stride(0) % _VEC == 0, name,
                 lambda: f"token stride must be a multiple of {_VEC} elements, got {t.stride(0)}")
        _require(t.data_ptr() % 16 == 0, name, "data must be 16-byte aligned")


def _as_rows(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dim() == 2:
        return t
    _require(t.is_contiguous(), name, lambda: f"a {t.dim()}-D input must be contiguous (got strides {t.stride()})")
    return t.view(-1, t.shape[-1])


# ----------------------------------------------------------------------------- fused ops


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """weight * rmsnorm(x) over the last dim, rounding as HF's LlamaRMSNorm does. x [..., hidden]."""
    _check_tensor(x, "x", dtypes=_HALF_DTYPES)
    rows = _as_rows(x, "x")
    hidden = rows.shape[1]
    _check_tensor(weight, "weight", device=x.device, dtypes=(x.dtype,), ndim=1)
    _check_shape(weight, "weight", (hidden,))
    _require(weight.is_contiguous(), "weight", "must be contiguous")
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _check_tensor(out, "out", device=x.device, dtypes=(x.dtype,))
    _check_shape(out, "out", tuple(x.shape))
    out_rows = _as_rows(out, "out")
    _check_rows(rows, "x")
    _check_rows(out_rows, "out")
    _require(weight.data_ptr() % 16 == 0, "weight", "data must be 16-byte aligned")
    kernel_ops().rms_norm(out_rows.data_ptr(), rows.data_ptr(), weight.data_ptr(), rows.shape[0], hidden,
                    rows.stride(0), out_rows.stride(0), float(eps), scalar_type(x.dtype), _stream(x.device))
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """In place: residual += x, then x = weight * rmsnorm(residual). x, residual [tokens, hidden]."""
    _check_tensor(x, "x", dtypes=_HALF_DTYPES, ndim=2)
    _check_tensor(residual, "residual", device=x.device, dtypes=(x.dtype,), ndim=2)
    _check_shape(residual, "residual", tuple(x.shape))
    _check_tensor(weight, "weight", device=x.device, dtypes=(x.dtype,), ndim=1)
    _check_shape(weight, "weight", (x.shape[1],))
    _require(weight.is_contiguous() and weight.data_ptr() % 16 == 0, "weight", "must be contiguous and 16-byte aligned")
    _check_rows(x, "x")
    _check_rows(residual, "residual")
    kernel_ops().fused_add_rms_norm(x.data_ptr(), residual.data_ptr(), weight.data_ptr(), x.shape[0], x.shape[1],
                              x.stride(0), residual.stride(0), float(eps), scalar_type(x.dtype), _stream(x.device))


def rope_and_cache_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                         cos_sin_cache: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Rotates q in place (neox "rotate half"), and writes RoPE(k) and v into the paged cache.

    q [T, num_heads, head_dim]; k, v [T, num_kv_heads, head_dim] (views into a fused qkv tensor are
    fine); positions int64 [T]; cos_sin_cache float32 [max_position, rotary_dim] (cos | sin, as
    `RotaryEmbedding.cos_sin_cache`); kv_cache [2, num_blocks, block_size, num_kv_heads, head_dim];
    slot_mapping int64 [T], where a negative slot marks a padding token whose K/V is not written.
    """
    _check_tensor(q, "q", dtypes=_HALF_DTYPES, ndim=3)
    num_tokens, num_heads, head_dim = q.shape
    for name, t in (("k", k), ("v", v)):
        _check_tensor(t, name, device=q.device, dtypes=(q.dtype,), ndim=3)
        _require(t.shape[0] == num_tokens and t.shape[2] == head_dim, name,
                 lambda: f"expected [{num_tokens}, num_kv_heads, {head_dim}], got {tuple(t.shape)}")
    num_kv_heads = k.shape[1]
    _check_shape(v, "v", tuple(k.shape))
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_heads(t, name)
    for name, t in (("positions", positions), ("slot_mapping", slot_mapping)):
        _check_tensor(t, name, device=q.device, dtypes=(torch.int64,), ndim=1)
        _check_shape(t, name, (num_tokens,))
        _require(t.is_contiguous(), name, "must be contiguous")
    _check_tensor(cos_sin_cache, "cos_sin_cache", device=q.device, dtypes=(torch.float32,), ndim=2)
    rotary_dim = cos_sin_cache.shape[1]
    _require(rotary_dim <= head_dim and rotary_dim % (2 * _VEC) == 0, "cos_sin_cache",
             lambda: f"width (rotary dim) must be a multiple of {2 * _VEC} and at most head_dim={head_dim}, "
             f"got {rotary_dim}")
    _require(cos_sin_cache.is_contiguous() and cos_sin_cache.data_ptr() % 16 == 0, "cos_sin_cache",
             "must be contiguous and 16-byte aligned")
    _check_kv_cache(kv_cache, q, num_kv_heads, head_dim)
    kernel_ops().rope_and_cache_write(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), positions.data_ptr(), cos_sin_cache.data_ptr(),
        slot_mapping.data_ptr(), *_kv_planes(kv_cache), num_tokens, num_heads, num_kv_heads,
        head_dim, rotary_dim, cos_sin_cache.shape[0], q.stride(0), k.stride(0), v.stride(0), scalar_type(q.dtype),
        _stream(q.device))


def silu_and_mul(x: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [T, 2 * I] laid out gate | up -> silu(gate) * up [T, I], rounded as HF's Llama MLP does."""
    _check_tensor(x, "x", dtypes=_HALF_DTYPES, ndim=2)
    _require(x.shape[1] % (2 * _VEC) == 0, "x", lambda: f"width must be a multiple of {2 * _VEC}, got {x.shape[1]}")
    inter = x.shape[1] // 2
    if out is None:
        out = torch.empty(x.shape[0], inter, dtype=x.dtype, device=x.device)
    _check_tensor(out, "out", device=x.device, dtypes=(x.dtype,), ndim=2)
    _check_shape(out, "out", (x.shape[0], inter))
    _check_rows(x, "x")
    _check_rows(out, "out")
    kernel_ops().silu_and_mul(out.data_ptr(), x.data_ptr(), x.shape[0], inter, x.stride(0), out.stride(0),
                        scalar_type(x.dtype), _stream(x.device))
    return out


def embedding(ids: torch.Tensor, table: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """table[ids]: ids int32/int64 [T], table [vocab, hidden] -> [T, hidden]. An id outside the
    table yields a zero row (the vocabulary-shard convention); validate ids before they get here."""
    _check_tensor(table, "table", dtypes=_HALF_DTYPES, ndim=2)
    _require(table.is_contiguous() and table.data_ptr() % 16 == 0, "table", "must be contiguous and 16-byte aligned")
    _require(table.shape[1] % _VEC == 0, "table",
             lambda: f"hidden size must be a multiple of {_VEC}, got {table.shape[1]}")
    _check_tensor(ids, "ids", device=table.device, dtypes=(torch.int32, torch.int64), ndim=1)
    _require(ids.is_contiguous(), "ids", "must be contiguous")
    if out is None:
        out = torch.empty(ids.shape[0], table.shape[1], dtype=table.dtype, device=table.device)
    _check_tensor(out, "out", device=table.device, dtypes=(table.dtype,), ndim=2)
    _check_shape(out, "out", (ids.shape[0], table.shape[1]))
    _check_rows(out, "out")
    kernel_ops().embedding(out.data_ptr(), table.data_ptr(), ids.data_ptr(), ids.shape[0], table.shape[0], table.shape[1],
                     out.stride(0), ids.dtype == torch.int64, scalar_type(table.dtype), _stream(table.device))
    return out


# ----------------------------------------------------------------------------- decode attention


def _kv_planes(kv_cache: torch.Tensor) -> tuple[int, int]:
    """Addresses of the K and V planes of a contiguous [2, ...] cache (no view objects made)."""
    k_plane = kv_cache.data_ptr()
    return k_plane, k_plane + kv_cache.stride(0) * kv_cache.element_size()


def _check_kv_cache(kv_cache: torch.Tensor, q: torch.Tensor, num_kv_heads: int, head_dim: int) -> None:
    _check_tensor(kv_cache, "kv_cache", device=q.device, dtypes=(q.dtype,), ndim=5)
    _require(kv_cache.shape[0] == 2 and kv_cache.shape[3] == num_kv_heads and kv_cache.shape[4] == head_dim,
             "kv_cache", lambda: f"expected [2, num_blocks, block_size, {num_kv_heads}, {head_dim}], "
             f"got {tuple(kv_cache.shape)}")
    _require(kv_cache.is_contiguous(), "kv_cache", "must be contiguous")
    _require(all(plane % 16 == 0 for plane in _kv_planes(kv_cache)), "kv_cache",
             "K and V planes must be 16-byte aligned")


@dataclass(frozen=True)
class DecodeWorkspace:
    """Scratch for split-KV decode, allocated once and reused by every step and layer (a CUDA
    graph captures its addresses). Launches that share it must run on one stream, one at a time.

    partials: float32 [n], carved per plan into partial outputs and log-sum-exps.
    split_counters: int32 [n // 128], zero: the kernel counts each group's finished splits here
    and the last split puts its counter back to zero.
    """

    partials: torch.Tensor
    split_counters: torch.Tensor


def allocate_decode_workspace(device: torch.device | str,
                              num_bytes: int = DEFAULT_DECODE_WORKSPACE_BYTES) -> DecodeWorkspace:
    _require(num_bytes >= 1024, "num_bytes", lambda: f"must be at least 1024, got {num_bytes}")
    floats = num_bytes // 4
    # A split plan holds >= 2 * (head_dim + 1) floats per (sequence, query head), so this many
    # counters always cover the (sequence, KV head, head tile) groups of any plan that fits.
    return DecodeWorkspace(torch.empty(floats, dtype=torch.float32, device=device),
                           torch.zeros(floats // 128, dtype=torch.int32, device=device))


@dataclass(frozen=True)
class DecodePlan:
    """How one decode launch cuts the contexts, fixed on the host before the launch (and before
    a CUDA-graph capture: replays reuse it, so `max_seq_len` must bound every replayed length)."""

    num_seqs: int
    num_heads: int
    head_dim: int
    max_seq_len: int
    num_splits: int
    partial_out: Optional[torch.Tensor] = None  # float32 [num_seqs, num_heads, num_splits, head_dim]
    partial_lse: Optional[torch.Tensor] = None  # float32 [num_seqs, num_heads, num_splits]
    split_counters: Optional[torch.Tensor] = None  # int32 [num_seqs * num_kv_heads * head tiles], zero


def plan_paged_decode(num_seqs: int, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                      dtype: torch.dtype, max_seq_len: int, workspace: DecodeWorkspace,
                      num_splits: Optional[int] = None) -> DecodePlan:
    """Chooses how many pieces each context is split into (from the batch shape, the SM count and
    `max_seq_len`) and carves the split buffers out of `workspace`. Host-only; no device sync.

    `num_splits` overrides the choice (tests, benchmarks); it must fit the workspace.
    """
    _require(num_seqs > 0, "num_seqs", lambda: f"must be positive, got {num_seqs}")
    _require(num_kv_heads > 0 and num_heads % num_kv_heads == 0, "num_kv_heads",
             lambda: f"must divide num_heads={num_heads}, got {num_kv_heads}")
    _require(max_seq_len >= 1, "max_seq_len", lambda: f"must be positive, got {max_seq_len}")
    _require(dtype in _HALF_DTYPES, "dtype", lambda: f"must be float16 or bfloat16, got {dtype}")
    _require(isinstance(workspace, DecodeWorkspace), "workspace",
             lambda: f"expected a DecodeWorkspace (allocate_decode_workspace), got {type(workspace).__name__}")
    partials = workspace.partials
    per_split = num_seqs * num_heads * (head_dim + 1)
    max_splits = partials.numel() // per_split
    if num_splits is None:
        num_splits = kernel_ops().paged_decode_plan(num_seqs, num_heads, num_kv_heads, head_dim, block_size,
                                              scalar_type(dtype), max_seq_len, max(max_splits, 1))
    _require(1 <= num_splits <= MAX_DECODE_SPLITS, "num_splits",
             lambda: f"must be in [1, {MAX_DECODE_SPLITS}], got {num_splits}")
    if num_splits == 1:
        return DecodePlan(num_seqs, num_heads, head_dim, max_seq_len, 1)
    _require(num_splits <= max_splits, "workspace",
             lambda: f"holds {max_splits} splits for {num_seqs} sequences x {num_heads} heads, {num_splits} asked")
    groups = num_seqs * num_kv_heads * -(-(num_heads // num_kv_heads) // 16)
    _require(groups <= workspace.split_counters.numel(), "workspace",
             lambda: f"has {workspace.split_counters.numel()} split counters, {groups} needed")
    out_elems = num_seqs * num_heads * num_splits * head_dim
    partial_out = partials[:out_elems].view(num_seqs, num_heads, num_splits, head_dim)
    partial_lse = partials[out_elems:out_elems + num_seqs * num_heads * num_splits].view(
        num_seqs, num_heads, num_splits)
    return DecodePlan(num_seqs, num_heads, head_dim, max_seq_len, num_splits, partial_out, partial_lse,
                      workspace.split_counters[:groups])


@dataclass(frozen=True)
class DecodeRope:
    """The step's RoPE and cache write, for `paged_decode_attention` to do itself (models whose
    rotary embedding spans the whole head): q is then passed before RoPE, and the new token's
    K (rotated) and V are written into the cache and used for the last context position."""

    k: torch.Tensor  # [num_seqs, num_kv_heads, head_dim], before RoPE (a view into a fused qkv is fine)
    v: torch.Tensor  # [num_seqs, num_kv_heads, head_dim]
    positions: torch.Tensor  # int64 [num_seqs]
    cos_sin_cache: torch.Tensor  # float32 [max_position, head_dim]: cos | sin (RotaryEmbedding.cos_sin_cache)
    slot_mapping: torch.Tensor  # int64 [num_seqs]; a negative slot (graph padding) is not written


def _rope_args(rope: Optional[DecodeRope], q: torch.Tensor, num_kv_heads: int) -> tuple:
    """The binding's trailing fused-RoPE arguments (all zero without `rope`), checked."""
    if rope is None:
        return 0, 0, 0, 0, 0, 0, 0, 0
    _require(isinstance(rope, DecodeRope), "rope", lambda: f"expected a DecodeRope, got {type(rope).__name__}")
    num_seqs, _, head_dim = q.shape
    for name, t in (("rope.k", rope.k), ("rope.v", rope.v)):
        _check_tensor(t, name, device=q.device, dtypes=(q.dtype,), ndim=3)
        _check_shape(t, name, (num_seqs, num_kv_heads, head_dim))
        _check_heads(t, name)
    for name, t in (("rope.positions", rope.positions), ("rope.slot_mapping", rope.slot_mapping)):
        _check_tensor(t, name, device=q.device, dtypes=(torch.int64,), ndim=1)
        _check_shape(t, name, (num_seqs,))
        _require(t.is_contiguous(), name, "must be contiguous")
    table = rope.cos_sin_cache
    _check_tensor(table, "rope.cos_sin_cache", device=q.device, dtypes=(torch.float32,), ndim=2)
    _require(table.shape[1] == head_dim, "rope.cos_sin_cache",
             lambda: f"width (rotary dim) must equal head_dim={head_dim} for the fused kernel, got {table.shape[1]} "
             "(use rope_and_cache_write for partial rotary embeddings)")
    _require(table.is_contiguous() and table.data_ptr() % 16 == 0, "rope.cos_sin_cache",
             "must be contiguous and 16-byte aligned")
    strides = (rope.k.stride(0), rope.v.stride(0)) if num_seqs > 1 else (0, 0)
    return (rope.k.data_ptr(), rope.v.data_ptr(), rope.positions.data_ptr(), table.data_ptr(),
            rope.slot_mapping.data_ptr(), table.shape[0], *strides)


def paged_decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, plan: DecodePlan,
                           out: Optional[torch.Tensor] = None, rope: Optional[DecodeRope] = None) -> torch.Tensor:
    """One query token per sequence attends over its whole context in the paged cache.

    q [num_seqs, num_heads, head_dim] (already rotated, unless `rope` is given; a view into a
    fused qkv is fine);
    kv_cache [2, num_blocks, block_size, num_kv_heads, head_dim]; block_tables int32
    [num_seqs, max_blocks_per_seq]; seq_lens int32 [num_seqs] (context length including this
    token; read on the device, so it may change between CUDA-graph replays within the plan's
    max_seq_len). A sequence of length 0 (a padded graph slot) yields zeros.
    Returns out [num_seqs, num_heads, head_dim] in q's dtype.
    """
    _check_tensor(q, "q", dtypes=_HALF_DTYPES, ndim=3)
    num_seqs, num_heads, head_dim = q.shape
    _check_heads(q, "q", vec_token_stride=False)
    _require(num_seqs <= 1 or q.stride(0) % 2 == 0, "q", lambda: f"token stride must be even, got {q.stride(0)}")
    _require(q.data_ptr() % 4 == 0, "q", "data must be 4-byte aligned")
    _require(kv_cache.dim() == 5, "kv_cache", lambda: f"expected 5 dims, got shape {tuple(kv_cache.shape)}")
    num_kv_heads, block_size = kv_cache.shape[3], kv_cache.shape[2]
    _require(num_heads % num_kv_heads == 0, "q", lambda: f"num_heads={num_heads} is not a multiple of "
             f"the cache's num_kv_heads={num_kv_heads}")
    _check_kv_cache(kv_cache, q, num_kv_heads, head_dim)
    _check_tensor(block_tables, "block_tables", device=q.device, dtypes=(torch.int32,), ndim=2)
    _require(block_tables.shape[0] == num_seqs, "block_tables",
             lambda: f"expected {num_seqs} rows, got {block_tables.shape[0]}")
    _require(block_tables.stride(1) == 1, "block_tables", "rows must be contiguous")
    _check_tensor(seq_lens, "seq_lens", device=q.device, dtypes=(torch.int32,), ndim=1)
    _check_shape(seq_lens, "seq_lens", (num_seqs,))
    _require(seq_lens.is_contiguous(), "seq_lens", "must be contiguous")
    _require(isinstance(plan, DecodePlan), "plan", lambda: f"expected a DecodePlan, got {type(plan).__name__}")
    _require((plan.num_seqs, plan.num_heads, plan.head_dim) == (num_seqs, num_heads, head_dim), "plan",
             lambda: f"was made for (num_seqs, num_heads, head_dim)={(plan.num_seqs, plan.num_heads, plan.head_dim)}, "
             f"got {(num_seqs, num_heads, head_dim)}")
    if plan.num_splits > 1:
        _require(plan.partial_out.device == q.device, "plan",
                 lambda: f"workspace is on {plan.partial_out.device}, q on {q.device}")
    if out is None:
        out = torch.empty(num_seqs, num_heads, head_dim, dtype=q.dtype, device=q.device)
    _check_tensor(out, "out", device=q.device, dtypes=(q.dtype,), ndim=3)
    _check_shape(out, "out", (num_seqs, num_heads, head_dim))
    _check_heads(out, "out")
    split = plan.num_splits > 1
    partial_out = plan.partial_out.data_ptr() if split else 0
    partial_lse = plan.partial_lse.data_ptr() if split else 0
    split_counters = plan.split_counters.data_ptr() if split else 0
    rope_args = _rope_args(rope, q, num_kv_heads)
    k_plane, v_plane = _kv_planes(kv_cache)
    kernel_ops().paged_decode_attention(
        out.data_ptr(), q.data_ptr(), k_plane, v_plane, block_tables.data_ptr(), seq_lens.data_ptr(), partial_out,
        partial_lse, split_counters, num_seqs, num_heads, num_kv_heads, head_dim, block_size, block_tables.stride(0),
        q.stride(0), out.stride(0), plan.num_splits, float(scale), scalar_type(q.dtype), _stream(q.device),
        *rope_args)
    return out

#include "cuda/attention/paged_decode_attention.h"

#include <algorithm>
#include <climits>

#include "cuda/attention/paged_decode_kernel.cuh"

namespace rtpllm::cuda {
namespace {

using decode::kRows;
using decode::kSplitGranularity;
using decode::kThreads;

// Turns the runtime head_dim / block_size / dtype into template arguments and calls
// fn(T{}, HeadDim{}, BlockSize{}); anything unsupported is an error, never a silent no-op.
template <int kValue>
using Int = std::integral_constant<int, kValue>;

template <typename Fn>
cudaError_t dispatch_decode(ScalarType dtype, int head_dim, int block_size, Fn&& fn) {
  return dispatch_half_types(dtype, [&](auto type_tag) -> cudaError_t {
    auto with_head_dim = [&](auto head_dim_tag) -> cudaError_t {
      switch (block_size) {
        case 16: return fn(type_tag, head_dim_tag, Int<16>{});
        case 32: return fn(type_tag, head_dim_tag, Int<32>{});
        case 64: return fn(type_tag, head_dim_tag, Int<64>{});
        default: return cudaErrorInvalidValue;
      }
    };
    switch (head_dim) {
      case 64: return with_head_dim(Int<64>{});
      case 128: return with_head_dim(Int<128>{});
      default: return cudaErrorInvalidValue;
    }
  });
}

bool aligned(const void* ptr, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

// Opts the kernel into its dynamic shared memory (above the 48 KB default). Cheap, and done
// on every launch because the attribute is per device and launches may target several.
template <typename T, int kHeadDim, int kBlockSize, bool kRope>
cudaError_t configure_kernel() {
  return cudaFuncSetAttribute(decode::paged_decode_kernel<T, kHeadDim, kBlockSize, kRope>,
                              cudaFuncAttributeMaxDynamicSharedMemorySize, decode::DecodeSmem<T, kHeadDim>::kBytes);
}

template <typename T, int kHeadDim, int kBlockSize, bool kRope>
cudaError_t launch(const PagedDecodeParams& p, dim3 grid, cudaStream_t stream) {
  const cudaError_t err = configure_kernel<T, kHeadDim, kBlockSize, kRope>();
  if (err != cudaSuccess) return err;
  return launch_pdl(decode::paged_decode_kernel<T, kHeadDim, kBlockSize, kRope>, grid, dim3(kThreads),
                    decode::DecodeSmem<T, kHeadDim>::kBytes, stream, p);
}

// The fused-RoPE inputs (all or nothing: cos_sin_cache decides), checked like the rest.
cudaError_t check_rope(const DecodeRopeParams& r) {
  if (r.cos_sin_cache == nullptr) return cudaSuccess;
  if (r.k == nullptr || r.v == nullptr || r.positions == nullptr || r.slot_mapping == nullptr ||
      r.max_position <= 0 || r.k_stride % 8 != 0 || r.v_stride % 8 != 0) {
    return cudaErrorInvalidValue;
  }
  if (!aligned(r.k, 16) || !aligned(r.v, 16) || !aligned(r.cos_sin_cache, 16)) return cudaErrorMisalignedAddress;
  return cudaSuccess;
}

int head_tiles(int num_heads, int num_kv_heads) {
  return (num_heads / num_kv_heads + kRows - 1) / kRows;
}

// Estimated time, in units of "one token streamed", of cutting contexts of max_seq_len tokens
// into `splits` pieces. Decode is bandwidth-bound, so what counts is the work of the busiest SM:
// the CTAs it gets (co-resident ones share its share of bandwidth, so two at once cost as much
// as two in a row) times the tokens each streams plus a fixed start-up (Q load, pipeline fill,
// epilogue); with splits, the last CTA of each group also re-reads the partials to merge them.
// Fitted on H100/H200 sweeps (bench/gpu/bench_decode_attention.py): e.g. one sequence of 4096
// tokens with 8 KV heads runs best with 16 splits (128 CTAs, one per SM), 32 is 15% slower.
constexpr int kCtaOverheadTokens = 64;
constexpr int kMergeOverheadTokens = 96;

long long split_cost(int splits, int max_seq_len, long long base_ctas, long long sm_count, int min_split_tokens) {
  const long long tokens = (static_cast<long long>(max_seq_len) + splits - 1) / splits;
  const long long rounded =
      std::max<long long>((tokens + kSplitGranularity - 1) / kSplitGranularity * kSplitGranularity, min_split_tokens);
  const long long ctas_per_sm = (base_ctas * splits + sm_count - 1) / sm_count;
  return ctas_per_sm * (rounded + kCtaOverheadTokens) + (splits > 1 ? kMergeOverheadTokens : 0);
}

}  // namespace

cudaError_t plan_paged_decode(const PagedDecodePlanInputs& in, int* num_splits) {
  if (in.num_seqs <= 0 || in.num_kv_heads <= 0 || in.num_heads % in.num_kv_heads != 0 || in.max_seq_len < 0 ||
      in.max_splits < 1 || num_splits == nullptr) {
    return cudaErrorInvalidValue;
  }
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  int sm_count = 0;
  err = cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  // Validates the configuration here, at planning time, rather than at the first launch.
  err = dispatch_decode(in.dtype, in.head_dim, in.block_size,
                        [](auto, auto, auto) -> cudaError_t { return cudaSuccess; });
  if (err != cudaSuccess) return err;

  const long long base_ctas =
      static_cast<long long>(in.num_seqs) * in.num_kv_heads * head_tiles(in.num_heads, in.num_kv_heads);
  // Splits shorter than the kernel's minimum would exit at once (see split_range).
  const int min_split_tokens = in.head_dim == 64 ? decode::DecodeSmem<__half, 64>::kMinSplitTokens
                                                 : decode::DecodeSmem<__half, 128>::kMinSplitTokens;
  const int useful = std::max(1, (in.max_seq_len + min_split_tokens - 1) / min_split_tokens);
  const int limit = std::min({in.max_splits, useful, decode::kMaxSplits});
  int best = 1;
  long long best_cost = LLONG_MAX;
  for (int s = 1; s <= limit; ++s) {
    const long long cost = split_cost(s, in.max_seq_len, base_ctas, sm_count, min_split_tokens);
    if (cost < best_cost) {  // strict: ties keep fewer splits
      best_cost = cost;
      best = s;
    }
  }
  *num_splits = best;
  return cudaSuccess;
}

cudaError_t paged_decode_attention(const PagedDecodeParams& p, ScalarType dtype, cudaStream_t stream) {
  if (p.num_seqs < 0 || p.num_seqs > 65535 || p.num_kv_heads <= 0 || p.num_heads <= 0 ||
      p.num_heads % p.num_kv_heads != 0 || p.num_splits < 1 || p.num_splits > decode::kMaxSplits ||
      p.block_table_stride < 0 || p.q_stride % 2 != 0 || p.out_stride % 8 != 0) {
    return cudaErrorInvalidValue;
  }
  if (p.num_splits > 1 && (p.partial_out == nullptr || p.partial_lse == nullptr || p.split_counters == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (!aligned(p.q, 4) || !aligned(p.out, 16) || !aligned(p.k_cache, 16) || !aligned(p.v_cache, 16) ||
      !aligned(p.partial_out, 16)) {
    return cudaErrorMisalignedAddress;
  }
  if (const cudaError_t err = check_rope(p.rope); err != cudaSuccess) return err;
  if (p.num_seqs == 0) return cudaSuccess;
  const long long grid_y = static_cast<long long>(p.num_kv_heads) * head_tiles(p.num_heads, p.num_kv_heads);
  if (grid_y > 65535) return cudaErrorInvalidValue;

  return dispatch_decode(dtype, p.head_dim, p.block_size, [&](auto type_tag, auto head_dim_tag, auto block_tag) {
    using T = decltype(type_tag);
    constexpr int kHeadDim = decltype(head_dim_tag)::value;
    constexpr int kBlockSize = decltype(block_tag)::value;
    const dim3 grid(p.num_splits, static_cast<unsigned>(grid_y), p.num_seqs);
    return p.rope.cos_sin_cache != nullptr ? launch<T, kHeadDim, kBlockSize, true>(p, grid, stream)
                                           : launch<T, kHeadDim, kBlockSize, false>(p, grid, stream);
  });
}

}  // namespace rtpllm::cuda

// The paged decode kernel. One CTA serves one (split of a) sequence's context for one KV head
// and up to 16 of the query heads that share it (GQA): every K/V row is loaded once and used
// by all of them, because the query heads are the M dimension of the tensor-core products.
//
// Work layout inside a CTA (4 warps):
//   - the split's tokens are cut into 16-token tiles; warp w takes tiles w, w + 4, w + 8, ...
//     and streams them through its own cp.async ring of kStages shared-memory stages (no
//     CTA-wide barrier in the main loop, several 8 KB tiles in flight per warp);
//   - per tile: S[16 heads x 16 tokens] = Q·K^T on tensor cores (K via ldmatrix), online
//     softmax in registers, O[16 x head_dim] += P·V (V via ldmatrix.trans);
//   - at the end the 4 warps' (max, sum, O) are merged through shared memory; with several
//     splits per sequence, the last split to finish merges them all (paged_decode_split_merge.cuh).
// With kRope the kernel also applies RoPE to q and to the new token's K, and writes the new K/V
// row into the cache itself (paged_decode_rope.cuh); it then loads its first tiles before the
// PDL wait instead of only prefetching them into L2.
// Shared-memory rows are swizzled (16-byte chunk c of token row r sits at c ^ (r % 8)) so that
// ldmatrix's 8 row addresses fall in 8 different bank groups.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "cuda/attention/paged_decode_attention.h"
#include "cuda/ops/pdl.cuh"
#include "cuda/attention/paged_decode_mma.cuh"
#include "cuda/attention/paged_decode_rope.cuh"
#include "cuda/attention/paged_decode_split_merge.cuh"
#include "cuda/ops/vec.cuh"

namespace rtpllm::cuda::decode {

constexpr int kTileTokens = 16;  // tokens per warp per stage: the k extent of one P·V product
// Splits start on multiples of this, so every tile lies inside one KV block (block sizes are
// multiples of 16) and the four warps get equal shares of a full split.
constexpr int kSplitGranularity = kWarps * kTileTokens;

template <typename T, int kHeadDim>
struct DecodeSmem {
  // Three stages of 8 KB per warp keep two tiles in flight while the third is computed; with
  // head_dim 64 tiles are half as large, so a fourth stage costs the same shared memory.
  static constexpr int kStages = kHeadDim == 64 ? 4 : 3;
  static constexpr int kTileElems = kTileTokens * kHeadDim;  // one K or one V tile
  static constexpr int kStageElems = 2 * kTileElems;        // K tile, then V tile
  static constexpr int kPipelineBytes = kWarps * kStages * kStageElems * static_cast<int>(sizeof(T));
  static constexpr int kMergeStride = kHeadDim + 4;  // floats per merged row; padding spreads banks
  static constexpr int kMergeBytes = (kWarps * kRows * kMergeStride + 2 * kWarps * kRows) * 4;
  static constexpr int kBytes = kPipelineBytes > kMergeBytes ? kPipelineBytes : kMergeBytes;
  static_assert(kBytes >= kRows * kMaxSplits * 4, "the split merge stages its log-sum-exps here");
  // The shortest split: what a CTA's warps load before their PDL wait (the pipeline's first
  // kStages - 1 tiles each). A shorter split shortens no CTA's critical path, only adds CTAs to
  // the merge: measured on an H100 (batch-1 Llama-8B decode graph, 640-token contexts), 64-token
  // splits 5.63 ms, 128-token 5.59 ms, 256-token 5.66 ms.
  static constexpr int kMinSplitTokens = kWarps * (kStages - 1) * kTileTokens;
  static_assert(kMinSplitTokens % kSplitGranularity == 0, "splits start on whole granules");
};

__device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

// How a sequence's context is cut: into at most num_splits equal pieces of its own length (read
// from device memory, so one captured launch serves any lengths), rounded up to
// kSplitGranularity and never shorter than kMinSplitTokens. `active` of the launch's splits get
// tokens (at least one, so an empty sequence still gets its zero output); the others exit at
// once and take no part in the merge.
struct SplitRange {
  int begin, end, active;
};

template <int kMinSplitTokens>
__device__ __forceinline__ SplitRange split_range(int seq_len, int num_splits, int split) {
  const int even = ceil_div(ceil_div(seq_len, num_splits), kSplitGranularity) * kSplitGranularity;
  const int split_tokens = max(even, kMinSplitTokens);
  const int begin = split * split_tokens;
  return {begin, min(seq_len, begin + split_tokens), max(1, ceil_div(seq_len, split_tokens))};
}

__device__ __forceinline__ uint32_t load_pair(const void* base, int64_t elem_offset, bool valid) {
  return valid ? *reinterpret_cast<const uint32_t*>(static_cast<const uint16_t*>(base) + elem_offset) : 0u;
}

template <typename T, int kHeadDim, int kBlockSize, bool kRope>
__global__ void __launch_bounds__(kThreads) paged_decode_kernel(const __grid_constant__ PagedDecodeParams p) {
  using Smem = DecodeSmem<T, kHeadDim>;
  constexpr int kStages = Smem::kStages;
  constexpr int kChunks = kHeadDim / 8;            // 16-byte chunks per token row
  constexpr int kDimSteps = kHeadDim / 16;         // k-steps of Q·K^T
  constexpr int kOutTiles = kHeadDim / 8;          // n8 tiles of O
  constexpr int kCopiesPerLane = kTileTokens * kChunks / 32;
  static_assert(kBlockSize % kTileTokens == 0, "a tile must lie inside one KV block");
  extern __shared__ __align__(128) uint8_t smem[];

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int group_size = p.num_heads / p.num_kv_heads;
  const int head_tiles = ceil_div(group_size, kRows);
  const int kv_head = blockIdx.y / head_tiles;
  const int head_tile = blockIdx.y % head_tiles;
  const int head0 = kv_head * group_size + head_tile * kRows;  // first query head of this CTA
  const int rows = min(kRows, group_size - head_tile * kRows);  // query heads of this CTA
  const int seq = blockIdx.z;
  const int split = blockIdx.x;

  // Launched with PDL: until wait_for_prior_grid() the kernel touches only what the step's host
  // copies wrote before the forward began (seq_lens, block tables, positions), constants (the
  // cos/sin table) and K/V rows of earlier steps, which it loads (kRope) or prefetches into L2
  // while the kernel producing this step's q and K/V finishes. (Without kRope the prefetch also
  // covers the row being written now: harmless, L2 is where writes land.)
  const int seq_len = p.seq_lens[seq];
  const SplitRange range = split_range<Smem::kMinSplitTokens>(seq_len, p.num_splits, split);
  const int begin = range.begin, end = range.end, active_splits = range.active;
  if (split >= active_splits) return;
  const bool direct = active_splits == 1;  // the one split writes the output: no partials, no merge
  const int num_tiles = begin < end ? ceil_div(end - begin, kTileTokens) : 0;
  const int my_tiles = num_tiles > warp ? ceil_div(num_tiles - warp, kWarps) : 0;
  const int64_t token_stride = static_cast<int64_t>(p.num_kv_heads) * kHeadDim;
  const int32_t* const block_table = p.block_tables + static_cast<int64_t>(seq) * p.block_table_stride;
  const T* const k_cache = static_cast<const T*>(p.k_cache);
  const T* const v_cache = static_cast<const T*>(p.v_cache);
  // Element offset of the first row of this warp's i-th tile (inside one KV block).
  auto tile_base = [&](int i) -> int64_t {
    const int start = begin + (warp + i * kWarps) * kTileTokens;
    const int64_t block = block_table[start / kBlockSize];
    return (block * kBlockSize + start % kBlockSize) * token_stride + kv_head * kHeadDim;
  };
  T* const warp_smem = reinterpret_cast<T*>(smem) + warp * kStages * Smem::kStageElems;

  // Issues the copies of this warp's i-th tile into `stage` (and always commits a group, so
  // that the wait counts below stay uniform at the tail).
  auto load_tile = [&](int i, int stage) {
    if (i < my_tiles) {
      const int start = begin + (warp + i * kWarps) * kTileTokens;
      const int64_t base = tile_base(i);
      T* const k_tile = warp_smem + stage * Smem::kStageElems;
      T* const v_tile = k_tile + Smem::kTileElems;
#pragma unroll
      for (int c = 0; c < kCopiesPerLane; ++c) {
        const int idx = c * 32 + lane;
        const int r = idx / kChunks;
        const int chunk = idx % kChunks;
        const bool valid = start + r < end;
        const int64_t src = base + r * token_stride + chunk * 8;
        const int dst = r * kHeadDim + ((chunk ^ (r % 8)) * 8);
        cp_async_16(smem_addr(k_tile + dst), valid ? k_cache + src : k_cache, valid);
        cp_async_16(smem_addr(v_tile + dst), valid ? v_cache + src : v_cache, valid);
      }
    }
    cp_async_commit();
  };

  // Fused RoPE: the warp whose tile holds the new token (position seq_len - 1) patches its row.
  const int new_offset = seq_len - 1 - begin;
  const bool holds_new =
      kRope && new_offset >= 0 && seq_len - 1 < end && (new_offset / kTileTokens) % kWarps == warp;
  const int new_tile = new_offset / kTileTokens / kWarps;  // this warp's tile index (if holds_new)
  QRopeAngles<kHeadDim> q_angles;
  NewTokenRow<T, kHeadDim> new_row;
  if constexpr (kRope) {
    const float* angles = rope_row(p.rope, seq, kHeadDim);
    q_angles.load(angles, (lane % 4) * 2);
    if (holds_new) new_row.load_angles(angles, lane);
    // Every row but the new token's is final already: fill the pipeline now.
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) load_tile(s, s);
  } else {
    // The pipeline's first stages only: prefetching a long split whole would evict its own start.
    constexpr int kLinesPerRow = kHeadDim * static_cast<int>(sizeof(T)) / 128;
    static_assert(kTileTokens * kLinesPerRow <= 32, "one prefetch per lane and plane covers a tile");
    const int r = lane / kLinesPerRow;
    const int line = lane % kLinesPerRow;
    for (int i = 0; i < min(my_tiles, kStages); ++i) {
      const int start = begin + (warp + i * kWarps) * kTileTokens;
      if (r < kTileTokens && start + r < end) {
        const int64_t offset = tile_base(i) + r * token_stride + line * (128 / static_cast<int>(sizeof(T)));
        prefetch_l2(k_cache + offset);
        prefetch_l2(v_cache + offset);
      }
    }
  }
  wait_for_prior_grid();
  allow_dependent_launch();  // o_proj (a PDL-launched GEMV) may start loading weights

  // Q as the A operand of m16n8k16 (rows = query heads, zero past `rows`), loaded once.
  const int frag_row = lane / 4;
  const int frag_col = (lane % 4) * 2;
  uint32_t q_frag[kDimSteps][4];
  {
    const int64_t q_base = seq * p.q_stride + static_cast<int64_t>(head0) * kHeadDim;
    const int64_t lo = q_base + frag_row * kHeadDim + frag_col;
    const int64_t hi = lo + 8 * kHeadDim;
#pragma unroll
    for (int kk = 0; kk < kDimSteps; ++kk) {
      q_frag[kk][0] = load_pair(p.q, lo + kk * 16, frag_row < rows);
      q_frag[kk][1] = load_pair(p.q, hi + kk * 16, frag_row + 8 < rows);
      q_frag[kk][2] = load_pair(p.q, lo + kk * 16 + 8, frag_row < rows);
      q_frag[kk][3] = load_pair(p.q, hi + kk * 16 + 8, frag_row + 8 < rows);
    }
  }

  if constexpr (kRope) {
    q_angles.template rotate<T>(q_frag);
    if (holds_new) {
      new_row.build(p.rope, seq, kv_head, lane);
      const int64_t slot = p.rope.slot_mapping[seq];
      if (slot >= 0 && head_tile == 0) {  // one CTA per KV head writes the row
        new_row.store_global(static_cast<T*>(p.k_cache), static_cast<T*>(p.v_cache),
                             slot * token_stride + kv_head * kHeadDim, lane);
      }
    }
  }

  if (begin >= end) {
    // Only an empty sequence (a padded CUDA-graph slot; one active split) has an empty split:
    // it gets a zero output rather than uninitialised memory.
    if (threadIdx.x < rows) {
      T* out = static_cast<T*>(p.out) + seq * p.out_stride + (head0 + threadIdx.x) * kHeadDim;
      for (int d = 0; d < kHeadDim; ++d) out[d] = from_float<T>(0.f);
    }
    return;
  }

  const float scale_log2 = p.scale * 1.4426950408889634f;  // softmax in base 2: exp(x) = 2^(x log2 e)
  float o[kOutTiles][4];
#pragma unroll
  for (int t = 0; t < kOutTiles; ++t) o[t][0] = o[t][1] = o[t][2] = o[t][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};  // rows frag_row and frag_row + 8
  float row_sum[2] = {0.f, 0.f};              // this lane's share; summed over the quad at the end

  if constexpr (!kRope) {
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) load_tile(s, s);
  }

  for (int i = 0; i < my_tiles; ++i) {
    cp_async_wait<kStages - 2>();
    __syncwarp();  // tile i visible to all lanes; every lane is done with tile i - 1's stage
    if (holds_new && i == new_tile) {
      T* const k_tile = warp_smem + (i % kStages) * Smem::kStageElems;
      new_row.store_tile_row(k_tile, k_tile + Smem::kTileElems, new_offset % kTileTokens, lane);
      __syncwarp();
    }
    load_tile(i + kStages - 1, (i + kStages - 1) % kStages);

    const int stage = i % kStages;
    const int start = begin + (warp + i * kWarps) * kTileTokens;
    const T* const k_tile = warp_smem + stage * Smem::kStageElems;
    const T* const v_tile = k_tile + Smem::kTileElems;

    // S = Q·K^T: n-tile 0 holds tokens 0-7, n-tile 1 tokens 8-15.
    float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
    {
      const int mat = lane / 8;
      const int r = (mat / 2) * 8 + lane % 8;
#pragma unroll
      for (int kk = 0; kk < kDimSteps; ++kk) {
        const int chunk = kk * 2 + mat % 2;
        uint32_t b[4];
        ldmatrix_x4(b, smem_addr(k_tile + r * kHeadDim + ((chunk ^ (r % 8)) * 8)));
        mma_16x8x16<T>(s[0], q_frag[kk], b[0], b[1]);
        mma_16x8x16<T>(s[1], q_frag[kk], b[2], b[3]);
      }
    }

    // Online softmax. Tokens past `end` score -inf; the tile's first token is always valid,
    // so every row's max is finite after the quad reduction.
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const bool valid = start + nt * 8 + frag_col + j < end;
        s[nt][j] = valid ? s[nt][j] * scale_log2 : -INFINITY;
        s[nt][2 + j] = valid ? s[nt][2 + j] * scale_log2 : -INFINITY;
        tile_max[0] = fmaxf(tile_max[0], s[nt][j]);
        tile_max[1] = fmaxf(tile_max[1], s[nt][2 + j]);
      }
    }
    float correction[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 1));
      tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 2));
      const float new_max = fmaxf(row_max[h], tile_max[h]);
      correction[h] = exp2f(row_max[h] - new_max);  // 0 on the first tile (row_max = -inf)
      row_max[h] = new_max;
      row_sum[h] *= correction[h];
    }
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        s[nt][j] = exp2f(s[nt][j] - row_max[0]);
        s[nt][2 + j] = exp2f(s[nt][2 + j] - row_max[1]);
        row_sum[0] += s[nt][j];
        row_sum[1] += s[nt][2 + j];
      }
    }
#pragma unroll
    for (int t = 0; t < kOutTiles; ++t) {
      o[t][0] *= correction[0];
      o[t][1] *= correction[0];
      o[t][2] *= correction[1];
      o[t][3] *= correction[1];
    }

    // O += P·V. The S accumulator layout is the A-operand layout of the next product, so P
    // stays in registers.
    const uint32_t p_frag[4] = {pack2<T>(s[0][0], s[0][1]), pack2<T>(s[0][2], s[0][3]),
                                pack2<T>(s[1][0], s[1][1]), pack2<T>(s[1][2], s[1][3])};
    {
      const int mat = lane / 8;
      const int r = (mat % 2) * 8 + lane % 8;
#pragma unroll
      for (int dp = 0; dp < kHeadDim / 16; ++dp) {
        const int chunk = dp * 2 + mat / 2;
        uint32_t b[4];
        ldmatrix_x4_trans(b, smem_addr(v_tile + r * kHeadDim + ((chunk ^ (r % 8)) * 8)));
        mma_16x8x16<T>(o[2 * dp], p_frag, b[0], b[1]);
        mma_16x8x16<T>(o[2 * dp + 1], p_frag, b[2], b[3]);
      }
    }
  }

#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 1);
    row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 2);
  }

  // Merge the four warps' partial softmax states through shared memory (the pipeline's
  // buffers are free once every warp has left its loop).
  cp_async_wait<0>();
  __syncthreads();
  float* const merge_o = reinterpret_cast<float*>(smem);                // [kWarps][kRows][kMergeStride]
  float* const merge_max = merge_o + kWarps * kRows * Smem::kMergeStride;  // [kWarps][kRows]
  float* const merge_sum = merge_max + kWarps * kRows;                   // [kWarps][kRows]
#pragma unroll
  for (int t = 0; t < kOutTiles; ++t) {
    float* const dst = merge_o + (warp * kRows + frag_row) * Smem::kMergeStride + t * 8 + frag_col;
    *reinterpret_cast<float2*>(dst) = make_float2(o[t][0], o[t][1]);
    *reinterpret_cast<float2*>(dst + 8 * Smem::kMergeStride) = make_float2(o[t][2], o[t][3]);
  }
  if (lane % 4 == 0) {
    merge_max[warp * kRows + frag_row] = row_max[0];
    merge_max[warp * kRows + frag_row + 8] = row_max[1];
    merge_sum[warp * kRows + frag_row] = row_sum[0];
    merge_sum[warp * kRows + frag_row + 8] = row_sum[1];
  }
  __syncthreads();

  // Eight threads per query head, each finishing kHeadDim / 8 consecutive outputs.
  constexpr int kCols = kHeadDim / kThreadsPerRow;
  const int row = threadIdx.x / kThreadsPerRow;
  const int col0 = (threadIdx.x % kThreadsPerRow) * kCols;
  if (row < rows) {
    float max_all = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) max_all = fmaxf(max_all, merge_max[w * kRows + row]);
    float weight[kWarps];
    float denom = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      weight[w] = exp2f(merge_max[w * kRows + row] - max_all);  // 0 for a warp that had no tile
      denom += weight[w] * merge_sum[w * kRows + row];
    }
    const float inv_denom = 1.f / denom;
    float acc[kCols];
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      acc[c] = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        acc[c] += weight[w] * merge_o[(w * kRows + row) * Smem::kMergeStride + col0 + c];
      }
      acc[c] *= inv_denom;
    }

    const int head = head0 + row;
    if (direct) {
      store_row<T, kCols>(static_cast<T*>(p.out) + seq * p.out_stride + head * kHeadDim + col0, acc);
    } else {
      const int64_t slot = (static_cast<int64_t>(seq) * p.num_heads + head) * p.num_splits + split;
      float* const dst = p.partial_out + slot * kHeadDim + col0;
#pragma unroll
      for (int c = 0; c < kCols; c += 4) {
        *reinterpret_cast<float4*>(dst + c) = make_float4(acc[c], acc[c + 1], acc[c + 2], acc[c + 3]);
      }
      if (col0 == 0) p.partial_lse[slot] = max_all + log2f(denom);
    }
  }
  if (!direct) {
    merge_splits_if_last<T, kHeadDim>(p, seq, head0, rows, active_splits, reinterpret_cast<float*>(smem));
  }
}

}  // namespace rtpllm::cuda::decode

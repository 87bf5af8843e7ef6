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
};

__device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

// The token range [begin, end) of a split. Every sequence is cut into num_splits equal pieces
// of its own length (rounded to kSplitGranularity), read from device memory, so one captured
// launch serves any lengths.
__device__ __forceinline__ void split_range(int seq_len, int num_splits, int split, int* begin, int* end) {
  const int split_tokens = ceil_div(ceil_div(seq_len, num_splits), kSplitGranularity) * kSplitGranularity;
  *begin = split * split_tokens;
  *end = min(seq_len, *begin + split_tokens);
}

__device__ __forceinline__ uint32_t load_pair(const void* base, int64_t elem_offset, bool valid) {
  return valid ? *reinterpret_cast<const uint32_t*>(static_cast<const uint16_t*>(base) + elem_offset) : 0u;
}

template <typename T, int kHeadDim, int kBlockSize>
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
  // copies wrote before the forward began (seq_lens, block tables) and K/V rows of earlier steps,
  // which it prefetches into L2 while the kernel writing this step's q and K/V finishes. (The
  // prefetch also covers the row being written now: harmless, L2 is where writes land.)
  int begin, end;
  split_range(p.seq_lens[seq], p.num_splits, split, &begin, &end);
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
  {
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

  if (begin >= end) {
    // An empty split still reports in (with lse = -inf, which the merge skips); an empty
    // sequence (a padded CUDA-graph slot) gets a zero output rather than uninitialised memory.
    const int64_t first_pair = static_cast<int64_t>(seq) * p.num_heads + head0;
    if (p.num_splits == 1) {
      if (threadIdx.x < rows) {
        T* out = static_cast<T*>(p.out) + seq * p.out_stride + (head0 + threadIdx.x) * kHeadDim;
        for (int d = 0; d < kHeadDim; ++d) out[d] = from_float<T>(0.f);
      }
      return;
    }
    if (threadIdx.x < rows) p.partial_lse[(first_pair + threadIdx.x) * p.num_splits + split] = -INFINITY;
    for (int i = threadIdx.x; i < rows * kHeadDim / 4; i += kThreads) {
      const int row = i / (kHeadDim / 4);
      float* const dst = p.partial_out + ((first_pair + row) * p.num_splits + split) * kHeadDim;
      reinterpret_cast<float4*>(dst)[i % (kHeadDim / 4)] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
    merge_splits_if_last<T, kHeadDim>(p, seq, head0, rows, reinterpret_cast<float*>(smem));
    return;
  }

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

  const float scale_log2 = p.scale * 1.4426950408889634f;  // softmax in base 2: exp(x) = 2^(x log2 e)
  float o[kOutTiles][4];
#pragma unroll
  for (int t = 0; t < kOutTiles; ++t) o[t][0] = o[t][1] = o[t][2] = o[t][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};  // rows frag_row and frag_row + 8
  float row_sum[2] = {0.f, 0.f};              // this lane's share; summed over the quad at the end

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) load_tile(s, s);

  for (int i = 0; i < my_tiles; ++i) {
    cp_async_wait<kStages - 2>();
    __syncwarp();  // tile i visible to all lanes; every lane is done with tile i - 1's stage
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
    if (p.num_splits == 1) {
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
  if (p.num_splits > 1) merge_splits_if_last<T, kHeadDim>(p, seq, head0, rows, reinterpret_cast<float*>(smem));
}

}  // namespace rtpllm::cuda::decode

// Causal mask and online softmax on score fragments in the mma accumulator layout, shared by the
// mma.sync and the wgmma kernel (both hand each thread the same fragment shape), and the output
// staging of the accumulators.
//
// Layout: a thread holds two rows of scores (row A = lane / 4, row B = lane / 4 + 8 of its warp's
// 16 rows) and, per 8-key chunk i, the keys 8 i + 2 (lane % 4) + {0, 1}:
//   s[4 i + 0], s[4 i + 1] -> row A;   s[4 i + 2], s[4 i + 3] -> row B.
// The four threads of a quad (lanes 4 g .. 4 g + 3) together hold full rows.
#pragma once

#include "cuda/attention/prefill_attention_common.cuh"

namespace rtpllm::cuda::prefill {

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// FlashAttention-2 online softmax state for the thread's two rows. Maxima are kept in the exp2
// domain (score * scale * log2 e). Row sums stay per-thread partials until finalize(): the sum is
// linear, so the quad reduction is needed only once.
struct OnlineSoftmax {
  float max_a = kNegInf;
  float max_b = kNegInf;
  float sum_a = 0.f;
  float sum_b = 0.f;

  // Replaces one key tile of raw scores by unnormalized probabilities exp2(s * scale_log2 - max)
  // and returns per row the factor by which the running output must be rescaled. MASKED applies
  // the causal limit: keys past `limit_a` / `limit_b` (absolute indices; s[0] is key `first_key`)
  // get probability 0.
  template <int N_CHUNKS, bool MASKED>
  __device__ __forceinline__ void exponentiate(float* s, float scale_log2, int first_key, int limit_a, int limit_b,
                                               float& rescale_a, float& rescale_b) {
    if constexpr (MASKED) {
#pragma unroll
      for (int i = 0; i < N_CHUNKS; ++i) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int key = first_key + 8 * i + e;
          if (key > limit_a) s[4 * i + e] = kNegInf;
          if (key > limit_b) s[4 * i + 2 + e] = kNegInf;
        }
      }
    }
    float tile_max_a = kNegInf;
    float tile_max_b = kNegInf;
#pragma unroll
    for (int i = 0; i < N_CHUNKS; ++i) {
      tile_max_a = fmaxf(tile_max_a, fmaxf(s[4 * i], s[4 * i + 1]));
      tile_max_b = fmaxf(tile_max_b, fmaxf(s[4 * i + 2], s[4 * i + 3]));
    }
    const float new_max_a = fmaxf(max_a, quad_max(tile_max_a) * scale_log2);
    const float new_max_b = fmaxf(max_b, quad_max(tile_max_b) * scale_log2);
    // A row with every key so far masked keeps max -inf; use 0 as its offset so exp2 gives 0, not NaN.
    const float offset_a = new_max_a == kNegInf ? 0.f : new_max_a;
    const float offset_b = new_max_b == kNegInf ? 0.f : new_max_b;
    rescale_a = exp2f(max_a - offset_a);
    rescale_b = exp2f(max_b - offset_b);
    max_a = new_max_a;
    max_b = new_max_b;
    float tile_sum_a = 0.f;
    float tile_sum_b = 0.f;
#pragma unroll
    for (int i = 0; i < N_CHUNKS; ++i) {
      s[4 * i + 0] = exp2f(fmaf(s[4 * i + 0], scale_log2, -offset_a));
      s[4 * i + 1] = exp2f(fmaf(s[4 * i + 1], scale_log2, -offset_a));
      s[4 * i + 2] = exp2f(fmaf(s[4 * i + 2], scale_log2, -offset_b));
      s[4 * i + 3] = exp2f(fmaf(s[4 * i + 3], scale_log2, -offset_b));
      tile_sum_a += s[4 * i + 0] + s[4 * i + 1];
      tile_sum_b += s[4 * i + 2] + s[4 * i + 3];
    }
    sum_a = fmaf(sum_a, rescale_a, tile_sum_a);
    sum_b = fmaf(sum_b, rescale_b, tile_sum_b);
  }

  // 1 / (row sum) for both rows; 0 for a row that saw no key (a padding row).
  __device__ __forceinline__ void finalize(float& inv_a, float& inv_b) const {
    const float total_a = quad_sum(sum_a);
    const float total_b = quad_sum(sum_b);
    inv_a = total_a > 0.f ? 1.f / total_a : 0.f;
    inv_b = total_b > 0.f ? 1.f / total_b : 0.f;
  }
};

// Multiplies an accumulator fragment of N_CHUNKS 8-column chunks row-wise.
template <int N_CHUNKS>
__device__ __forceinline__ void scale_rows(float* acc, float factor_a, float factor_b) {
#pragma unroll
  for (int i = 0; i < N_CHUNKS; ++i) {
    acc[4 * i + 0] *= factor_a;
    acc[4 * i + 1] *= factor_a;
    acc[4 * i + 2] *= factor_b;
    acc[4 * i + 3] *= factor_b;
  }
}

// Packs probabilities (accumulator layout, N_CHUNKS 8-key chunks) into the 16-bit A operand of the
// P V product: chunks 2k and 2k + 1 form the A fragment of key step k, {rowA keys 0-7, rowB keys
// 0-7, rowA keys 8-15, rowB keys 8-15}, each register holding two consecutive keys.
template <typename T, int N_CHUNKS>
__device__ __forceinline__ void pack_operand(const float* s, uint32_t* p) {
#pragma unroll
  for (int i = 0; i < N_CHUNKS; ++i) {
    p[2 * i + 0] = pack_pair<T>(s[4 * i + 0], s[4 * i + 1]);
    p[2 * i + 1] = pack_pair<T>(s[4 * i + 2], s[4 * i + 3]);
  }
}

// Writes a normalized output fragment (N_CHUNKS 8-column chunks of rows A and B) into a swizzled
// [ROWS, 8 * N_CHUNKS] 16-bit tile; `row_a` is row A's index in the tile.
template <typename T, int ROWS, int N_CHUNKS>
__device__ __forceinline__ void stage_output(uint8_t* tile, const float* o, int row_a, int lane,
                                             float inv_a, float inv_b) {
  const int byte_in_chunk = (lane % 4) * 4;
#pragma unroll
  for (int i = 0; i < N_CHUNKS; ++i) {
    *reinterpret_cast<uint32_t*>(tile + swizzled_offset<ROWS>(row_a, i) + byte_in_chunk) =
        pack_pair<T>(o[4 * i + 0] * inv_a, o[4 * i + 1] * inv_a);
    *reinterpret_cast<uint32_t*>(tile + swizzled_offset<ROWS>(row_a + 8, i) + byte_in_chunk) =
        pack_pair<T>(o[4 * i + 2] * inv_b, o[4 * i + 3] * inv_b);
  }
}

}  // namespace rtpllm::cuda::prefill

// RoPE and the step's cache write, fused into the paged decode kernel (PagedDecodeParams::rope).
//
// Without fusion a decode layer runs a RoPE + cache-write kernel between the qkv projection and
// attention: one more kernel on the critical path of every layer, and attention could not load
// its K/V tiles before that kernel finished, because one of their rows (the new token's) was
// still being written. Fused, the attention kernel
//   - rotates q in registers, in the tensor-core fragment it already loads q into: element d of a
//     head and its RoPE partner d + head_dim / 2 sit in the same lane and register slot, k-steps
//     kDimSteps / 2 apart;
//   - builds the new token's rotated K row and V row in the registers of the one warp whose tile
//     holds position seq_len - 1, writes them to the cache, and patches them into that tile in
//     shared memory, so every other row of every tile may be loaded before the projection ends.
// The rotation is rope_rotate (cuda/ops/rope.cuh) rounded once to T, as in rope_cache_write.cu,
// so the fused and unfused paths produce the same bits.
#pragma once

#include <cmath>
#include <cstdint>

#include "cuda/attention/paged_decode_attention.h"
#include "cuda/attention/paged_decode_mma.cuh"
#include "cuda/ops/rope.cuh"
#include "cuda/ops/vec.cuh"

namespace rtpllm::cuda::decode {

template <typename T>
__device__ __forceinline__ void unpack2(uint32_t bits, float& lo, float& hi) {
  const T* halves = reinterpret_cast<const T*>(&bits);
  lo = to_float(halves[0]);
  hi = to_float(halves[1]);
}

// cos | sin row of the token's position, or nullptr where the position is outside the table
// (the caller then rotates with NaN, as rope_cache_write does, instead of reading out of bounds).
__device__ __forceinline__ const float* rope_row(const DecodeRopeParams& rope, int seq, int head_dim) {
  const int64_t pos = rope.positions[seq];
  return pos >= 0 && pos < rope.max_position ? rope.cos_sin_cache + pos * head_dim : nullptr;
}

__device__ __forceinline__ float2 load_pair_or_nan(const float* row, int index) {
  return row != nullptr ? *reinterpret_cast<const float2*>(row + index) : make_float2(NAN, NAN);
}

// The cos/sin a lane needs to rotate its q fragment: q_frag[kk][0..1] hold head dims
// kk * 16 + col + {0, 1} and q_frag[kk][2..3] those dims + 8 (col = (lane % 4) * 2), for the
// first half's k-steps kk < kDimSteps / 2; their partners sit at kk + kDimSteps / 2.
template <int kHeadDim>
struct QRopeAngles {
  static constexpr int kHalfSteps = kHeadDim / 32;
  float2 cos_lo[kHalfSteps], cos_hi[kHalfSteps], sin_lo[kHalfSteps], sin_hi[kHalfSteps];

  // Reads only constants and the step's positions: safe before the PDL wait.
  __device__ __forceinline__ void load(const float* row, int frag_col) {
#pragma unroll
    for (int kk = 0; kk < kHalfSteps; ++kk) {
      const int d = kk * 16 + frag_col;
      cos_lo[kk] = load_pair_or_nan(row, d);
      cos_hi[kk] = load_pair_or_nan(row, d + 8);
      sin_lo[kk] = load_pair_or_nan(row, kHeadDim / 2 + d);
      sin_hi[kk] = load_pair_or_nan(row, kHeadDim / 2 + d + 8);
    }
  }

  template <typename T>
  __device__ __forceinline__ void rotate(uint32_t (&q_frag)[2 * kHalfSteps][4]) const {
#pragma unroll
    for (int kk = 0; kk < kHalfSteps; ++kk) {
#pragma unroll
      for (int reg = 0; reg < 4; ++reg) {
        const float2 c = reg < 2 ? cos_lo[kk] : cos_hi[kk];
        const float2 s = reg < 2 ? sin_lo[kk] : sin_hi[kk];
        float a0, a1, b0, b1, y0, y1, z0, z1;
        unpack2<T>(q_frag[kk][reg], a0, a1);
        unpack2<T>(q_frag[kk + kHalfSteps][reg], b0, b1);
        rope_rotate(a0, b0, c.x, s.x, y0, z0);
        rope_rotate(a1, b1, c.y, s.y, y1, z1);
        q_frag[kk][reg] = pack2<T>(y0, y1);
        q_frag[kk + kHalfSteps][reg] = pack2<T>(z0, z1);
      }
    }
  }
};

// The new token's K row (rotated) and V row, held by the lanes of the warp whose tile holds it:
// lanes [0, kChunks / 2) each hold K chunk `lane` and its partner chunk lane + kChunks / 2
// (chunks are 8 elements), lanes [kChunks / 2, 3 * kChunks / 2) each hold one V chunk.
template <typename T, int kHeadDim>
struct NewTokenRow {
  static constexpr int kChunks = kHeadDim / kVecElems;
  static constexpr int kKLanes = kChunks / 2;
  static_assert(kKLanes + kChunks <= 32, "a warp holds the row");
  float cos[kVecElems], sin[kVecElems];  // K lanes: the angles of their first chunk's dims
  uint4 first, second;                    // K lanes: chunks lane, lane + kKLanes; V lanes: first only

  __device__ __forceinline__ bool is_k_lane(int lane) const { return lane < kKLanes; }
  __device__ __forceinline__ bool is_v_lane(int lane) const { return lane >= kKLanes && lane < kKLanes + kChunks; }
  __device__ __forceinline__ int chunk(int lane) const { return is_k_lane(lane) ? lane : lane - kKLanes; }

  // Before the PDL wait: constants and the step's positions only.
  __device__ __forceinline__ void load_angles(const float* row, int lane) {
    if (!is_k_lane(lane)) return;
#pragma unroll
    for (int j = 0; j < kVecElems; ++j) {
      cos[j] = row != nullptr ? row[lane * kVecElems + j] : NAN;
      sin[j] = row != nullptr ? row[kHeadDim / 2 + lane * kVecElems + j] : NAN;
    }
  }

  // After the wait: reads the projection's k / v for (seq, kv_head) and rotates K.
  __device__ __forceinline__ void build(const DecodeRopeParams& rope, int seq, int kv_head, int lane) {
    const int64_t head = static_cast<int64_t>(kv_head) * kHeadDim;
    if (is_k_lane(lane)) {
      const T* k = static_cast<const T*>(rope.k) + seq * rope.k_stride + head;
      float x1[kVecElems], x2[kVecElems], y1[kVecElems], y2[kVecElems];
      vec_to_float(load_vec(k + lane * kVecElems), x1);
      vec_to_float(load_vec(k + (lane + kKLanes) * kVecElems), x2);
#pragma unroll
      for (int j = 0; j < kVecElems; ++j) rope_rotate(x1[j], x2[j], cos[j], sin[j], y1[j], y2[j]);
      const Vec8<T> a = float_to_vec<T>(y1), b = float_to_vec<T>(y2);
      first = *reinterpret_cast<const uint4*>(&a);
      second = *reinterpret_cast<const uint4*>(&b);
    } else if (is_v_lane(lane)) {
      const T* v = static_cast<const T*>(rope.v) + seq * rope.v_stride + head;
      first = *reinterpret_cast<const uint4*>(v + chunk(lane) * kVecElems);
    }
  }

  // Both planes' rows at `offset` (element offset of the token's row for this KV head).
  __device__ __forceinline__ void store_global(T* k_cache, T* v_cache, int64_t offset, int lane) const {
    if (is_k_lane(lane)) {
      *reinterpret_cast<uint4*>(k_cache + offset + lane * kVecElems) = first;
      *reinterpret_cast<uint4*>(k_cache + offset + (lane + kKLanes) * kVecElems) = second;
    } else if (is_v_lane(lane)) {
      *reinterpret_cast<uint4*>(v_cache + offset + chunk(lane) * kVecElems) = first;
    }
  }

  // Row r of a K tile and a V tile in shared memory, in the kernel's swizzle (chunk c of row r
  // at c ^ (r % 8)).
  __device__ __forceinline__ void store_tile_row(T* k_tile, T* v_tile, int r, int lane) const {
    auto at = [&](T* tile, int c) {
      return reinterpret_cast<uint4*>(tile + r * kHeadDim + ((c ^ (r % 8)) * kVecElems));
    };
    if (is_k_lane(lane)) {
      *at(k_tile, lane) = first;
      *at(k_tile, lane + kKLanes) = second;
    } else if (is_v_lane(lane)) {
      *at(v_tile, chunk(lane)) = first;
    }
  }
};

}  // namespace rtpllm::cuda::decode

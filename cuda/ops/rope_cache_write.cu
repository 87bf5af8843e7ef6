#include "cuda/ops/rope_cache_write.h"

#include <cmath>

#include "cuda/ops/pdl.cuh"
#include "cuda/ops/rope.cuh"
#include "cuda/ops/vec.cuh"

namespace rtpllm::cuda {
namespace {

constexpr int kThreads = 128;

// Eight fp32 values as two 16-byte loads (offsets are multiples of 8 floats).
__device__ __forceinline__ void load_floats(const float* src, float (&dst)[kVecElems]) {
  const float4 a = reinterpret_cast<const float4*>(src)[0];
  const float4 b = reinterpret_cast<const float4*>(src)[1];
  dst[0] = a.x; dst[1] = a.y; dst[2] = a.z; dst[3] = a.w;
  dst[4] = b.x; dst[5] = b.y; dst[6] = b.z; dst[7] = b.w;
}

// Rotates one 8-wide slice [i, i + 8) of a head together with its partner slice [i + h, i + h + 8).
template <typename T>
__device__ __forceinline__ void rotate_slice(const T* src, T* dst, int half, int offset, const float* cos,
                                             const float* sin) {
  float x1[kVecElems], x2[kVecElems], y1[kVecElems], y2[kVecElems];
  vec_to_float(load_vec(src + offset), x1);
  vec_to_float(load_vec(src + half + offset), x2);
#pragma unroll
  for (int j = 0; j < kVecElems; ++j) rope_rotate(x1[j], x2[j], cos[j], sin[j], y1[j], y2[j]);
  store_vec(dst + offset, float_to_vec<T>(y1));
  store_vec(dst + half + offset, float_to_vec<T>(y2));
}

// One block per token. The token's work is a flat list of 8-wide items (q rotations, k
// rotations/copies into the cache, v copies) spread over the block's threads, so that the
// same launch shape serves any head count.
//
// Launched with PDL: positions and slot_mapping are the step's inputs, copied in before the
// forward began, so they are read while the projection that produces q/k/v finishes.
template <typename T>
__global__ void __launch_bounds__(kThreads) rope_cache_write_kernel(const __grid_constant__ RopeCacheWriteParams p) {
  const int64_t token = blockIdx.x;
  const int64_t pos = p.positions[token];
  const int64_t slot = p.slot_mapping[token];
  wait_for_prior_grid();
  allow_dependent_launch();  // decode attention may start reading its block tables and old K/V
  const bool write_cache = slot >= 0;
  const bool pos_ok = pos >= 0 && pos < p.max_position;

  const int half = p.rotary_dim / 2;
  const int rot_items = half / kVecElems;                       // per head
  const int pass_items = (p.head_dim - p.rotary_dim) / kVecElems;  // un-rotated tail, per head
  const int head_vecs = p.head_dim / kVecElems;
  const int q_items = p.num_heads * rot_items;
  const int k_items = write_cache ? p.num_kv_heads * (rot_items + pass_items) : 0;
  const int v_items = write_cache ? p.num_kv_heads * head_vecs : 0;

  T* q = static_cast<T*>(p.q) + token * p.q_token_stride;
  const T* k = static_cast<const T*>(p.k) + token * p.k_token_stride;
  const T* v = static_cast<const T*>(p.v) + token * p.v_token_stride;
  const int64_t cache_row = slot * p.num_kv_heads * p.head_dim;
  const float* cs = p.cos_sin_cache + (pos_ok ? pos : 0) * p.rotary_dim;

  for (int item = threadIdx.x; item < q_items + k_items + v_items; item += kThreads) {
    if (item < q_items + k_items) {
      const bool is_q = item < q_items;
      const int local = is_q ? item : item - q_items;
      const int per_head = is_q ? rot_items : rot_items + pass_items;
      const int head = local / per_head;
      const int slice = local % per_head;
      const T* src = is_q ? q + head * p.head_dim : k + head * p.head_dim;
      T* dst = is_q ? q + head * p.head_dim : static_cast<T*>(p.k_cache) + cache_row + head * p.head_dim;
      if (slice < rot_items) {
        const int offset = slice * kVecElems;
        float cos[kVecElems], sin[kVecElems];
        if (pos_ok) {
          load_floats(cs + offset, cos);
          load_floats(cs + half + offset, sin);
        } else {
          // A position outside the cache poisons the outputs instead of reading out of bounds.
#pragma unroll
          for (int j = 0; j < kVecElems; ++j) cos[j] = sin[j] = NAN;
        }
        rotate_slice(src, dst, half, offset, cos, sin);
      } else {
        const int offset = p.rotary_dim + (slice - rot_items) * kVecElems;
        store_vec(dst + offset, load_vec(src + offset));
      }
    } else {
      const int local = item - q_items - k_items;
      const int head = local / head_vecs;
      const int offset = head * p.head_dim + (local % head_vecs) * kVecElems;
      store_vec(static_cast<T*>(p.v_cache) + cache_row + offset, load_vec(v + offset));
    }
  }
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace

cudaError_t rope_and_cache_write(const RopeCacheWriteParams& p, ScalarType dtype, cudaStream_t stream) {
  if (p.head_dim <= 0 || p.head_dim % kVecElems != 0 || p.rotary_dim <= 0 || p.rotary_dim % (2 * kVecElems) != 0 ||
      p.rotary_dim > p.head_dim || p.num_heads <= 0 || p.num_kv_heads <= 0 || p.max_position <= 0) {
    return cudaErrorInvalidValue;
  }
  if (p.q_token_stride % kVecElems != 0 || p.k_token_stride % kVecElems != 0 || p.v_token_stride % kVecElems != 0) {
    return cudaErrorInvalidValue;
  }
  if (!aligned16(p.q) || !aligned16(p.k) || !aligned16(p.v) || !aligned16(p.k_cache) || !aligned16(p.v_cache) ||
      !aligned16(p.cos_sin_cache)) {
    return cudaErrorMisalignedAddress;
  }
  if (p.num_tokens == 0) return cudaSuccess;
  return dispatch_half_types(dtype, [&](auto tag) {
    using T = decltype(tag);
    return launch_pdl(rope_cache_write_kernel<T>, dim3(p.num_tokens), dim3(kThreads), 0, stream, p);
  });
}

}  // namespace rtpllm::cuda

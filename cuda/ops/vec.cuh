// 16-byte vectors of 16-bit floats: the unit every memory-bound kernel in cuda/ops moves.
// One vector is 8 elements, so a warp's 32 lanes move 512 contiguous bytes per instruction.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace rtpllm::cuda {

inline constexpr int kVecElems = 8;  // 16 bytes of a 16-bit type

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Rounds through T and back: reproduces the rounding a framework does when it stores an
// intermediate in the activation dtype (e.g. HF's RMSNorm casts before the weight multiply).
template <typename T>
__device__ __forceinline__ float round_to(float x) { return to_float(from_float<T>(x)); }

template <typename T>
struct alignas(16) Vec8 {
  T v[kVecElems];
};

template <typename T>
__device__ __forceinline__ Vec8<T> load_vec(const T* ptr) {
  Vec8<T> out;
  *reinterpret_cast<uint4*>(&out) = *reinterpret_cast<const uint4*>(ptr);
  return out;
}

template <typename T>
__device__ __forceinline__ void store_vec(T* ptr, const Vec8<T>& val) {
  *reinterpret_cast<uint4*>(ptr) = *reinterpret_cast<const uint4*>(&val);
}

template <typename T>
__device__ __forceinline__ void vec_to_float(const Vec8<T>& in, float (&out)[kVecElems]) {
#pragma unroll
  for (int i = 0; i < kVecElems; ++i) out[i] = to_float(in.v[i]);
}

template <typename T>
__device__ __forceinline__ Vec8<T> float_to_vec(const float (&in)[kVecElems]) {
  Vec8<T> out;
#pragma unroll
  for (int i = 0; i < kVecElems; ++i) out.v[i] = from_float<T>(in[i]);
  return out;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

}  // namespace rtpllm::cuda

#include "cuda/ops/silu_and_mul.h"

#include "cuda/ops/vec.cuh"

namespace rtpllm::cuda {
namespace {

constexpr int kThreads = 128;

// grid = (num_tokens, column blocks): each thread turns one 16-byte vector of gate and one of up
// into one vector of output.
template <typename T>
__global__ void __launch_bounds__(kThreads) silu_and_mul_kernel(const __grid_constant__ SiluAndMulParams p) {
  const int64_t token = blockIdx.x;
  const int col = (blockIdx.y * kThreads + threadIdx.x) * kVecElems;
  if (col >= p.inter_size) return;
  const T* gate_ptr = static_cast<const T*>(p.input) + token * p.input_row_stride + col;
  float gate[kVecElems], up[kVecElems], out[kVecElems];
  vec_to_float(load_vec(gate_ptr), gate);
  vec_to_float(load_vec(gate_ptr + p.inter_size), up);
#pragma unroll
  for (int j = 0; j < kVecElems; ++j) {
    const float silu = gate[j] / (1.f + __expf(-gate[j]));
    out[j] = round_to<T>(silu) * up[j];
  }
  store_vec(static_cast<T*>(p.out) + token * p.out_row_stride + col, float_to_vec<T>(out));
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace

cudaError_t silu_and_mul(const SiluAndMulParams& p, ScalarType dtype, cudaStream_t stream) {
  if (p.inter_size <= 0 || p.inter_size % kVecElems != 0 || p.input_row_stride % kVecElems != 0 ||
      p.out_row_stride % kVecElems != 0) {
    return cudaErrorInvalidValue;
  }
  if (!aligned16(p.out) || !aligned16(p.input)) return cudaErrorMisalignedAddress;
  if (p.num_tokens == 0) return cudaSuccess;
  const int vecs = p.inter_size / kVecElems;
  const dim3 grid(static_cast<unsigned>(p.num_tokens), (vecs + kThreads - 1) / kThreads);
  return dispatch_half_types(dtype, [&](auto tag) {
    using T = decltype(tag);
    silu_and_mul_kernel<T><<<grid, kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace rtpllm::cuda

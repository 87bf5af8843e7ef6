#include "cuda/ops/rms_norm.h"

#include <algorithm>

#include "cuda/ops/pdl.cuh"
#include "cuda/ops/vec.cuh"

namespace rtpllm::cuda {
namespace {

constexpr int kMaxThreadsPerRow = 1024;
constexpr int kMinThreadsPerBlock = 128;

// blockDim = (threads_per_row, rows_per_block): small rows (e.g. Qwen3's per-head q/k norm,
// 128 wide) share a block so that each block still has 128 threads; wide rows get up to 1024
// threads, each holding kVecsPerThread 16-byte vectors in registers between the two passes.
//
// Launched with PDL: the norm weight (a constant) is loaded while the kernel producing the input
// finishes; nothing the previous kernels touch is read or written before wait_for_prior_grid().
template <typename T, bool kAddResidual, int kVecsPerThread>
__global__ void rms_norm_kernel(const __grid_constant__ RmsNormParams p) {
  __shared__ float warp_sums[32];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  // Rows past the end still join the barrier below.
  const bool active = row < p.num_rows;
  const int num_vecs = p.hidden / kVecElems;

  Vec8<T> weight[kVecsPerThread];
#pragma unroll
  for (int i = 0; i < kVecsPerThread; ++i) {
    const int vec = threadIdx.x + i * blockDim.x;
    if (vec < num_vecs) weight[i] = load_vec(static_cast<const T*>(p.weight) + vec * kVecElems);
  }
  wait_for_prior_grid();
  allow_dependent_launch();  // the next projection (a PDL-launched GEMV) may start loading weights

  float vals[kVecsPerThread][kVecElems];
  float sum_sq = 0.f;
#pragma unroll
  for (int i = 0; i < kVecsPerThread; ++i) {
    const int vec = threadIdx.x + i * blockDim.x;
    if (!active || vec >= num_vecs) continue;
    const T* in = static_cast<const T*>(p.input) + row * p.input_row_stride + vec * kVecElems;
    vec_to_float(load_vec(in), vals[i]);
    if constexpr (kAddResidual) {
      T* res = static_cast<T*>(p.residual) + row * p.residual_row_stride + vec * kVecElems;
      float r[kVecElems];
      vec_to_float(load_vec(res), r);
#pragma unroll
      for (int j = 0; j < kVecElems; ++j) vals[i][j] = round_to<T>(vals[i][j] + r[j]);
      store_vec(res, float_to_vec<T>(vals[i]));
    }
#pragma unroll
    for (int j = 0; j < kVecElems; ++j) sum_sq += vals[i][j] * vals[i][j];
  }

  sum_sq = warp_sum(sum_sq);
  const int warps_per_row = blockDim.x / 32;
  if (warps_per_row > 1) {
    const int warp_in_row = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) warp_sums[threadIdx.y * warps_per_row + warp_in_row] = sum_sq;
    __syncthreads();
    sum_sq = 0.f;
    for (int w = 0; w < warps_per_row; ++w) sum_sq += warp_sums[threadIdx.y * warps_per_row + w];
  }
  if (!active) return;
  const float inv_rms = rsqrtf(sum_sq / static_cast<float>(p.hidden) + p.eps);

#pragma unroll
  for (int i = 0; i < kVecsPerThread; ++i) {
    const int vec = threadIdx.x + i * blockDim.x;
    if (vec >= num_vecs) continue;
    float w[kVecElems];
    vec_to_float(weight[i], w);
    float y[kVecElems];
#pragma unroll
    for (int j = 0; j < kVecElems; ++j) y[j] = w[j] * round_to<T>(vals[i][j] * inv_rms);
    store_vec(static_cast<T*>(p.out) + row * p.out_row_stride + vec * kVecElems, float_to_vec<T>(y));
  }
}

template <typename T, bool kAddResidual>
cudaError_t launch(const RmsNormParams& p, cudaStream_t stream) {
  const int num_vecs = p.hidden / kVecElems;
  const int threads_per_row = std::min(kMaxThreadsPerRow, (num_vecs + 31) / 32 * 32);
  const int vecs_per_thread = (num_vecs + threads_per_row - 1) / threads_per_row;
  const int rows_per_block = std::max(1, kMinThreadsPerBlock / threads_per_row);
  const dim3 block(threads_per_row, rows_per_block);
  const dim3 grid(static_cast<unsigned>((p.num_rows + rows_per_block - 1) / rows_per_block));
  switch (vecs_per_thread) {
    case 1: return launch_pdl(rms_norm_kernel<T, kAddResidual, 1>, grid, block, 0, stream, p);
    case 2: return launch_pdl(rms_norm_kernel<T, kAddResidual, 2>, grid, block, 0, stream, p);
    case 4: return launch_pdl(rms_norm_kernel<T, kAddResidual, 4>, grid, block, 0, stream, p);
    default: return cudaErrorInvalidValue;
  }
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace

cudaError_t rms_norm(const RmsNormParams& p, ScalarType dtype, cudaStream_t stream) {
  if (p.hidden <= 0 || p.hidden % kVecElems != 0 || p.hidden > 4 * kMaxThreadsPerRow * kVecElems) {
    return cudaErrorInvalidValue;
  }
  if (p.input_row_stride % kVecElems != 0 || p.out_row_stride % kVecElems != 0 ||
      (p.residual != nullptr && p.residual_row_stride % kVecElems != 0)) {
    return cudaErrorInvalidValue;
  }
  if (!aligned16(p.out) || !aligned16(p.input) || !aligned16(p.weight) ||
      (p.residual != nullptr && !aligned16(p.residual))) {
    return cudaErrorMisalignedAddress;
  }
  if (p.num_rows == 0) return cudaSuccess;
  return dispatch_half_types(dtype, [&](auto tag) {
    using T = decltype(tag);
    return p.residual != nullptr ? launch<T, true>(p, stream) : launch<T, false>(p, stream);
  });
}

}  // namespace rtpllm::cuda

// Skinny GEMM for decode: y[M, N] = x[M, K] @ w[N, K]^T (+ bias), M <= kGemvMaxRows.
//
// At decode batch sizes a linear layer is a pass over its weights; the kernel streams every
// weight row exactly once with 16-byte loads, several in flight per thread, and keeps the few
// activation rows in L1. cuBLAS reaches ~2.1-2.2 TB/s on these shapes; a plain streaming
// kernel gets much closer to the copy ceiling.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/ops/dtype.h"

namespace rtpllm::cuda {

inline constexpr int kGemvMaxRows = 4;

struct GemvParams {
  void* y;             // [M, N], row stride ldy elements
  const void* x;       // [M, K], row stride ldx elements; 16-byte aligned rows
  const void* w;       // [N, K] row-major, contiguous; 16-byte aligned
  const void* bias;    // [N] or nullptr
  int m;               // 1 .. kGemvMaxRows
  int n;
  int k;               // a multiple of 8
  int64_t ldx;         // a multiple of 8
  int64_t ldy;
};

// cudaErrorInvalidValue for unsupported sizes, strides, alignment or dtype.
cudaError_t gemv(const GemvParams& params, ScalarType dtype, cudaStream_t stream);

// The gate/up projection of a gated MLP fused with its activation: w is [2 * N, K], gate rows then
// up rows (bias likewise [2 * N] or nullptr), and y[M, N] = silu(x @ gate^T) * (x @ up^T), rounded
// to T where the unfused GEMV + silu_and_mul would round. Saves the [M, 2N] intermediate and a launch.
cudaError_t gemv_silu_and_mul(const GemvParams& params, ScalarType dtype, cudaStream_t stream);

}  // namespace rtpllm::cuda

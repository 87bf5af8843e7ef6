// Hopper (sm90a) GEMMs built from CUTLASS 3.x collectives: TMA loads, WGMMA, warp-specialized
// persistent kernels. y[M, N] = x[M, K] @ w[N, K]^T (+ bias[N]) (+ residual[M, N]).
//
// Each kernel in sm90_gemm_configs.h is one tile shape / schedule; which one serves a shape is
// data (python/rtpllm/layers/gemm_dispatch.json, written by bench/gpu/bench_gemm.py), not code.
// "swap-AB" kernels compute y^T = w @ x^T so that the weight's N fills the 128-wide WGMMA M side
// and a handful of tokens sit on the narrow N side: the decode shapes.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cuda/ops/dtype.h"

namespace rtpllm::cuda {

struct Sm90GemmParams {
  void* y;                // [M, N], row stride ldy
  const void* x;          // [M, K], row stride ldx
  const void* w;          // [N, K] row-major, contiguous
  const void* bias;       // [N] or nullptr
  const void* residual;   // [M, N] with row stride ld_residual, or nullptr
  int m;
  int n;                  // a multiple of 8 (TMA needs 16-byte rows)
  int k;                  // a multiple of 8
  int64_t ldx;            // multiples of 8
  int64_t ldy;
  int64_t ld_residual;
  // How output tiles are shared out: 1 = one CTA per tile; >1 = split-K into that many slices;
  // 0 = stream-K. Anything but 1 needs a kernel with the stream-K tile scheduler.
  int splits;
  // Tile rasterization: consecutive CTAs walk a band this many tiles wide (1, 2, 4 or 8) so that
  // the operands they share stay in L2. Large problems gain from more.
  int swizzle;
  void* workspace;        // scratch for split-K / stream-K partial sums; may be nullptr when none is needed
  size_t workspace_bytes;
};

struct Sm90GemmKernelInfo {
  const char* name;
  bool swap_ab;
  bool stream_k;          // accepts splits != 1
  int tile_m, tile_n, tile_k;  // in the kernel's own (possibly swapped) orientation
};

int sm90_gemm_kernel_count();
const Sm90GemmKernelInfo& sm90_gemm_kernel_info(int kernel);

// Bytes of workspace `kernel` needs for these params (0 for most); cudaErrorInvalidValue when the
// kernel cannot run them.
cudaError_t sm90_gemm_workspace_size(int kernel, const Sm90GemmParams& params, ScalarType dtype, size_t* bytes);

// cudaErrorInvalidValue for an unknown kernel, dtype, or a shape/stride/alignment it cannot take;
// cudaErrorNotSupported when the build has no sm90a kernels.
cudaError_t sm90_gemm(int kernel, const Sm90GemmParams& params, ScalarType dtype, cudaStream_t stream);

}  // namespace rtpllm::cuda

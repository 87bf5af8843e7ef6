// sm90_gemm_configs.h lines as C++ types: one struct per kernel, named after its line. Light on
// purpose (no CUTLASS headers) so the registry can name the kernels without compiling them.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>

#include "cuda/gemm/sm90_gemm.h"
#include "cuda/gemm/sm90_gemm_configs.h"

namespace rtpllm::cuda::sm90 {

struct Cooperative {};
struct Pingpong {};
struct Persistent {};
struct StreamK {};

namespace configs {
#define RTPLLM_SM90_GEMM_CONFIG_STRUCT(NAME, SWAP, TM, TN, TK, CM, CN, SCHEDULE, TILE_SCHEDULER) \
  struct NAME {                                                                                  \
    static constexpr bool kSwapAB = SWAP;                                                        \
    static constexpr int kTileM = TM, kTileN = TN, kTileK = TK, kClusterM = CM, kClusterN = CN;  \
    using Schedule = SCHEDULE;                                                                   \
    using TileScheduler = TILE_SCHEDULER;                                                        \
  };
RTPLLM_SM90_GEMM_CONFIGS(RTPLLM_SM90_GEMM_CONFIG_STRUCT)
#undef RTPLLM_SM90_GEMM_CONFIG_STRUCT
}  // namespace configs

// Defined in sm90_gemm_kernel.cuh, instantiated once per (config, dtype) by a generated .cu file.
template <class Config, class T>
cudaError_t run_sm90_gemm(const Sm90GemmParams& params, cudaStream_t stream, size_t* workspace_bytes);

}  // namespace rtpllm::cuda::sm90

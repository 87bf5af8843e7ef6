// The KV pool the transfer and store benchmarks move blocks out of and into: one allocation
// holding every layer's [K, V][num_blocks][block] planes (Llama-3-8B's 8 KV heads x 128 dims in
// bf16), in host memory or, in a build with RTPLLM_BENCH_CUDA, on a GPU; filled with ones.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "rtpllm/kvstore/kv_layout.h"
#ifdef RTPLLM_BENCH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace rtpllm::kvbench {

constexpr int32_t kHeads = 8, kHeadDim = 128, kElementBytes = 2;

[[noreturn]] inline void die(const char* program, const std::string& message) {
  std::fprintf(stderr, "%s: %s\n", program, message.c_str());
  std::exit(1);
}

#ifdef RTPLLM_BENCH_CUDA
inline void cuda_check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) die("cuda", std::string(what) + ": " + cudaGetErrorString(status));
}
#endif

class KVPool {
 public:
  KVPool(MemoryKind memory, int device, int32_t num_layers, int32_t num_blocks, int32_t block_tokens,
         int32_t num_kv_heads = kHeads)
      : memory_(memory) {
    layout.memory = memory;
    layout.device_index = device;
    layout.num_blocks = num_blocks;
    layout.block_size = block_tokens;
    layout.num_kv_heads = num_kv_heads;
    layout.head_dim = kHeadDim;
    layout.element_bytes = kElementBytes;
    layout.block_stride_bytes = layout.block_bytes();
    const size_t plane = static_cast<size_t>(num_blocks) * layout.block_bytes();
    bytes_ = plane * 2 * num_layers;
    if (memory == MemoryKind::CUDA) {
#ifdef RTPLLM_BENCH_CUDA
      cuda_check(cudaSetDevice(device), "cudaSetDevice");
      cuda_check(cudaMalloc(&base_, bytes_), "cudaMalloc");
      cuda_check(cudaMemset(base_, 1, bytes_), "cudaMemset");
#else
      die("bench", "--memory cuda needs a build with RTPLLM_CUDA=ON");
#endif
    } else {
      base_ = std::aligned_alloc(4096, bytes_);
      std::memset(base_, 1, bytes_);
    }
    const uint64_t b = reinterpret_cast<uint64_t>(base_);
    for (int32_t l = 0; l < num_layers; ++l) layout.layers.push_back({b + 2 * l * plane, b + (2 * l + 1) * plane});
  }
  ~KVPool() {
#ifdef RTPLLM_BENCH_CUDA
    if (memory_ == MemoryKind::CUDA) {
      cudaFree(base_);
      return;
    }
#endif
    std::free(base_);
  }
  KVPool(const KVPool&) = delete;
  KVPool& operator=(const KVPool&) = delete;

  KVLayout layout;

 private:
  MemoryKind memory_;
  void* base_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace rtpllm::kvbench

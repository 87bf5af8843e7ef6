// Pinned, device-mapped, portable host memory (cudaHostAlloc): what the CUDA copy engine's kernel
// reads and writes directly, and what lets cudaMemcpyAsync run asynchronously.
#pragma once

#include <string>

#include "rtpllm/kvstore/host_allocator.h"

namespace rtpllm::cuda {

class CudaHostAllocator final : public HostAllocator {
 public:
  std::string name() const override { return "cuda_pinned"; }
  // Throws std::runtime_error naming the CUDA error (pinning is limited by the OS: a large host
  // tier can fail here, and the caller reports it as a configuration error).
  void* allocate(size_t bytes) override;
  void deallocate(void* ptr) noexcept override;
};

}  // namespace rtpllm::cuda

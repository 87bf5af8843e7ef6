// Pinned staging buffers (cudaHostAlloc): the device's copy engine reads them directly, so the
// copies to the GPU run at the link's speed and overlap with the next reads.
#pragma once

#include "rtpllm/loader/host_allocator.h"

namespace rtpllm::cuda {

class CudaHostAllocator final : public loader::HostAllocator {
 public:
  // cudaHostAlloc returns page-aligned memory, which covers any alignment up to 4096.
  void* allocate(size_t bytes, size_t alignment) override;
  void deallocate(void* buffer) override;
};

}  // namespace rtpllm::cuda

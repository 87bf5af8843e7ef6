// Staging buffers from the C heap (the CPU build; tests).
#pragma once

#include "rtpllm/loader/host_allocator.h"

namespace rtpllm::loader {

// posix_memalign / free.
class AlignedHostAllocator final : public HostAllocator {
 public:
  void* allocate(size_t bytes, size_t alignment) override;
  void deallocate(void* buffer) override;
};

}  // namespace rtpllm::loader

// Where the loader's staging buffers come from. The CPU build uses aligned malloc; the CUDA build
// pins them (cudaHostAlloc) so copies to the device run at full speed and asynchronously.
#pragma once

#include <cstddef>

namespace rtpllm::loader {

class HostAllocator {
 public:
  virtual ~HostAllocator() = default;
  // A buffer of `bytes` whose address is a multiple of `alignment` (a power of two, at most 4096:
  // O_DIRECT reads into it). Throws std::bad_alloc (or a subclass) when it cannot.
  virtual void* allocate(size_t bytes, size_t alignment) = 0;
  // Returns a buffer from `allocate`; the loader calls it only after every copy out of it finished.
  virtual void deallocate(void* buffer) = 0;
};

}  // namespace rtpllm::loader

#include "rtpllm/loader/aligned_host_allocator.h"

#include <cstdlib>
#include <new>

namespace rtpllm::loader {

void* AlignedHostAllocator::allocate(size_t bytes, size_t alignment) {
  void* buffer = nullptr;
  if (alignment < sizeof(void*)) alignment = sizeof(void*);
  if (::posix_memalign(&buffer, alignment, bytes == 0 ? 1 : bytes) != 0) throw std::bad_alloc();
  return buffer;
}

void AlignedHostAllocator::deallocate(void* buffer) { std::free(buffer); }

}  // namespace rtpllm::loader

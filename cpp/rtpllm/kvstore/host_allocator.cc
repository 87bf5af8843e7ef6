#include "rtpllm/kvstore/host_allocator.h"

#include <cstdlib>
#include <new>
#include <stdexcept>
#include <utility>

namespace rtpllm {

void* AlignedHostAllocator::allocate(size_t bytes) {
  if (bytes == 0) throw std::invalid_argument("HostAllocator: cannot allocate 0 bytes");
  void* ptr = nullptr;
  if (posix_memalign(&ptr, kHostBufferAlignment, bytes) != 0) throw std::bad_alloc();
  return ptr;
}

void AlignedHostAllocator::deallocate(void* ptr) noexcept { std::free(ptr); }

HostBuffer::HostBuffer(std::shared_ptr<HostAllocator> allocator, size_t bytes) : allocator_(std::move(allocator)) {
  if (!allocator_) throw std::invalid_argument("HostBuffer: null allocator");
  data_ = static_cast<uint8_t*>(allocator_->allocate(bytes));
  size_ = bytes;
}

HostBuffer::HostBuffer(HostBuffer&& other) noexcept
    : allocator_(std::move(other.allocator_)), data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}

HostBuffer& HostBuffer::operator=(HostBuffer&& other) noexcept {
  if (this != &other) {
    reset();
    allocator_ = std::move(other.allocator_);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

void HostBuffer::reset() noexcept {
  if (data_ != nullptr) allocator_->deallocate(data_);
  data_ = nullptr;
  size_ = 0;
}

}  // namespace rtpllm

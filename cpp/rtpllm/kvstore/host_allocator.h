// Host memory for KV block buffers (the host tier's pool, the disk tier's staging buffers).
//
// Injectable so that the copy engine decides what host memory it can use: the CPU engine takes
// ordinary page-aligned memory (AlignedHostAllocator, below); the CUDA engine needs pinned,
// device-mapped memory (cuda/kvstore/cuda_host_allocator.h), since its copy kernel reads and writes
// host buffers directly. Every buffer is at least kHostBufferAlignment aligned, which is also what
// O_DIRECT file I/O needs.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace rtpllm {

inline constexpr size_t kHostBufferAlignment = 4096;

class HostAllocator {
 public:
  virtual ~HostAllocator() = default;
  virtual std::string name() const = 0;
  // A kHostBufferAlignment-aligned buffer (contents unspecified) of `bytes` (> 0) bytes. Throws
  // std::bad_alloc (or std::runtime_error naming the cause) when the memory is not available.
  virtual void* allocate(size_t bytes) = 0;
  // Returns a buffer from allocate(); nullptr is a no-op.
  virtual void deallocate(void* ptr) noexcept = 0;
};

// posix_memalign'ed pageable memory: the CPU build.
class AlignedHostAllocator final : public HostAllocator {
 public:
  std::string name() const override { return "aligned"; }
  void* allocate(size_t bytes) override;
  void deallocate(void* ptr) noexcept override;
};

// One allocation, freed by its allocator when the buffer goes away. Move-only.
class HostBuffer {
 public:
  HostBuffer() = default;
  HostBuffer(std::shared_ptr<HostAllocator> allocator, size_t bytes);
  ~HostBuffer() { reset(); }
  HostBuffer(HostBuffer&& other) noexcept;
  HostBuffer& operator=(HostBuffer&& other) noexcept;
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;

  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  void reset() noexcept;

  std::shared_ptr<HostAllocator> allocator_;
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace rtpllm

#include "cuda/kvstore/cuda_host_allocator.h"

#include <cuda_runtime.h>

#include <stdexcept>

namespace rtpllm::cuda {

void* CudaHostAllocator::allocate(size_t bytes) {
  if (bytes == 0) throw std::invalid_argument("CudaHostAllocator: cannot allocate 0 bytes");
  void* ptr = nullptr;
  const cudaError_t err = cudaHostAlloc(&ptr, bytes, cudaHostAllocPortable | cudaHostAllocMapped);
  if (err != cudaSuccess) {
    throw std::runtime_error("cudaHostAlloc of " + std::to_string(bytes) + " bytes failed: " + cudaGetErrorString(err));
  }
  return ptr;
}

void CudaHostAllocator::deallocate(void* ptr) noexcept {
  if (ptr != nullptr) cudaFreeHost(ptr);
}

}  // namespace rtpllm::cuda

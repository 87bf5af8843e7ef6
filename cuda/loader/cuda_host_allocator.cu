#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "cuda/loader/cuda_host_allocator.h"

namespace rtpllm::cuda {

void* CudaHostAllocator::allocate(size_t bytes, size_t alignment) {
  if (alignment > 4096) throw std::invalid_argument("CudaHostAllocator: alignment above 4096 is not supported");
  void* buffer = nullptr;
  const cudaError_t err = cudaHostAlloc(&buffer, bytes == 0 ? 1 : bytes, cudaHostAllocDefault);
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("cudaHostAlloc of ") + std::to_string(bytes) +
                             " bytes failed: " + cudaGetErrorString(err));
  return buffer;
}

void CudaHostAllocator::deallocate(void* buffer) { cudaFreeHost(buffer); }

}  // namespace rtpllm::cuda

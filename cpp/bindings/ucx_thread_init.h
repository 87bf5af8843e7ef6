// What a UcxTransfer's progress thread runs first when the KV it moves lives on a GPU: UCX's CUDA
// transports act on that thread's current device. Shared by the transfer engine's and the KV
// store's bindings.
#pragma once

#include <functional>
#include <optional>
#include <stdexcept>

#ifdef RTPLLM_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace rtpllm::bindings {

// Nothing for host memory (no device); throws std::invalid_argument naming `cuda_device` in a
// build without CUDA.
inline std::function<void()> ucx_thread_init(std::optional<int> cuda_device) {
  if (!cuda_device) return {};
#ifdef RTPLLM_WITH_CUDA
  return [device = *cuda_device] { cudaSetDevice(device); };
#else
  throw std::invalid_argument("cuda_device: rtpllm._C was built without CUDA");
#endif
}

}  // namespace rtpllm::bindings

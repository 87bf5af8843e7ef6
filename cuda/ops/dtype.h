// The element types the kernels accept, as a plain enum that crosses the Python boundary,
// and the dispatch that turns it into a C++ type. No framework headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace rtpllm::cuda {

enum class ScalarType : int {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
};

inline const char* scalar_type_name(ScalarType t) {
  switch (t) {
    case ScalarType::kFloat32: return "float32";
    case ScalarType::kFloat16: return "float16";
    case ScalarType::kBFloat16: return "bfloat16";
  }
  return "unknown";
}

// Calls `fn(T{})` with T = __half or __nv_bfloat16. The 16-bit activation types are the only
// ones the GPU path runs in; anything else is an error, never a silent no-op.
template <typename Fn>
cudaError_t dispatch_half_types(ScalarType t, Fn&& fn) {
  switch (t) {
    case ScalarType::kFloat16: return fn(__half{});
    case ScalarType::kBFloat16: return fn(__nv_bfloat16{});
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace rtpllm::cuda

// RMSNorm and fused residual-add + RMSNorm over rows of 16-bit activations.
//
// Semantics match Hugging Face's LlamaRMSNorm / Qwen3RMSNorm in the activation dtype T:
//   sum   = T(input + residual)                 (fused variant only; written back to residual)
//   norm  = T(sum * rsqrt(mean(sum^2) + eps))   (statistics in fp32)
//   out   = T(weight * norm)
// The intermediate rounding to T before the weight multiply is HF's (`weight * x.to(dtype)`);
// keeping it makes the GPU path agree with `transformers` bit for bit on most elements.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/ops/dtype.h"

namespace rtpllm::cuda {

struct RmsNormParams {
  void* out;              // [num_rows, hidden], row stride out_row_stride; may alias input
  const void* input;      // [num_rows, hidden], row stride input_row_stride
  void* residual;         // [num_rows, hidden], row stride residual_row_stride, or nullptr.
                          // When set: residual += input, and the norm reads the new residual.
  const void* weight;     // [hidden]
  int64_t num_rows;
  int hidden;             // multiple of 8 (16-byte vectors), at most 32768
  int64_t input_row_stride;     // elements; multiple of 8
  int64_t out_row_stride;       // elements; multiple of 8
  int64_t residual_row_stride;  // elements; multiple of 8 (ignored without residual)
  float eps;
};

// All pointers 16-byte aligned. Returns cudaErrorInvalidValue for an unsupported dtype or
// hidden size, else the launch status.
cudaError_t rms_norm(const RmsNormParams& params, ScalarType dtype, cudaStream_t stream);

}  // namespace rtpllm::cuda

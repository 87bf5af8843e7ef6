// The gated MLP activation: out = silu(gate) * up for input rows laid out [gate | up].
// Rounding matches HF's `act_fn(gate_proj(x)) * up_proj(x)` in the activation dtype T:
// silu in fp32 rounded to T, then the product rounded to T.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/ops/dtype.h"

namespace rtpllm::cuda {

struct SiluAndMulParams {
  void* out;             // [num_tokens, inter_size], row stride out_row_stride
  const void* input;     // [num_tokens, 2 * inter_size]: gate in [:inter_size], up in [inter_size:];
                         // row stride input_row_stride
  int64_t num_tokens;
  int inter_size;        // multiple of 8
  int64_t input_row_stride;  // elements; multiple of 8
  int64_t out_row_stride;    // elements; multiple of 8
};

// Pointers 16-byte aligned. Returns cudaErrorInvalidValue for an unsupported dtype or size.
cudaError_t silu_and_mul(const SiluAndMulParams& params, ScalarType dtype, cudaStream_t stream);

}  // namespace rtpllm::cuda

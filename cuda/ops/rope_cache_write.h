// Rotary position embedding (neox / HF Llama "rotate half" style) fused with the write of the
// step's K and V into the paged KV cache. q is rotated in place; k is rotated on its way into
// the cache (the k input is left untouched); v is copied into the cache.
//
// Per head, with h = rotary_dim / 2 and (cos, sin) read at the token's position:
//   out[i]     = x[i] * cos[i] - x[i + h] * sin[i]
//   out[i + h] = x[i + h] * cos[i] + x[i] * sin[i]        for i < h
//   out[i]     = x[i]                                      for rotary_dim <= i < head_dim
// computed in fp32 and rounded once to T.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/ops/dtype.h"

namespace rtpllm::cuda {

struct RopeCacheWriteParams {
  void* q;                        // [num_tokens, num_heads, head_dim], token stride q_token_stride; rotated in place
  const void* k;                  // [num_tokens, num_kv_heads, head_dim], token stride k_token_stride (pre-RoPE)
  const void* v;                  // [num_tokens, num_kv_heads, head_dim], token stride v_token_stride
  const int64_t* positions;       // [num_tokens]
  const float* cos_sin_cache;     // [max_position, rotary_dim]: cos(pos * inv_freq) in [:rotary_dim / 2],
                                  // sin(pos * inv_freq) in [rotary_dim / 2:] (inv_freq already llama3-scaled)
  const int64_t* slot_mapping;    // [num_tokens]: block_id * block_size + offset; negative = padding token
                                  // (e.g. a CUDA-graph batch's filler), whose K/V is not written
  void* k_cache;                  // [num_blocks * block_size, num_kv_heads, head_dim]: the layer's K plane
  void* v_cache;                  // [num_blocks * block_size, num_kv_heads, head_dim]: the layer's V plane
  int num_tokens;
  int num_heads;
  int num_kv_heads;
  int head_dim;                   // multiple of 8
  int rotary_dim;                 // multiple of 16, at most head_dim
  int64_t max_position;           // rows of cos_sin_cache; a position outside [0, max_position) yields NaN
  int64_t q_token_stride;         // elements; multiple of 8 (q may be a view into a fused qkv tensor)
  int64_t k_token_stride;
  int64_t v_token_stride;
};

// All tensor pointers 16-byte aligned. Returns cudaErrorInvalidValue for an unsupported dtype
// or size, else the launch status.
cudaError_t rope_and_cache_write(const RopeCacheWriteParams& params, ScalarType dtype, cudaStream_t stream);

}  // namespace rtpllm::cuda

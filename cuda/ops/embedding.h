// Embedding lookup: out[t] = table[ids[t]].
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/ops/dtype.h"

namespace rtpllm::cuda {

struct EmbeddingParams {
  void* out;             // [num_tokens, hidden], row stride out_row_stride
  const void* table;     // [vocab_size, hidden], rows contiguous
  const void* ids;       // [num_tokens] int32 or int64 (ids_are_int64)
  int64_t num_tokens;
  int64_t vocab_size;    // an id outside [0, vocab_size) yields a zero row, the convention of a
                         // vocabulary-sharded embedding (each shard zeroes the ids it does not own);
                         // ids are validated against the vocabulary before they reach the GPU
  int hidden;            // multiple of 8
  int64_t out_row_stride;  // elements; multiple of 8
  bool ids_are_int64;
};

// Pointers 16-byte aligned (ids: naturally aligned). Returns cudaErrorInvalidValue for an
// unsupported dtype or size.
cudaError_t embedding(const EmbeddingParams& params, ScalarType dtype, cudaStream_t stream);

}  // namespace rtpllm::cuda

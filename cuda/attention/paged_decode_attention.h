// Paged decode attention: one query token per sequence attends over the sequence's K/V, read
// through its block table from the layer's paged cache [2, num_blocks, block_size, num_kv_heads,
// head_dim] (K plane, then V plane).
//
// Plan/run split, as CUDA graphs need it:
//   plan_paged_decode()   host only, once per step (or once per captured batch size): picks how
//                         many splits each sequence's context is cut into, from the batch shape,
//                         the SM count and the longest context it must serve.
//   paged_decode_attention()  the launch; everything it does depends only on the plan and on
//                         device memory (seq_lens, block_tables), so a captured graph replays
//                         it correctly with new lengths as long as they fit the plan's bound.
// With num_splits > 1 each split writes a normalised partial output and its log-sum-exp to the
// workspace and the last split of each group to finish merges them (one kernel either way);
// with num_splits == 1 the output is written directly. Launches sharing a workspace must run
// one after another (one stream), as the counters and partials are reused.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/ops/dtype.h"

namespace rtpllm::cuda {

struct PagedDecodeParams {
  const void* q;                // [num_seqs, num_heads, head_dim], sequence stride q_stride (elements)
  const void* k_cache;          // [num_blocks, block_size, num_kv_heads, head_dim]: the layer's K plane
  const void* v_cache;          // [num_blocks, block_size, num_kv_heads, head_dim]: the layer's V plane
  const int32_t* block_tables;  // [num_seqs, block_table_stride]: physical block of each logical block
  const int32_t* seq_lens;      // [num_seqs]: context length including the token being decoded
  void* out;                    // [num_seqs, num_heads, head_dim], sequence stride out_stride (elements)
  float* partial_out;           // [num_seqs, num_heads, num_splits, head_dim]: per-split normalised
                                // outputs; only used (and only needed) when num_splits > 1
  float* partial_lse;           // [num_seqs, num_heads, num_splits]: per-split log2-sum-exp of the
                                // scaled scores (-inf for an empty split); num_splits > 1 only
  int* split_counters;          // [num_seqs, num_kv_heads * ceil(group / 16)]: arrivals per split group;
                                // zero before the first launch, and every launch leaves it zero;
                                // num_splits > 1 only
  int num_seqs;                 // at most 65535
  int num_heads;
  int num_kv_heads;             // divides num_heads
  int head_dim;                 // 64 or 128
  int block_size;               // 16, 32 or 64
  int block_table_stride;       // elements
  int64_t q_stride;             // elements; even
  int64_t out_stride;           // elements; multiple of 8
  int num_splits;               // from plan_paged_decode; at most 64
  float scale;                  // softmax scale, usually 1 / sqrt(head_dim)
};

struct PagedDecodePlanInputs {
  int num_seqs;
  int num_heads;
  int num_kv_heads;
  int head_dim;
  int block_size;
  ScalarType dtype;
  int max_seq_len;  // the longest context the launch must serve (for a CUDA graph: the bound)
  int max_splits;   // what the caller's workspace holds: num_splits <= max_splits
};

// Writes the split count to *num_splits. Host only; never synchronises the device.
cudaError_t plan_paged_decode(const PagedDecodePlanInputs& inputs, int* num_splits);

// Launches the decode kernel on `stream`.
// Returns cudaErrorInvalidValue for an unsupported head_dim / block_size / dtype / shape,
// cudaErrorMisalignedAddress for a misaligned pointer, else the launch status.
cudaError_t paged_decode_attention(const PagedDecodeParams& params, ScalarType dtype, cudaStream_t stream);

}  // namespace rtpllm::cuda

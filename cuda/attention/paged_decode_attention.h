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

// Optional: RoPE and this step's cache write, fused into the decode launch (decode-only steps of
// models whose rotary embedding spans the whole head). When `cos_sin_cache` is set, `q` holds
// the step's queries before RoPE, which the kernel rotates in registers, and `k` / `v` the new
// token's key (before RoPE) and value: the kernel uses them for context position seq_len - 1
// and writes them (K rotated) into the cache at slot_mapping[seq], or nowhere where that slot is
// negative (a padded CUDA-graph slot). Same rotation and rounding as rope_and_cache_write.
struct DecodeRopeParams {
  const void* k;                // [num_seqs, num_kv_heads, head_dim], sequence stride k_stride
  const void* v;                // [num_seqs, num_kv_heads, head_dim], sequence stride v_stride
  const int64_t* positions;     // [num_seqs]: the new token's position
  const float* cos_sin_cache;   // [max_position, head_dim]: cos | sin halves (see rope_cache_write.h)
  const int64_t* slot_mapping;  // [num_seqs]: cache slot of the new token; negative = do not write
  int64_t max_position;         // a position outside [0, max_position) yields NaN
  int64_t k_stride;             // elements; multiple of 8
  int64_t v_stride;             // elements; multiple of 8
};

struct PagedDecodeParams {
  const void* q;                // [num_seqs, num_heads, head_dim], sequence stride q_stride (elements)
  void* k_cache;                // [num_blocks, block_size, num_kv_heads, head_dim]: the layer's K plane
                                // (written only with fused RoPE: the new token's row)
  void* v_cache;                // [num_blocks, block_size, num_kv_heads, head_dim]: the layer's V plane
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
  DecodeRopeParams rope;        // all zero: q is already rotated and the new K/V already cached
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

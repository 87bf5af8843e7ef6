// Prefill / extend attention over the paged KV cache.
//
// For every sequence of a batch, its new tokens (a contiguous run of `q`) attend causally to the
// sequence's whole context in the paged cache: new token t of sequence i sits at position
// seq_lens[i] - q_len_i + t and sees keys 0 .. that position. The K/V of the new tokens must
// already be in the cache (the RoPE + cache-write kernel runs first).
//
// Query heads of one GQA group are packed into the rows of one tile, so the group reads each K/V
// tile once. Two implementations share the tile mapping and the paged gather:
//   kSm80Mma:   FlashAttention-2 style, mma.sync m16n8k16, 64x64 tiles, cp.async double buffer.
//   kSm90Wgmma: Hopper (sm_90a) warp-specialized: one producer warpgroup gathers K/V pages with
//               cp.async into a 3-stage (head_dim 128) / 4-stage (64) mbarrier ring, two consumer
//               warpgroups run wgmma on 128x128 tiles (S = Q K^T from shared memory, O += P V with
//               P in registers) and take turns on the tensor cores so that one's softmax runs
//               under the other's products.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/ops/dtype.h"

namespace rtpllm::cuda {

enum class PrefillAttentionImpl : int {
  kAuto = 0,        // kSm90Wgmma on compute capability 9.0, kSm80Mma on 8.x and later others
  kSm80Mma = 1,     // any GPU with compute capability >= 8.0
  kSm90Wgmma = 2,   // compute capability 9.0 only (needs the library built for sm_90a)
};

struct PrefillAttentionParams {
  void* out;                       // [num_tokens, num_heads, head_dim], q's dtype; rows out_token_stride apart
  const void* q;                   // [num_tokens, num_heads, head_dim]; rows q_token_stride apart
  const void* kv_cache;            // [2, num_blocks, block_size, num_kv_heads, head_dim], contiguous, K then V
  const int32_t* query_start_loc;  // [num_seqs + 1], cumulative new-token counts (cu_seqlens_q)
  const int32_t* seq_lens;         // [num_seqs], context length including the new tokens
  const int32_t* block_tables;     // [num_seqs, max_blocks_per_seq], row-major, cache block ids
  int64_t q_token_stride;          // elements between consecutive tokens of q (>= num_heads * head_dim)
  int64_t out_token_stride;        // elements between consecutive tokens of out
  int num_seqs;
  int num_heads;
  int num_kv_heads;                // divides num_heads
  int head_dim;                    // 64 or 128
  int block_size;                  // tokens per cache block, a power of two
  int num_blocks;                  // cache blocks per K (and per V) half of kv_cache
  int max_blocks_per_seq;          // columns of block_tables
  int max_query_len;               // max over sequences of the new-token count; sizes the grid
  float scale;                     // softmax scale, usually 1 / sqrt(head_dim)
  ScalarType dtype;                // kFloat16 or kBFloat16 (q, kv_cache and out)
  PrefillAttentionImpl impl;
};

// Returns nullptr when `params` can be launched, otherwise a message naming the bad field.
const char* check_prefill_attention_params(const PrefillAttentionParams& params);

// Validates, picks the implementation and launches on `stream`. Returns cudaErrorInvalidValue for
// parameters that check_prefill_attention_params rejects, cudaErrorNotSupported when kSm90Wgmma is
// asked for on another architecture, and otherwise the launch's status.
cudaError_t launch_prefill_attention(const PrefillAttentionParams& params, cudaStream_t stream);

}  // namespace rtpllm::cuda

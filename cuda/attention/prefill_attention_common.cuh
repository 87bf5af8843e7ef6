// Pieces shared by both prefill attention kernels: the kernel parameters, the mapping of a CTA to
// its tile, the 128-byte-swizzled shared-memory tile layout, the paged K/V gather and the PTX
// wrappers for cp.async and mbarriers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

namespace rtpllm::cuda::prefill {

// Derived from PrefillAttentionParams on the host; passed by value as a __grid_constant__.
struct KernelParams {
  void* out;                       // [num_tokens, num_heads, head_dim]; rows out_token_stride apart
  const void* q;                   // [num_tokens, num_heads, head_dim]; rows q_token_stride apart
  const void* k_cache;             // [num_blocks * block_size, num_kv_heads, head_dim]
  const void* v_cache;             // [num_blocks * block_size, num_kv_heads, head_dim]
  const int32_t* query_start_loc;  // [num_seqs + 1]
  const int32_t* seq_lens;         // [num_seqs]
  const int32_t* block_tables;     // [num_seqs, max_blocks_per_seq]
  int64_t q_token_stride;
  int64_t out_token_stride;
  int64_t kv_slot_stride;          // num_kv_heads * head_dim: elements between consecutive cache slots
  int num_heads;
  int num_kv_heads;
  int group_size;                  // num_heads / num_kv_heads: query heads packed per K/V head
  int block_size_log2;
  int max_blocks_per_seq;
  float scale_log2;                // softmax scale * log2(e); scores are exponentiated with exp2
};

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// What one CTA computes: BLOCK_M consecutive "packed rows" of one sequence and one K/V head.
// Packed row r is query token r / group_size, query head kv_head * group_size + r % group_size,
// so a tile holds every query head that shares the K/V head.
struct TileCoords {
  int seq;
  int kv_head;
  int q_begin;      // index in q / out of the sequence's first new token
  int q_len;        // new tokens of the sequence
  int seq_len;      // context length including the new tokens
  int prefix;       // seq_len - q_len: keys already cached before the new tokens
  int row_begin;    // first packed row of the tile
  int num_kv_tiles;       // BLOCK_N-key tiles the tile attends to
  int num_unmasked_tiles; // leading tiles that no row of the tile needs to mask
};

// The tile of grid position (block_from_last, kv_head, seq) (locate_tile's blockIdx.x, y, z);
// false past the sequence's rows.
template <int BLOCK_M, int BLOCK_N>
__device__ __forceinline__ bool locate_tile_at(const KernelParams& p, int block_from_last, int kv_head, int seq,
                                               TileCoords& t) {
  t.seq = seq;
  t.kv_head = kv_head;
  t.q_begin = p.query_start_loc[t.seq];
  t.q_len = p.query_start_loc[t.seq + 1] - t.q_begin;
  t.seq_len = p.seq_lens[t.seq];
  t.prefix = t.seq_len - t.q_len;
  const int num_rows = t.q_len * p.group_size;
  const int m_block = (num_rows + BLOCK_M - 1) / BLOCK_M - 1 - block_from_last;
  if (m_block < 0) return false;
  t.row_begin = m_block * BLOCK_M;
  const int first_token = t.row_begin / p.group_size;
  const int last_token = (min(t.row_begin + BLOCK_M, num_rows) - 1) / p.group_size;
  const int kv_end = t.prefix + last_token + 1;
  t.num_kv_tiles = (kv_end + BLOCK_N - 1) / BLOCK_N;
  t.num_unmasked_tiles = min(t.num_kv_tiles, (t.prefix + first_token + 1) / BLOCK_N);
  return true;
}

// Grid: (m blocks of the longest sequence, num_kv_heads, num_seqs). blockIdx.x counts from each
// sequence's last m block, so the heaviest causal tiles of all sequences start first, and CTAs
// that run together share a head's K/V in L2.
template <int BLOCK_M, int BLOCK_N>
__device__ __forceinline__ bool locate_tile(const KernelParams& p, TileCoords& t) {
  return locate_tile_at<BLOCK_M, BLOCK_N>(p, static_cast<int>(blockIdx.x), static_cast<int>(blockIdx.y),
                                          static_cast<int>(blockIdx.z), t);
}

// The last key packed row `row` may attend to. Rows past the sequence's new tokens only pad the
// tile; they are never stored, and limiting them to the context keeps their arithmetic finite.
__device__ __forceinline__ int row_key_limit(const TileCoords& t, int group_size, int row) {
  const int token = row / group_size;
  return token < t.q_len ? t.prefix + token : t.seq_len - 1;
}

// Byte offset of 16-byte chunk `chunk` (0 .. HEAD_DIM / 8 - 1) of row `row` in a [ROWS, HEAD_DIM]
// 16-bit tile. The tile is stored as HEAD_DIM / 64 panels of [ROWS, 64 elements] (128 bytes per
// row) with the 128-byte XOR swizzle that wgmma descriptors and TMA use: chunk c of row r lands
// at chunk c ^ (r % 8). ldmatrix and wgmma reads of 8 consecutive rows then hit distinct banks.
// The tile base must be 1024-byte aligned.
template <int ROWS>
__device__ __forceinline__ uint32_t swizzled_offset(int row, int chunk) {
  return static_cast<uint32_t>((chunk >> 3) * (ROWS * 128) + row * 128 + (((chunk & 7) ^ (row & 7)) << 4));
}

__device__ __forceinline__ uint32_t smem_addr(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// 16-byte global -> shared copy that bypasses L1; src_bytes = 0 writes zeros instead.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Gathers keys [key_begin, key_begin + BLOCK_N) of one K/V head into a swizzled [BLOCK_N, HEAD_DIM]
// tile through the sequence's block table. Each thread copies one 16-byte chunk column of a run of
// kRowsPerThread consecutive rows. Runs start at multiples of their length, so with block_size >=
// the run length a run sits in one cache page: one block-table read per thread and tile, then
// evenly strided copies. Smaller blocks take a rolled loop with a read per row. Keys at or past
// seq_len are zero-filled: the causal mask gives them zero weight, and zeros (unlike stale shared
// memory) keep 0 * V finite.
template <int HEAD_DIM, int BLOCK_N, int NUM_THREADS, typename T>
__device__ __forceinline__ void gather_kv_tile(uint32_t tile, const T* head_base, const int32_t* block_table,
                                               int key_begin, int seq_len, const KernelParams& p, int tid) {
  constexpr int kChunks = HEAD_DIM / 8;
  constexpr int kRowGroups = NUM_THREADS / kChunks;
  constexpr int kRowsPerThread = BLOCK_N / kRowGroups;
  static_assert(NUM_THREADS % kChunks == 0 && BLOCK_N % kRowGroups == 0, "gather thread layout");
  const int chunk = tid % kChunks;
  const int first_row = (tid / kChunks) * kRowsPerThread;
  const int first_key = key_begin + first_row;
  const int page_mask = (1 << p.block_size_log2) - 1;
  auto slot_src = [&](int key) {
    const int page = __ldg(block_table + min(key >> p.block_size_log2, p.max_blocks_per_seq - 1));
    const int64_t slot = (static_cast<int64_t>(page) << p.block_size_log2) | (key & page_mask);
    return head_base + slot * p.kv_slot_stride + chunk * 8;
  };
  if (page_mask + 1 >= kRowsPerThread) {
    const T* src = first_key < seq_len ? slot_src(first_key) : head_base;
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const bool valid = first_key + i < seq_len;
      cp_async_16(tile + swizzled_offset<BLOCK_N>(first_row + i, chunk), valid ? src + i * p.kv_slot_stride : head_base,
                  valid ? 16 : 0);
    }
  } else {
#pragma unroll 1
    for (int i = 0; i < kRowsPerThread; ++i) {
      const bool valid = first_key + i < seq_len;
      cp_async_16(tile + swizzled_offset<BLOCK_N>(first_row + i, chunk), valid ? slot_src(first_key + i) : head_base,
                  valid ? 16 : 0);
    }
  }
}

// Loads rows [row_begin, row_begin + ROWS) of the packed Q tile into a swizzled tile with plain
// 16-byte loads; rows past the sequence's new tokens are zero.
template <int HEAD_DIM, int ROWS, int NUM_THREADS, typename T>
__device__ __forceinline__ void load_q_tile(uint8_t* tile, const KernelParams& p, const TileCoords& t,
                                            int row_begin, int tid) {
  constexpr int kChunks = HEAD_DIM / 8;
  const T* q = static_cast<const T*>(p.q);
#pragma unroll 4
  for (int idx = tid; idx < ROWS * kChunks; idx += NUM_THREADS) {
    const int row = idx / kChunks;
    const int chunk = idx % kChunks;
    const int packed = row_begin + row;
    const int token = packed / p.group_size;
    uint4 value = make_uint4(0, 0, 0, 0);
    if (token < t.q_len) {
      const int head = t.kv_head * p.group_size + packed % p.group_size;
      value = *reinterpret_cast<const uint4*>(q + (t.q_begin + token) * p.q_token_stride + head * HEAD_DIM + chunk * 8);
    }
    *reinterpret_cast<uint4*>(tile + swizzled_offset<ROWS>(row, chunk)) = value;
  }
}

// Copies NUM_ROWS rows, starting at `first_row`, of a finished swizzled [TILE_ROWS, HEAD_DIM]
// output tile from shared memory to `out` with 16-byte stores, skipping padding rows. Tile row r
// holds packed row `row_begin + r`.
template <int HEAD_DIM, int TILE_ROWS, int NUM_ROWS, int NUM_THREADS, typename T>
__device__ __forceinline__ void store_out_rows(const uint8_t* tile, const KernelParams& p, const TileCoords& t,
                                               int row_begin, int first_row, int tid) {
  constexpr int kChunks = HEAD_DIM / 8;
  T* out = static_cast<T*>(p.out);
#pragma unroll 4
  for (int idx = tid; idx < NUM_ROWS * kChunks; idx += NUM_THREADS) {
    const int row = first_row + idx / kChunks;
    const int chunk = idx % kChunks;
    const int packed = row_begin + row;
    const int token = packed / p.group_size;
    if (token < t.q_len) {
      const int head = t.kv_head * p.group_size + packed % p.group_size;
      *reinterpret_cast<uint4*>(out + (t.q_begin + token) * p.out_token_stride + head * HEAD_DIM + chunk * 8) =
          *reinterpret_cast<const uint4*>(tile + swizzled_offset<TILE_ROWS>(row, chunk));
    }
  }
}

// Packs two floats into the 32-bit register layout of a pair of 16-bit mma operands.
template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack_pair<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

template <>
__device__ __forceinline__ uint32_t pack_pair<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// Host side: one CTA per (BLOCK_M packed query rows, KV head, sequence), with SMEM_BYTES of
// dynamic shared memory. Both architectures' launchers go through here.
template <int BLOCK_M, int NUM_THREADS, int SMEM_BYTES>
cudaError_t launch_prefill_grid(void (*kernel)(KernelParams), const KernelParams& params, int num_seqs,
                                int max_query_len, cudaStream_t stream) {
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM_BYTES);
  if (err != cudaSuccess) return err;
  const int64_t m_blocks = (static_cast<int64_t>(max_query_len) * params.group_size + BLOCK_M - 1) / BLOCK_M;
  const dim3 grid(static_cast<unsigned>(m_blocks), params.num_kv_heads, num_seqs);
  kernel<<<grid, NUM_THREADS, SMEM_BYTES, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace rtpllm::cuda::prefill

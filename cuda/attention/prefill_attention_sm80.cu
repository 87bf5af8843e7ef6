// FlashAttention-2 style prefill attention with mma.sync m16n8k16 (compute capability >= 8.0).
//
// A CTA of 4 warps owns 64 packed query rows (16 per warp) and walks the K/V tiles of 64 keys the
// rows attend to. K/V tiles are gathered from the paged cache with cp.async into two shared-memory
// stages, so tile j + 1 loads while tile j is computed. S and P never leave registers; Q fragments
// are re-read from shared memory per tile (keeping them resident pushes hdim 128 past 255 registers).
#include <type_traits>

#include "cuda/attention/prefill_attention_kernels.h"
#include "cuda/attention/prefill_attention_softmax.cuh"

namespace rtpllm::cuda::prefill {
namespace {

constexpr int kBlockM = 64;
constexpr int kBlockN = 64;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;

template <int HEAD_DIM>
struct Sm80Smem {
  static constexpr int kTileBytes = kBlockM * HEAD_DIM * 2;  // kBlockM == kBlockN
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + kTileBytes;       // 2 stages
  static constexpr int kV = kK + 2 * kTileBytes;   // 2 stages
  static constexpr int kBytes = kV + 2 * kTileBytes + 1024;  // + slack to align the base to 1024
};

__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// d += a * b for one m16n8k16 tile, fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(kThreads, 2) prefill_attention_sm80_kernel(const __grid_constant__ KernelParams p) {
  using Smem = Sm80Smem<HEAD_DIM>;
  constexpr int kDimChunks = HEAD_DIM / 8;   // 8-column chunks of O
  constexpr int kKeyChunks = kBlockN / 8;    // 8-key chunks of S
  constexpr int kDimSteps = HEAD_DIM / 16;   // k16 steps of Q K^T
  constexpr int kKeySteps = kBlockN / 16;    // k16 steps of P V

  TileCoords t;
  if (!locate_tile<kBlockM, kBlockN>(p, t)) return;

  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  const uint32_t smem_base = smem_addr(smem);
  const uint32_t q_tile = smem_base + Smem::kQ;

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const T* k_head = static_cast<const T*>(p.k_cache) + t.kv_head * HEAD_DIM;
  const T* v_head = static_cast<const T*>(p.v_cache) + t.kv_head * HEAD_DIM;
  const int32_t* block_table = p.block_tables + static_cast<int64_t>(t.seq) * p.max_blocks_per_seq;

  auto load_kv = [&](int j) {
    const int stage = j & 1;
    gather_kv_tile<HEAD_DIM, kBlockN, kThreads>(smem_base + Smem::kK + stage * Smem::kTileBytes, k_head, block_table,
                                                j * kBlockN, t.seq_len, p, tid);
    gather_kv_tile<HEAD_DIM, kBlockN, kThreads>(smem_base + Smem::kV + stage * Smem::kTileBytes, v_head, block_table,
                                                j * kBlockN, t.seq_len, p, tid);
    cp_async_commit();
  };

  load_q_tile<HEAD_DIM, kBlockM, kThreads, T>(smem + Smem::kQ, p, t, t.row_begin, tid);
  load_kv(0);

  const int row_a = warp * 16 + lane / 4;  // row A of this thread within the tile; row B = row_a + 8
  const int limit_a = row_key_limit(t, p.group_size, t.row_begin + row_a);
  const int limit_b = row_key_limit(t, p.group_size, t.row_begin + row_a + 8);

  float o[kDimChunks * 4];
#pragma unroll
  for (int i = 0; i < kDimChunks * 4; ++i) o[i] = 0.f;
  OnlineSoftmax softmax;

  // ldmatrix lane roles: lane l supplies the row address of 8x8 matrix l / 8.
  const int mat = lane / 8;
  const int mat_row = lane % 8;

  for (int j = 0; j < t.num_kv_tiles; ++j) {
    cp_async_wait<0>();
    __syncthreads();  // tile j visible to all; every warp is done with the stage tile j + 1 reuses
    if (j + 1 < t.num_kv_tiles) load_kv(j + 1);
    const uint32_t k_tile = smem_base + Smem::kK + (j & 1) * Smem::kTileBytes;
    const uint32_t v_tile = smem_base + Smem::kV + (j & 1) * Smem::kTileBytes;

    float s[kKeyChunks * 4];
#pragma unroll
    for (int i = 0; i < kKeyChunks * 4; ++i) s[i] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kDimSteps; ++kk) {
      uint32_t q_frag[4];
      ldmatrix_x4(q_frag, q_tile + swizzled_offset<kBlockM>(warp * 16 + mat_row + (mat & 1) * 8, kk * 2 + (mat >> 1)));
#pragma unroll
      for (int nn = 0; nn < kBlockN / 16; ++nn) {
        uint32_t b[4];  // {chunk 2nn: k 0-7, k 8-15}, {chunk 2nn + 1: k 0-7, k 8-15}
        ldmatrix_x4(b, k_tile + swizzled_offset<kBlockN>(nn * 16 + (mat >> 1) * 8 + mat_row, kk * 2 + (mat & 1)));
        mma_16816<T>(&s[(2 * nn) * 4], q_frag, b[0], b[1]);
        mma_16816<T>(&s[(2 * nn + 1) * 4], q_frag, b[2], b[3]);
      }
    }

    float rescale_a, rescale_b;
    const int first_key = j * kBlockN + 2 * (lane % 4);
    if (j >= t.num_unmasked_tiles) {
      softmax.exponentiate<kKeyChunks, true>(s, p.scale_log2, first_key, limit_a, limit_b, rescale_a, rescale_b);
    } else {
      softmax.exponentiate<kKeyChunks, false>(s, p.scale_log2, first_key, limit_a, limit_b, rescale_a, rescale_b);
    }
    scale_rows<kDimChunks>(o, rescale_a, rescale_b);
    uint32_t p_frag[kKeyChunks * 2];
    pack_operand<T, kKeyChunks>(s, p_frag);

#pragma unroll
    for (int kk = 0; kk < kKeySteps; ++kk) {
#pragma unroll
      for (int dd = 0; dd < HEAD_DIM / 16; ++dd) {
        uint32_t b[4];  // {chunk 2dd: keys 0-7, keys 8-15}, {chunk 2dd + 1: keys 0-7, keys 8-15}
        ldmatrix_x4_trans(b, v_tile + swizzled_offset<kBlockN>(kk * 16 + (mat & 1) * 8 + mat_row, dd * 2 + (mat >> 1)));
        mma_16816<T>(&o[(2 * dd) * 4], &p_frag[kk * 4], b[0], b[1]);
        mma_16816<T>(&o[(2 * dd + 1) * 4], &p_frag[kk * 4], b[2], b[3]);
      }
    }
  }

  // Each warp stages its own 16 rows in the Q tile (only this warp read them) and stores them.
  float inv_a, inv_b;
  softmax.finalize(inv_a, inv_b);
  stage_output<T, kBlockM, kDimChunks>(smem + Smem::kQ, o, row_a, lane, inv_a, inv_b);
  __syncwarp();
  store_out_rows<HEAD_DIM, kBlockM, 16, 32, T>(smem + Smem::kQ, p, t, t.row_begin, warp * 16, lane);
}

}  // namespace

template <typename T, int HEAD_DIM>
cudaError_t run_prefill_sm80(const KernelParams& params, int num_seqs, int max_query_len, cudaStream_t stream) {
  return launch_prefill_grid<kBlockM, kThreads, Sm80Smem<HEAD_DIM>::kBytes>(
      prefill_attention_sm80_kernel<T, HEAD_DIM>, params, num_seqs, max_query_len, stream);
}

template cudaError_t run_prefill_sm80<__half, 64>(const KernelParams&, int, int, cudaStream_t);
template cudaError_t run_prefill_sm80<__half, 128>(const KernelParams&, int, int, cudaStream_t);
template cudaError_t run_prefill_sm80<__nv_bfloat16, 64>(const KernelParams&, int, int, cudaStream_t);
template cudaError_t run_prefill_sm80<__nv_bfloat16, 128>(const KernelParams&, int, int, cudaStream_t);

}  // namespace rtpllm::cuda::prefill

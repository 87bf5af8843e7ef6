// Hopper (sm_90a) prefill attention: warp-specialized, wgmma, FlashAttention-3 style.
//
// CTA = 3 warpgroups over a 128-row packed query tile:
//   warpgroup 0 (producer): gathers 128-key K and V tiles of the paged cache with cp.async into a
//     kStages-deep ring; each landing tile completes a "full" mbarrier (one arrival per producer
//     thread, counted by cp.async.mbarrier.arrive.noinc). It gives its registers to the consumers.
//     Each thread copies a run of 16 (head_dim 128) or 8 (64) consecutive keys of one 16-byte
//     column; when a cache page holds the whole run, the page is read from the block table once per
//     tile for K and V together, one tile ahead, and the copies are straight-line (one 64-bit add
//     and one cp.async each). Before (a block-table read per K and per V tile, each waited on in
//     turn, and ~20 instructions per copy within the producer's 40 registers) the consumers spent
//     much of their time waiting for K (ncu, H100, 2026-11-27).
//     (Copying whole pages with the tensor memory accelerator instead measured no faster for
//     16-token pages, 2-4 KB boxes, and slower at head_dim 64.)
//   warpgroups 1, 2 (consumers): 64 query rows each. S = Q K^T with both operands in shared memory
//     (wgmma m64n128k16); causal mask + online softmax in registers; O += P V with P as the
//     register A operand and V read MN-major from shared memory.
// The softmax's exp2 alone costs about half the time of the two products at head_dim 128, so it has
// to run while the tensor cores work for someone else: named barriers hand the right to issue
// products back and forth between the two consumers ("ping-pong"), so one warpgroup's softmax runs
// under the other's products. Each consumer issues S_j together with P_{j-1} V_{j-1}, retires S_j
// (wait_group 1), then retires P_{j-1} V_{j-1} (wait_group 0) and runs the softmax of S_j.
// ptxas from CUDA 13.0 places that wait_group 0 freely among independent instructions (it put it
// above the softmax even when the softmax came first in the source). FlashAttention-3's order
// (O rescaled between the two issues, the softmax between the two waits, the probabilities into a
// second operand buffer, the wait pinned below the softmax by a shared store that depends on it)
// did overlap in the SASS but measured 3-5% slower on the H100 (2026-11-27), so ping-pong alone
// hides the softmax.
// K and V stages are released separately ("empty" mbarriers), so the producer refills K while V of
// the same stage is still being read.
#include <type_traits>

#include "cuda/attention/prefill_attention_kernels.h"
#include "cuda/attention/prefill_attention_softmax.cuh"
#include "cuda/attention/prefill_attention_wgmma.cuh"

namespace rtpllm::cuda::prefill {
namespace {

constexpr int kBlockM = 128;
constexpr int kBlockN = 128;
constexpr int kConsumerRows = 64;
constexpr int kThreads = 384;
constexpr int kWarpgroupThreads = 128;
// setmaxnreg budgets: 128 * 40 + 256 * 232 = 64512 of the 65536 registers of the SM.
constexpr int kProducerRegisters = 40;
constexpr int kConsumerRegisters = 232;
// Named barriers: 1, 2 = one consumer warpgroup's own sync; 3, 4 = "consumer c may issue products".
constexpr int kConsumerSyncBarrier = 1;
constexpr int kIssueTurnBarrier = 3;
constexpr bool kWarpgroupPingPong = true;

template <int HEAD_DIM>
struct Sm90Smem {
  // The deepest ring that fits next to Q: 3 x 64 KB at head_dim 128, 4 x 32 KB at 64.
  static constexpr int kStages = HEAD_DIM == 64 ? 4 : 3;
  static constexpr int kQBytes = kConsumerRows * HEAD_DIM * 2;  // one per consumer warpgroup
  static constexpr int kKvBytes = kBlockN * HEAD_DIM * 2;
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + 2 * kQBytes;
  static constexpr int kV = kK + kStages * kKvBytes;
  static constexpr int kBarriers = kV + kStages * kKvBytes;  // full_k, full_v, empty_k, empty_v [kStages]
  static constexpr int kBytes = kBarriers + 4 * kStages * 8 + 1024;  // + slack to align the base to 1024  // + slack to align the base to 1024
  static_assert(kBytes <= 227 * 1024, "shared memory per block");

  __device__ static uint32_t full_k(uint32_t base, int stage) { return base + kBarriers + stage * 8; }
  __device__ static uint32_t full_v(uint32_t base, int stage) { return base + kBarriers + (kStages + stage) * 8; }
  __device__ static uint32_t empty_k(uint32_t base, int stage) { return base + kBarriers + (2 * kStages + stage) * 8; }
  __device__ static uint32_t empty_v(uint32_t base, int stage) { return base + kBarriers + (3 * kStages + stage) * 8; }
};

#ifndef RTPLLM_SM90_PREFETCH_NEXT_Q
#define RTPLLM_SM90_PREFETCH_NEXT_Q 1
#endif

// Each CTA starts by loading its Q tile from device memory, and nothing else of the CTA runs until
// that load lands. The CTA one SM count further in launch order starts about when a running one
// ends, so the producer asks L2 to fetch that CTA's Q rows now (one row per producer thread); its
// consumers then read Q from L2. Only a hint: nothing waits for it. (H100, 2026-11-27, same run:
// S=1024 298 -> 328 TFLOP/s, S=4096 / 8192 / GQA / d64 / extend unchanged within run-to-run noise.)
// A persistent grid instead (one CTA per SM walking pairs of heavy and light m blocks, the producer
// loading the next tile's Q and K/V while the consumers finish, output stored from registers) was
// faster at S=1024 too but 4-6% slower at S=8192, GQA and extend, and is not kept.
template <typename T, int HEAD_DIM>
__device__ __forceinline__ void prefetch_next_q(const KernelParams& p, int tid) {
  uint32_t num_sms;
  asm("mov.u32 %0, %%nsmid;" : "=r"(num_sms));
  const int64_t per_seq = static_cast<int64_t>(gridDim.x) * gridDim.y;
  const int64_t next = blockIdx.x + gridDim.x * (blockIdx.y + static_cast<int64_t>(gridDim.y) * blockIdx.z) + num_sms;
  const int seq = static_cast<int>(next / per_seq);
  if (seq >= static_cast<int>(gridDim.z)) return;
  const int rem = static_cast<int>(next - seq * per_seq);
  TileCoords t;
  if (!locate_tile_at<kBlockM, kBlockN>(p, rem % gridDim.x, rem / gridDim.x, seq, t)) return;
  static_assert(kBlockM == kWarpgroupThreads, "one Q row per producer thread");
  const int packed = t.row_begin + tid;
  const int token = packed / p.group_size;
  if (token >= t.q_len) return;
  const int head = t.kv_head * p.group_size + (packed - token * p.group_size);
  const char* row = reinterpret_cast<const char*>(static_cast<const T*>(p.q) +
                                                  static_cast<int64_t>(t.q_begin + token) * p.q_token_stride +
                                                  head * HEAD_DIM);
#pragma unroll
  for (int offset = 0; offset < HEAD_DIM * static_cast<int>(sizeof(T)); offset += 128) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(row + offset));
  }
}

template <typename T, int HEAD_DIM>
__device__ __forceinline__ void produce_kv(const KernelParams& p, const TileCoords& t, uint32_t base, int tid) {
  using Smem = Sm90Smem<HEAD_DIM>;
  const T* k_head = static_cast<const T*>(p.k_cache) + t.kv_head * HEAD_DIM;
  const T* v_head = static_cast<const T*>(p.v_cache) + t.kv_head * HEAD_DIM;
  const int32_t* block_table = p.block_tables + static_cast<int64_t>(t.seq) * p.max_blocks_per_seq;
  // A fresh mbarrier counts as having completed the phase before phase 0, so the first pass over
  // the ring waits on parity 1 and returns at once.
  auto empty_parity = [](int j) { return static_cast<uint32_t>(((j / Smem::kStages) & 1) ^ 1); };

  // Each thread copies one 16-byte chunk column of kRowsPerThread consecutive keys (gather_kv_tile's
  // layout). When such a run always sits in one cache page, the page is looked up once per tile for
  // both K and V, and the lookup for tile j + 1 is issued before tile j's copies, so that its latency
  // hides behind the ring waits instead of stalling every tile.
  constexpr int kChunks = HEAD_DIM / 8;
  constexpr int kRowsPerThread = kBlockN / (kWarpgroupThreads / kChunks);
  if ((1 << p.block_size_log2) < kRowsPerThread) {
    for (int j = 0; j < t.num_kv_tiles; ++j) {
      const int stage = j % Smem::kStages;
      sm90::mbarrier_wait(Smem::empty_k(base, stage), empty_parity(j));
      gather_kv_tile<HEAD_DIM, kBlockN, kWarpgroupThreads>(base + Smem::kK + stage * Smem::kKvBytes, k_head,
                                                           block_table, j * kBlockN, t.seq_len, p, tid);
      sm90::mbarrier_arrive_on_cp_async(Smem::full_k(base, stage));
      sm90::mbarrier_wait(Smem::empty_v(base, stage), empty_parity(j));
      gather_kv_tile<HEAD_DIM, kBlockN, kWarpgroupThreads>(base + Smem::kV + stage * Smem::kKvBytes, v_head,
                                                           block_table, j * kBlockN, t.seq_len, p, tid);
      sm90::mbarrier_arrive_on_cp_async(Smem::full_v(base, stage));
    }
    cp_async_wait<0>();
    return;
  }
  const int chunk = tid % kChunks;
  const int first_row = (tid / kChunks) * kRowsPerThread;
  const int page_mask = (1 << p.block_size_log2) - 1;
  auto page_of = [&](int j) {
    const int key = j * kBlockN + first_row;
    return key < t.seq_len ? __ldg(block_table + min(key >> p.block_size_log2, p.max_blocks_per_seq - 1)) : 0;
  };
  // Tile rows first_row .. first_row + kRowsPerThread - 1 of chunk column `chunk`. first_row is a
  // multiple of 8, so row i's swizzled chunk is chunk ^ (i % 8): the shared-memory addresses are one
  // per-thread base plus compile-time offsets and an XOR.
  const uint32_t row_base = (chunk >> 3) * (kBlockN * 128) + first_row * 128;
  const uint32_t chunk_bytes = (chunk & 7) << 4;
  const int64_t slot_bytes = p.kv_slot_stride * static_cast<int64_t>(sizeof(T));
  auto copy_rows = [&](uint32_t tile, const T* head, int64_t offset, int valid_rows) {
    const char* src = reinterpret_cast<const char*>(head + offset);
    const uint32_t dst = tile + row_base;
    if (valid_rows >= kRowsPerThread) {
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst + i * 128 + (chunk_bytes ^ ((i & 7) << 4))),
                     "l"(src + i * slot_bytes)
                     : "memory");
      }
    } else {  // the sequence's last tile: rows at or past seq_len are zero-filled
#pragma unroll 1
      for (int i = 0; i < kRowsPerThread; ++i) {
        const bool valid = i < valid_rows;
        cp_async_16(dst + i * 128 + (chunk_bytes ^ ((i & 7) << 4)), valid ? static_cast<const void*>(src + i * slot_bytes) : static_cast<const void*>(head),
                    valid ? 16 : 0);
      }
    }
  };
  int next_page = page_of(0);
  for (int j = 0; j < t.num_kv_tiles; ++j) {
    const int stage = j % Smem::kStages;
    const int page = next_page;
    if (j + 1 < t.num_kv_tiles) next_page = page_of(j + 1);
    const int first_key = j * kBlockN + first_row;
    const int valid_rows = t.seq_len - first_key;  // rows at or past seq_len are zero-filled
    const int64_t offset =
        ((static_cast<int64_t>(page) << p.block_size_log2) | (first_key & page_mask)) * p.kv_slot_stride + chunk * 8;
    sm90::mbarrier_wait(Smem::empty_k(base, stage), empty_parity(j));
    copy_rows(base + Smem::kK + stage * Smem::kKvBytes, k_head, offset, valid_rows);
    sm90::mbarrier_arrive_on_cp_async(Smem::full_k(base, stage));
    sm90::mbarrier_wait(Smem::empty_v(base, stage), empty_parity(j));
    copy_rows(base + Smem::kV + stage * Smem::kKvBytes, v_head, offset, valid_rows);
    sm90::mbarrier_arrive_on_cp_async(Smem::full_v(base, stage));
  }
  cp_async_wait<0>();
}

// Ping-pong between the two consumers: before issuing products a consumer waits for its turn
// (barrier 3 + c completes when the other consumer's 128 threads have arrived on it); after issuing
// it hands the turn over. Consumer 1 opens the exchange once so that consumer 0 goes first.
class IssueTurn {
 public:
  __device__ explicit IssueTurn(int consumer) : consumer_(consumer) {
    if (kWarpgroupPingPong && consumer_ == 1) hand_over();
  }
  __device__ void wait() const {
    if (kWarpgroupPingPong) sm90::named_barrier_sync(kIssueTurnBarrier + consumer_, 2 * kWarpgroupThreads);
  }
  // `last`: this consumer's final issue. Consumer 1 then keeps the turn: consumer 0 waits once per
  // issue and consumer 1 already handed it over once up front, so arrivals and waits balance.
  __device__ void hand_over(bool last = false) const {
    if (kWarpgroupPingPong && !(last && consumer_ == 1)) {
      asm volatile("bar.arrive %0, %1;\n" ::"r"(kIssueTurnBarrier + (1 - consumer_)), "r"(2 * kWarpgroupThreads)
                   : "memory");
    }
  }

 private:
  int consumer_;
};

template <typename T, int HEAD_DIM>
__device__ __forceinline__ void consume(const KernelParams& p, const TileCoords& t, uint8_t* smem, uint32_t base,
                                        int consumer, int tid) {
  using Smem = Sm90Smem<HEAD_DIM>;
  constexpr int kDimChunks = HEAD_DIM / 8;
  constexpr int kKeyChunks = kBlockN / 8;
  constexpr int kStages = Smem::kStages;

  uint8_t* q_tile = smem + Smem::kQ + consumer * Smem::kQBytes;
  const uint32_t q_addr = smem_addr(q_tile);
  const int row_begin = t.row_begin + consumer * kConsumerRows;
  load_q_tile<HEAD_DIM, kConsumerRows, kWarpgroupThreads, T>(q_tile, p, t, row_begin, tid);
  sm90::fence_proxy_async();  // the Q stores above are read by wgmma (async proxy)
  sm90::named_barrier_sync(kConsumerSyncBarrier + consumer, kWarpgroupThreads);

  const int warp = tid / 32;
  const int lane = tid % 32;
  const int row_a = warp * 16 + lane / 4;  // row B = row_a + 8
  const int limit_a = row_key_limit(t, p.group_size, row_begin + row_a);
  const int limit_b = row_key_limit(t, p.group_size, row_begin + row_a + 8);

  float o[kDimChunks * 4];
#pragma unroll
  for (int i = 0; i < kDimChunks * 4; ++i) o[i] = 0.f;
  float s[kKeyChunks * 4];
  uint32_t p_frag[kKeyChunks * 2];
  OnlineSoftmax softmax;
  IssueTurn turn(consumer);

  auto issue_qk = [&](int j) {
    const int stage = j % kStages;
    const uint32_t k_tile = base + Smem::kK + stage * Smem::kKvBytes;
    sm90::mbarrier_wait(Smem::full_k(base, stage), (j / kStages) & 1);
    sm90::fence_proxy_async();  // cp.async wrote the tile through the generic proxy
    sm90::fence_registers<kKeyChunks * 4>(s);
    sm90::warpgroup_fence();
    const uint32_t q_base = sm90::opaque(q_addr);  // rebuilt per tile rather than held in registers
#pragma unroll
    for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
      const uint32_t panel = kk / 4;
      const uint32_t k_offset = (kk % 4) * 32;
      sm90::mma_ss_n128<T>(s, sm90::make_desc(q_base + panel * (kConsumerRows * 128) + k_offset, 16, 1024),
                           sm90::make_desc(k_tile + panel * (kBlockN * 128) + k_offset, 16, 1024), kk > 0);
    }
    sm90::warpgroup_commit();
  };
  auto wait_v = [&](int j) {
    sm90::mbarrier_wait(Smem::full_v(base, j % kStages), (j / kStages) & 1);
    sm90::fence_proxy_async();
  };
  auto issue_pv = [&](int j) {
    const int stage = j % kStages;
    const uint32_t v_tile = base + Smem::kV + stage * Smem::kKvBytes;
    sm90::fence_registers<kDimChunks * 4>(o);
    sm90::warpgroup_fence();
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      sm90::mma_rs_mn_major_b<T, HEAD_DIM>(o, &p_frag[kk * 4],
                                           sm90::make_desc(v_tile + kk * 16 * 128, kBlockN * 128, 1024));
    }
    sm90::warpgroup_commit();
  };
  // Softmax of S_j in place; returns the factors the running output must be rescaled by. Only the
  // tiles at the causal diagonal pay for the mask.
  auto softmax_tile = [&](int j, auto masked, float& rescale_a, float& rescale_b) {
    softmax.exponentiate<kKeyChunks, decltype(masked)::value>(s, p.scale_log2, j * kBlockN + 2 * (lane % 4), limit_a,
                                                               limit_b, rescale_a, rescale_b);
  };
  // Iteration j >= 1: issue S_j and P_{j-1} V_{j-1}, then the softmax of S_j. p_frag and o belong
  // to the in-flight P V product until the second wait.
  // Iteration j >= 1: issue S_j and P_{j-1} V_{j-1}, then the softmax of S_j. p_frag and o belong
  // to the in-flight P V product until the second wait.
  auto iteration = [&](int j, auto masked) {
    turn.wait();
    // V_{j-2} retired with the previous iteration's final wait; releasing it here, behind the
    // turn barrier, keeps ptxas from hoisting the arrive (and that wait with it) any earlier.
    if (j >= 2) sm90::mbarrier_arrive(Smem::empty_v(base, (j - 2) % kStages));
    wait_v(j - 1);
    issue_qk(j);
    issue_pv(j - 1);
    turn.hand_over();
    sm90::warpgroup_wait<1>();  // S_j is ready; P_{j-1} V_{j-1} may still run
    sm90::fence_registers<kKeyChunks * 4>(s);
    sm90::mbarrier_arrive(Smem::empty_k(base, j % kStages));
    float rescale_a, rescale_b;
    softmax_tile(j, masked, rescale_a, rescale_b);
    // Pin the softmax results before the wait so that the compiler front end keeps the softmax
    // above it (ptxas may still hoist the wait, see the file comment).
    sm90::fence_registers<kKeyChunks * 4>(s);
    sm90::fence_values(rescale_a, rescale_b, softmax.sum_a, softmax.sum_b);
    sm90::warpgroup_wait<0>();
    sm90::fence_registers<kDimChunks * 4>(o);
    sm90::fence_registers<kKeyChunks * 2>(p_frag);
    scale_rows<kDimChunks>(o, rescale_a, rescale_b);
    pack_operand<T, kKeyChunks>(s, p_frag);
  };

  const int n = t.num_kv_tiles;
  const int unmasked = t.num_unmasked_tiles;
  turn.wait();
  issue_qk(0);
  turn.hand_over();
  sm90::warpgroup_wait<0>();
  sm90::fence_registers<kKeyChunks * 4>(s);
  sm90::mbarrier_arrive(Smem::empty_k(base, 0));
  {
    float rescale_a, rescale_b;  // O is still zero: nothing to rescale
    if (unmasked > 0) {
      softmax_tile(0, std::false_type{}, rescale_a, rescale_b);
    } else {
      softmax_tile(0, std::true_type{}, rescale_a, rescale_b);
    }
  }
  pack_operand<T, kKeyChunks>(s, p_frag);
  for (int j = 1; j < unmasked; ++j) iteration(j, std::false_type{});
  for (int j = max(unmasked, 1); j < n; ++j) iteration(j, std::true_type{});
  turn.wait();
  wait_v(n - 1);
  issue_pv(n - 1);
  turn.hand_over(/*last=*/true);
  sm90::warpgroup_wait<0>();
  sm90::fence_registers<kDimChunks * 4>(o);

  // Every wgmma that read this warpgroup's Q tile has retired: reuse it to stage the output.
  float inv_a, inv_b;
  softmax.finalize(inv_a, inv_b);
  stage_output<T, kConsumerRows, kDimChunks>(q_tile, o, row_a, lane, inv_a, inv_b);
  sm90::named_barrier_sync(kConsumerSyncBarrier + consumer, kWarpgroupThreads);
  store_out_rows<HEAD_DIM, kConsumerRows, kConsumerRows, kWarpgroupThreads, T>(q_tile, p, t, row_begin, 0, tid);
}

template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(kThreads, 1) prefill_attention_sm90_kernel(const __grid_constant__ KernelParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Smem = Sm90Smem<HEAD_DIM>;
  TileCoords t;
  if (!locate_tile<kBlockM, kBlockN>(p, t)) return;

  extern __shared__ uint8_t smem_raw[];
  // Align by offsetting the __shared__ array itself (not through an integer cast), so the compiler
  // still knows every access through `smem` is to shared memory and emits LDS / STS, not generic
  // loads and stores.
  uint8_t* smem = smem_raw + ((1024u - (smem_addr(smem_raw) & 1023u)) & 1023u);
  const uint32_t base = smem_addr(smem);
  if (threadIdx.x == 0) {
    for (int stage = 0; stage < Smem::kStages; ++stage) {
      sm90::mbarrier_init(Smem::full_k(base, stage), kWarpgroupThreads);
      sm90::mbarrier_init(Smem::full_v(base, stage), kWarpgroupThreads);
      sm90::mbarrier_init(Smem::empty_k(base, stage), 2 * kWarpgroupThreads);
      sm90::mbarrier_init(Smem::empty_v(base, stage), 2 * kWarpgroupThreads);
    }
  }
  __syncthreads();

  const int warpgroup = threadIdx.x / kWarpgroupThreads;
  const int tid = threadIdx.x % kWarpgroupThreads;
  if (warpgroup == 0) {
    sm90::release_registers<kProducerRegisters>();
    if (RTPLLM_SM90_PREFETCH_NEXT_Q) prefetch_next_q<T, HEAD_DIM>(p, tid);
    produce_kv<T, HEAD_DIM>(p, t, base, tid);
  } else {
    sm90::claim_registers<kConsumerRegisters>();
    consume<T, HEAD_DIM>(p, t, smem, base, warpgroup - 1, tid);
  }
#else
  // Built without sm_90a: fail loudly instead of returning garbage (the dispatcher only picks this
  // kernel on compute capability 9.0).
  __trap();
#endif
}

}  // namespace

template <typename T, int HEAD_DIM>
cudaError_t run_prefill_sm90(const KernelParams& params, int num_seqs, int max_query_len, cudaStream_t stream) {
  return launch_prefill_grid<kBlockM, kThreads, Sm90Smem<HEAD_DIM>::kBytes>(
      prefill_attention_sm90_kernel<T, HEAD_DIM>, params, num_seqs, max_query_len, stream);
}

template cudaError_t run_prefill_sm90<__half, 64>(const KernelParams&, int, int, cudaStream_t);
template cudaError_t run_prefill_sm90<__half, 128>(const KernelParams&, int, int, cudaStream_t);
template cudaError_t run_prefill_sm90<__nv_bfloat16, 64>(const KernelParams&, int, int, cudaStream_t);
template cudaError_t run_prefill_sm90<__nv_bfloat16, 128>(const KernelParams&, int, int, cudaStream_t);

}  // namespace rtpllm::cuda::prefill

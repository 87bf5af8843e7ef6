// Hopper (sm_90a) building blocks for the prefill kernel: wgmma shared-memory descriptors, the
// three wgmma shapes it issues, warpgroup fences, mbarriers, named barriers and setmaxnreg.
// Only compiled into kernels guarded by __CUDA_ARCH_FEAT_SM90_ALL.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace rtpllm::cuda::prefill::sm90 {

// Descriptor of a 128-byte-swizzled operand tile in shared memory (PTX ISA, "Matrix Descriptor
// Format"): start address, leading and stride byte offsets (all >> 4), swizzle mode 1 = 128B in
// bits 62-63. Tiles use the layout of swizzled_offset(): 8-row groups 1024 bytes apart, 64-element
// panels `panel_bytes` apart.
//   K-major operand (Q, K): stride offset = 1024 (next 8 rows); leading offset unused (1).
//     The k16 step kk of a panel starts 32 * kk bytes in; the hardware applies the swizzle.
//   MN-major operand (V read as B of P V): leading offset = next 64-column panel, stride offset =
//     next 8 keys (1024). The k16 step kk starts 16 * 128 * kk bytes in.
__device__ __forceinline__ uint64_t make_desc(uint32_t smem_addr, uint32_t leading_bytes, uint32_t stride_bytes) {
  uint64_t desc = (smem_addr & 0x3FFFFu) >> 4;
  desc |= static_cast<uint64_t>((leading_bytes >> 4) & 0x3FFFu) << 16;
  desc |= static_cast<uint64_t>((stride_bytes >> 4) & 0x3FFFu) << 32;
  desc |= 1ull << 62;
  return desc;
}

// Returns x through an empty asm: loop-invariant values derived from it (the Q descriptors) are
// then recomputed where used instead of being hoisted out of the loop and held in registers.
__device__ __forceinline__ uint32_t opaque(uint32_t x) {
  asm volatile("" : "+r"(x));
  return x;
}

// Accumulator register lists for the asm operand strings.
#define RTPLLM_WGMMA_D32                                                                                         \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, " \
  "%23, %24, %25, %26, %27, %28, %29, %30, %31"
#define RTPLLM_WGMMA_D64                                                                                         \
  RTPLLM_WGMMA_D32                                                                                               \
  ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, " \
  "%53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define RTPLLM_WGMMA_ACC8(d, i)                                                                                  \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), \
      "+f"(d[i + 7])
#define RTPLLM_WGMMA_ACC32(d) \
  RTPLLM_WGMMA_ACC8(d, 0), RTPLLM_WGMMA_ACC8(d, 8), RTPLLM_WGMMA_ACC8(d, 16), RTPLLM_WGMMA_ACC8(d, 24)
#define RTPLLM_WGMMA_ACC64(d) \
  RTPLLM_WGMMA_ACC32(d), RTPLLM_WGMMA_ACC8(d, 32), RTPLLM_WGMMA_ACC8(d, 40), RTPLLM_WGMMA_ACC8(d, 48), RTPLLM_WGMMA_ACC8(d, 56)

// d[64] (+)= A[64x16] * B[16x128]; A and B K-major in shared memory. accumulate = 0 overwrites d.
#define RTPLLM_WGMMA_SS_N128(TYPE)                                                                   \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                          \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " {" RTPLLM_WGMMA_D64   \
               "}, %64, %65, p, 1, 1, 0, 0;\n}\n"                                                    \
               : RTPLLM_WGMMA_ACC64(d)                                                               \
               : "l"(desc_a), "l"(desc_b), "r"(accumulate))

template <typename T>
__device__ __forceinline__ void mma_ss_n128(float* d, uint64_t desc_a, uint64_t desc_b, int accumulate) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    RTPLLM_WGMMA_SS_N128("bf16");
  } else {
    RTPLLM_WGMMA_SS_N128("f16");
  }
}

// d[N / 2] += A[64x16] * B[16xN]; A in registers (4 x 2 halves per thread), B MN-major in shared
// memory (imm-trans-b = 1). The scale-d predicate is always set: the output accumulates.
#define RTPLLM_WGMMA_RS_N128(TYPE)                                                                   \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                          \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " {" RTPLLM_WGMMA_D64   \
               "}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"                                     \
               : RTPLLM_WGMMA_ACC64(d)                                                               \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1))
#define RTPLLM_WGMMA_RS_N64(TYPE)                                                                    \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                          \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " {" RTPLLM_WGMMA_D32    \
               "}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"                                     \
               : RTPLLM_WGMMA_ACC32(d)                                                               \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1))

template <typename T, int N>
__device__ __forceinline__ void mma_rs_mn_major_b(float* d, const uint32_t* a, uint64_t desc_b) {
  static_assert(N == 64 || N == 128, "P V product supports head dims 64 and 128");
  if constexpr (N == 128) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      RTPLLM_WGMMA_RS_N128("bf16");
    } else {
      RTPLLM_WGMMA_RS_N128("f16");
    }
  } else {
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      RTPLLM_WGMMA_RS_N64("bf16");
    } else {
      RTPLLM_WGMMA_RS_N64("f16");
    }
  }
}

#undef RTPLLM_WGMMA_SS_N128
#undef RTPLLM_WGMMA_RS_N128
#undef RTPLLM_WGMMA_RS_N64

// Orders register accesses of the warpgroup before the wgmma that follows (accumulators or A
// fragments written by ordinary instructions).
__device__ __forceinline__ void warpgroup_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void warpgroup_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void warpgroup_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Keeps the compiler from moving reads or writes of registers across the wgmma issue / wait points
// (the hardware reads A fragments and writes accumulators asynchronously), and pins values that
// must be computed before a wait.
template <int N>
__device__ __forceinline__ void fence_registers(float* r) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N>
__device__ __forceinline__ void fence_registers(uint32_t* r) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}
__device__ __forceinline__ void fence_values(float& a, float& b, float& c, float& d) {
  asm volatile("" : "+f"(a), "+f"(b), "+f"(c), "+f"(d)::"memory");
}

// Makes this thread's generic-proxy shared-memory writes (and, on the consumer side, the cp.async
// data it has acquired through an mbarrier) visible to the async proxy that wgmma reads through.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

__device__ __forceinline__ void mbarrier_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

__device__ __forceinline__ void mbarrier_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

// Counts as one arrival once every cp.async this thread issued so far has landed.
__device__ __forceinline__ void mbarrier_arrive_on_cp_async(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}

__device__ __forceinline__ void mbarrier_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}

// Barrier among the `count` threads (a multiple of 32) that use barrier `id` (1..15; 0 is __syncthreads).
__device__ __forceinline__ void named_barrier_sync(int id, int count) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}

template <int REGS>
__device__ __forceinline__ void release_registers() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(REGS));
}

template <int REGS>
__device__ __forceinline__ void claim_registers() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(REGS));
}

}  // namespace rtpllm::cuda::prefill::sm90

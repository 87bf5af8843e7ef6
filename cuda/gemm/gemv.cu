// See gemv.h. One warp owns kRowsPerWarp consecutive output rows (in gated mode also their rows
// of the up half); its lanes walk K in 16-byte vectors, kUnroll vectors per row in flight before
// any arithmetic, accumulating in float32, then reduce across the warp with shuffles.
#include "cuda/gemm/gemv.h"

#include "cuda/ops/pdl.cuh"
#include "cuda/ops/vec.cuh"

namespace rtpllm::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerWarp = 2;
constexpr int kUnroll = 4;

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Weights are read once: stream them past L1 so the activation rows stay cached there.
__device__ __forceinline__ uint4 load_streaming(const void* ptr) {
  return __ldcs(reinterpret_cast<const uint4*>(ptr));
}

template <typename T>
__device__ __forceinline__ void fma_vec(const uint4& wbits, const uint4& xbits, float& acc) {
  const Vec8<T>& wv = *reinterpret_cast<const Vec8<T>*>(&wbits);
  const Vec8<T>& xv = *reinterpret_cast<const Vec8<T>*>(&xbits);
#pragma unroll
  for (int i = 0; i < kVecElems; ++i) acc = fmaf(to_float(wv.v[i]), to_float(xv.v[i]), acc);
}

// kUnroll 16-byte vectors of each of the warp's weight rows, starting at vector `base` (this lane's),
// all in flight before any is used; vectors past K read as zero.
template <int kRows, typename T>
__device__ __forceinline__ void load_weight_chunk(uint4 (&wv)[kRows][kUnroll], const T* (&w_rows)[kRows],
                                                  int base, int k_vecs) {
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int vec = base + u * 32;
#pragma unroll
    for (int r = 0; r < kRows; ++r)
      wv[r][u] = vec < k_vecs ? load_streaming(w_rows[r] + vec * kVecElems) : make_uint4(0, 0, 0, 0);
  }
}

// Weight row `r` of a warp's rows: its output rows, and in gated mode, after them, the matching
// rows of the up half (the weight is gate | up stacked, 2 * n rows).
template <bool kGated>
__device__ __forceinline__ int weight_row(const GemvParams& p, int row0, int r) {
  const int out_row = min(row0 + r % kRowsPerWarp, p.n - 1);
  return kGated && r >= kRowsPerWarp ? p.n + out_row : out_row;
}

// NOTE: the explicit minimum of one CTA per SM matters. Without it ptxas caps registers for
// occupancy (80 instead of 96 at M = 4) and schedules the weight loads worse: down_proj at M = 4
// took 61 us instead of 45 us (H100, bench_gemv.py), the same at M = 1.
template <typename T, int M, bool kGated>
__global__ void __launch_bounds__(kThreads, 1) gemv_kernel(const __grid_constant__ GemvParams p) {
  constexpr int kWeightRows = kGated ? 2 * kRowsPerWarp : kRowsPerWarp;
  const int lane = threadIdx.x % 32;
  const int warp = blockIdx.x * kWarps + threadIdx.x / 32;
  const int row0 = warp * kRowsPerWarp;
  if (row0 >= p.n) return;
  const T* w = static_cast<const T*>(p.w);
  const T* x = static_cast<const T*>(p.x);
  const int k_vecs = p.k / kVecElems;
  // Rows past N (the last warp of an odd N) re-read row N-1 and are never stored.
  const T* w_rows[kWeightRows];
#pragma unroll
  for (int r = 0; r < kWeightRows; ++r) w_rows[r] = w + static_cast<int64_t>(weight_row<kGated>(p, row0, r)) * p.k;

  // The first chunk of weights is loaded before waiting for the kernel that produces x: the
  // weights never depend on it, so under PDL their latency hides behind that kernel's tail.
  uint4 wv[kWeightRows][kUnroll];
  load_weight_chunk<kWeightRows>(wv, w_rows, lane, k_vecs);
  wait_for_prior_grid();
  allow_dependent_launch();  // after the wait: see pdl.cuh

  float acc[kWeightRows][M] = {};
  for (int base = lane; base < k_vecs; base += 32 * kUnroll) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int vec = base + u * 32;
      if (vec >= k_vecs) break;
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const uint4 xv = *reinterpret_cast<const uint4*>(x + m * p.ldx + vec * kVecElems);
#pragma unroll
        for (int r = 0; r < kWeightRows; ++r) fma_vec<T>(wv[r][u], xv, acc[r][m]);
      }
    }
    if (base + 32 * kUnroll < k_vecs) load_weight_chunk<kWeightRows>(wv, w_rows, base + 32 * kUnroll, k_vecs);
  }

#pragma unroll
  for (int r = 0; r < kWeightRows; ++r) {
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float v = acc[r][m];
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
      acc[r][m] = v;
    }
  }
  if (lane != 0) return;
  T* y = static_cast<T*>(p.y);
  const T* bias = static_cast<const T*>(p.bias);
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int row = row0 + r;
    if (row >= p.n) break;
    const float b = bias != nullptr ? to_float(bias[row]) : 0.0f;
    if constexpr (kGated) {
      // Rounded where the unfused path rounds: the projection's outputs, then silu(gate).
      const float b_up = bias != nullptr ? to_float(bias[p.n + row]) : 0.0f;
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const float gate = round_to<T>(acc[r][m] + b);
        const float up = round_to<T>(acc[kRowsPerWarp + r][m] + b_up);
        y[m * p.ldy + row] = from_float<T>(round_to<T>(gate / (1.f + __expf(-gate))) * up);
      }
    } else {
#pragma unroll
      for (int m = 0; m < M; ++m) y[m * p.ldy + row] = from_float<T>(acc[r][m] + b);
    }
  }
}

template <typename T, int M, bool kGated>
cudaError_t launch(const GemvParams& p, cudaStream_t stream) {
  const int warps = (p.n + kRowsPerWarp - 1) / kRowsPerWarp;
  const int blocks = (warps + kWarps - 1) / kWarps;
  return launch_pdl(gemv_kernel<T, M, kGated>, dim3(blocks), dim3(kThreads), 0, stream, p);
}

template <bool kGated>
cudaError_t dispatch(const GemvParams& p, ScalarType dtype, cudaStream_t stream) {
  if (p.m < 1 || p.m > kGemvMaxRows || p.n < 1 || p.k < kVecElems || p.k % kVecElems != 0 ||
      p.ldx % kVecElems != 0 || p.ldx < p.k || p.ldy < p.n || !aligned16(p.x) || !aligned16(p.w)) {
    return cudaErrorInvalidValue;
  }
  return dispatch_half_types(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    switch (p.m) {
      case 1: return launch<T, 1, kGated>(p, stream);
      case 2: return launch<T, 2, kGated>(p, stream);
      case 3: return launch<T, 3, kGated>(p, stream);
      case 4: return launch<T, 4, kGated>(p, stream);
    }
    return cudaErrorInvalidValue;
  });
}

}  // namespace

cudaError_t gemv(const GemvParams& p, ScalarType dtype, cudaStream_t stream) {
  return dispatch<false>(p, dtype, stream);
}

cudaError_t gemv_silu_and_mul(const GemvParams& p, ScalarType dtype, cudaStream_t stream) {
  return dispatch<true>(p, dtype, stream);
}

}  // namespace rtpllm::cuda

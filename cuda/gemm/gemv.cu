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
// The norm prologue keeps M rows of K in shared memory: K up to 25,600 at M = 4 (Hopper allows 227 KB).
constexpr size_t kNormPrologueMaxSmem = 200 * 1024;

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

// The RMSNorm prologue (gemv.h), done once per block into shared memory: xs[m] = (x + residual) *
// norm_weight, rounded to T, and the inverse RMS of each row of x + residual into inv_rms. Block 0
// also writes x + residual to residual_out. The main loop then reads its activations from xs.
template <typename T, int M>
__device__ __forceinline__ void norm_prologue(const GemvParams& p, T* xs, float (&inv_rms)[M]) {
  __shared__ float partial[kWarps][M];
  const int k_vecs = p.k / kVecElems;
  const bool store_residual = p.residual != nullptr && blockIdx.x == 0;
  float sum_sq[M] = {};
  for (int vec = threadIdx.x; vec < k_vecs; vec += kThreads) {
    float norm_w[kVecElems];
    vec_to_float(load_vec(static_cast<const T*>(p.norm_weight) + vec * kVecElems), norm_w);
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float h[kVecElems];
      vec_to_float(load_vec(static_cast<const T*>(p.x) + m * p.ldx + vec * kVecElems), h);
      if (p.residual != nullptr) {
        float r[kVecElems];
        vec_to_float(load_vec(static_cast<const T*>(p.residual) + m * p.ld_residual + vec * kVecElems), r);
#pragma unroll
        for (int i = 0; i < kVecElems; ++i) h[i] = round_to<T>(h[i] + r[i]);
        if (store_residual) {
          store_vec(static_cast<T*>(p.residual_out) + static_cast<int64_t>(m) * p.k + vec * kVecElems,
                    float_to_vec<T>(h));
        }
      }
#pragma unroll
      for (int i = 0; i < kVecElems; ++i) {
        sum_sq[m] = fmaf(h[i], h[i], sum_sq[m]);
        h[i] *= norm_w[i];
      }
      store_vec(xs + m * p.k + vec * kVecElems, float_to_vec<T>(h));
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const float warp_total = warp_sum(sum_sq[m]);
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32][m] = warp_total;
  }
  __syncthreads();  // also publishes xs
#pragma unroll
  for (int m = 0; m < M; ++m) {
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += partial[w][m];
    inv_rms[m] = rsqrtf(total / static_cast<float>(p.k) + p.eps);
  }
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
template <typename T, int M, bool kGated, bool kNormed>
__global__ void __launch_bounds__(kThreads, 1) gemv_kernel(const __grid_constant__ GemvParams p) {
  constexpr int kWeightRows = kGated ? 2 * kRowsPerWarp : kRowsPerWarp;
  const int lane = threadIdx.x % 32;
  const int warp = blockIdx.x * kWarps + threadIdx.x / 32;
  const int row0 = warp * kRowsPerWarp;
  // With the norm prologue every warp joins the block's barrier first.
  if (!kNormed && row0 >= p.n) return;
  const T* w = static_cast<const T*>(p.w);
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

  const T* x = static_cast<const T*>(p.x);
  int64_t ldx = p.ldx;
  float inv_rms[M];
  if constexpr (kNormed) {
    extern __shared__ uint4 normed_x[];  // [M, K] of T
    norm_prologue<T, M>(p, reinterpret_cast<T*>(normed_x), inv_rms);
    if (row0 >= p.n) return;
    x = reinterpret_cast<const T*>(normed_x);
    ldx = p.k;
  }

  float acc[kWeightRows][M] = {};
  for (int base = lane; base < k_vecs; base += 32 * kUnroll) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int vec = base + u * 32;
      if (vec >= k_vecs) break;
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const uint4 xv = *reinterpret_cast<const uint4*>(x + m * ldx + vec * kVecElems);
#pragma unroll
        for (int r = 0; r < kWeightRows; ++r) fma_vec<T>(wv[r][u], xv, acc[r][m]);
      }
    }
    if (base + 32 * kUnroll < k_vecs) load_weight_chunk<kWeightRows>(wv, w_rows, base + 32 * kUnroll, k_vecs);
  }

#pragma unroll
  for (int r = 0; r < kWeightRows; ++r) {
#pragma unroll
    for (int m = 0; m < M; ++m) acc[r][m] = warp_sum(acc[r][m]);
  }
  if constexpr (kNormed) {
#pragma unroll
    for (int m = 0; m < M; ++m) {
#pragma unroll
      for (int r = 0; r < kWeightRows; ++r) acc[r][m] *= inv_rms[m];
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
  if (p.norm_weight != nullptr) {
    const auto kernel = gemv_kernel<T, M, kGated, true>;
    const size_t smem = static_cast<size_t>(M) * p.k * sizeof(T);
    if (smem > kNormPrologueMaxSmem) return cudaErrorInvalidValue;
    // Above the default 48 KB a kernel must opt in (once per process and kernel).
    static const cudaError_t opted_in =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kNormPrologueMaxSmem));
    if (opted_in != cudaSuccess) return opted_in;
    return launch_pdl(kernel, dim3(blocks), dim3(kThreads), smem, stream, p);
  }
  return launch_pdl(gemv_kernel<T, M, kGated, false>, dim3(blocks), dim3(kThreads), 0, stream, p);
}

bool norm_operands_ok(const GemvParams& p) {
  if (p.norm_weight == nullptr) return p.residual == nullptr && p.residual_out == nullptr;
  if (!aligned16(p.norm_weight) || !(p.eps >= 0.0f)) return false;
  if (p.residual == nullptr) return p.residual_out == nullptr;
  return p.residual_out != nullptr && aligned16(p.residual) && aligned16(p.residual_out) &&
         p.ld_residual % kVecElems == 0 && p.ld_residual >= p.k;
}

template <bool kGated>
cudaError_t dispatch(const GemvParams& p, ScalarType dtype, cudaStream_t stream) {
  if (p.m < 1 || p.m > kGemvMaxRows || p.n < 1 || p.k < kVecElems || p.k % kVecElems != 0 ||
      p.ldx % kVecElems != 0 || p.ldx < p.k || p.ldy < p.n || !aligned16(p.x) || !aligned16(p.w) ||
      !norm_operands_ok(p)) {
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

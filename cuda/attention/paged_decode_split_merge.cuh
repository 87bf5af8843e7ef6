// Split-KV merge inside the decode kernel: the last CTA of a (sequence, KV head, head tile) to
// finish combines every split's partial result, so a split launch is still one kernel (one
// graph node, no second launch's latency on the small batches that need splitting).
//
// Protocol (the CUDA "threadFenceReduction" pattern): each of the sequence's active splits (see
// split_range) writes its partial output and log-sum-exp, fences, then counts itself in with an
// atomic on its group's counter; the CTA that sees the count reach active - 1 is the last, reads
// the active splits' partials from L2 and writes the output, then puts the counter back to 0, so
// the next launch (next layer, next graph replay) finds it zeroed. Every active split holds
// tokens, so every partial is finite.
#pragma once

#include <cmath>
#include <cstdint>

#include "cuda/attention/paged_decode_attention.h"
#include "cuda/ops/vec.cuh"

namespace rtpllm::cuda::decode {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRows = 16;  // query heads per CTA: the M extent of the tensor-core products
constexpr int kThreadsPerRow = kThreads / kRows;  // epilogue: 8 threads finish one query head
constexpr int kMaxSplits = 64;  // bounds the merge's shared-memory staging of log-sum-exps

// Writes kCols floats as T in 16-byte vectors.
template <typename T, int kCols>
__device__ __forceinline__ void store_row(T* dst, const float (&vals)[kCols]) {
#pragma unroll
  for (int c = 0; c < kCols; c += kVecElems) {
    float chunk[kVecElems];
#pragma unroll
    for (int j = 0; j < kVecElems; ++j) chunk[j] = vals[c + j];
    store_vec(dst + c, float_to_vec<T>(chunk));
  }
}

// Called by every thread of every active CTA of a split launch, after the CTA wrote its partials
// (at [.., split] of the num_splits-wide partial arrays). `scratch` is free shared memory for
// kRows * kMaxSplits floats.
template <typename T, int kHeadDim>
__device__ void merge_splits_if_last(const PagedDecodeParams& p, int seq, int head0, int rows, int active,
                                     float* scratch) {
  constexpr int kCols = kHeadDim / kThreadsPerRow;
  __shared__ bool is_last;
  __threadfence();  // this thread's partial writes are visible device-wide before the count
  __syncthreads();
  if (threadIdx.x == 0) {
    int* const counter = p.split_counters + static_cast<int64_t>(seq) * gridDim.y + blockIdx.y;
    is_last = atomicAdd(counter, 1) == active - 1;
    if (is_last) *counter = 0;  // every other split has counted in: safe to rearm
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();

  // NOTE: other CTAs wrote the partials; __ldcg reads them from L2, never from a stale L1 line.
  // Every load below is independent of the others, so they overlap instead of queueing behind
  // one another: this runs on the critical path of the whole launch.
  const int stride = p.num_splits;  // the partial arrays' split dimension; the first `active` are used
  const int64_t first_pair = static_cast<int64_t>(seq) * p.num_heads + head0;
  const float* const lse = p.partial_lse + first_pair * stride;  // [rows, stride], contiguous
  for (int i = threadIdx.x; i < rows * active; i += kThreads) {
    scratch[i] = __ldcg(lse + (i / active) * stride + i % active);
  }
  __syncthreads();

  // Each query head's 8 threads (consecutive lanes of one warp) turn its log-sum-exps into weights.
  const int row = threadIdx.x / kThreadsPerRow;
  const int sub = threadIdx.x % kThreadsPerRow;
  float* const weights = scratch + row * active;
  float max_lse = -INFINITY;
  if (row < rows) {
    for (int j = sub; j < active; j += kThreadsPerRow) max_lse = fmaxf(max_lse, weights[j]);
  }
#pragma unroll
  for (int offset = 1; offset < kThreadsPerRow; offset <<= 1) {
    max_lse = fmaxf(max_lse, __shfl_xor_sync(0xffffffffu, max_lse, offset));
  }
  float denom = 0.f;
  if (row < rows) {
    for (int j = sub; j < active; j += kThreadsPerRow) {
      const float w = max_lse == -INFINITY ? 0.f : exp2f(weights[j] - max_lse);  // (a NaN-free guard)
      weights[j] = w;
      denom += w;
    }
  }
#pragma unroll
  for (int offset = 1; offset < kThreadsPerRow; offset <<= 1) {
    denom += __shfl_xor_sync(0xffffffffu, denom, offset);
  }
  __syncwarp();  // the weights were written by this warp's own lanes
  if (row >= rows) return;

  const int col0 = sub * kCols;
  const float4* const src =
      reinterpret_cast<const float4*>(p.partial_out + (first_pair + row) * stride * kHeadDim + col0);
  float acc[kCols] = {};
#pragma unroll 4
  for (int j = 0; j < active; ++j) {
    const float w = weights[j];
#pragma unroll
    for (int c = 0; c < kCols / 4; ++c) {
      const float4 v = __ldcg(src + j * (kHeadDim / 4) + c);
      acc[4 * c] += w * v.x;
      acc[4 * c + 1] += w * v.y;
      acc[4 * c + 2] += w * v.z;
      acc[4 * c + 3] += w * v.w;
    }
  }
  const float inv_denom = denom > 0.f ? 1.f / denom : 0.f;  // all splits empty: a zero output
#pragma unroll
  for (int c = 0; c < kCols; ++c) acc[c] *= inv_denom;
  store_row<T, kCols>(static_cast<T*>(p.out) + seq * p.out_stride + (head0 + row) * kHeadDim + col0, acc);
}

}  // namespace rtpllm::cuda::decode

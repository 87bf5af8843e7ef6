#include "cuda/ops/embedding.h"

#include "cuda/ops/vec.cuh"

namespace rtpllm::cuda {
namespace {

constexpr int kThreads = 128;

// grid = (num_tokens, column blocks); each thread copies one 16-byte vector of the row.
template <typename T, typename Id>
__global__ void __launch_bounds__(kThreads) embedding_kernel(const __grid_constant__ EmbeddingParams p) {
  const int64_t token = blockIdx.x;
  const int col = (blockIdx.y * kThreads + threadIdx.x) * kVecElems;
  if (col >= p.hidden) return;
  const int64_t id = static_cast<const Id*>(p.ids)[token];
  T* dst = static_cast<T*>(p.out) + token * p.out_row_stride + col;
  if (id < 0 || id >= p.vocab_size) {
    *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
    return;
  }
  store_vec(dst, load_vec(static_cast<const T*>(p.table) + id * p.hidden + col));
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace

cudaError_t embedding(const EmbeddingParams& p, ScalarType dtype, cudaStream_t stream) {
  if (p.hidden <= 0 || p.hidden % kVecElems != 0 || p.out_row_stride % kVecElems != 0 || p.vocab_size <= 0) {
    return cudaErrorInvalidValue;
  }
  if (!aligned16(p.out) || !aligned16(p.table)) return cudaErrorMisalignedAddress;
  if (p.num_tokens == 0) return cudaSuccess;
  const int vecs = p.hidden / kVecElems;
  const dim3 grid(static_cast<unsigned>(p.num_tokens), (vecs + kThreads - 1) / kThreads);
  return dispatch_half_types(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (p.ids_are_int64) {
      embedding_kernel<T, int64_t><<<grid, kThreads, 0, stream>>>(p);
    } else {
      embedding_kernel<T, int32_t><<<grid, kThreads, 0, stream>>>(p);
    }
    return cudaGetLastError();
  });
}

}  // namespace rtpllm::cuda

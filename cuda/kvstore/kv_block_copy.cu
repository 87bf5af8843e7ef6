#include "cuda/kvstore/kv_block_copy.h"

#include <algorithm>
#include <vector>

namespace rtpllm::cuda {
namespace {

constexpr int kMaxBlocksPerLaunch = 128;  // keeps the parameter struct under the 4 KB launch limit
constexpr int kThreads = 512;
constexpr int kUnroll = 4;  // independent loads in flight per thread: host reads cross PCIe

struct KernelParams {
  const uint64_t* layer_bases;  // [num_layers][2], device memory
  int64_t block_stride_bytes;
  int64_t segment_vectors;      // block_bytes / sizeof(Vec)
  int32_t num_layers;
  int32_t num_blocks;
  bool to_host;
  int32_t pool_blocks[kMaxBlocksPerLaunch];
  uint8_t* host_blocks[kMaxBlocksPerLaunch];
};

// CTA loop over segments (block, layer, K/V); threads copy a segment in Vec-wide accesses.
template <typename Vec>
__global__ void __launch_bounds__(kThreads) kv_block_copy_kernel(const __grid_constant__ KernelParams p) {
  const int32_t num_segments = p.num_blocks * p.num_layers * 2;
  for (int32_t segment = blockIdx.x; segment < num_segments; segment += gridDim.x) {
    const int32_t block = segment / (2 * p.num_layers);
    const int32_t layer_kv = segment % (2 * p.num_layers);  // 2 * layer + kv: also the host segment index
    Vec* pool = reinterpret_cast<Vec*>(p.layer_bases[layer_kv] + static_cast<uint64_t>(p.pool_blocks[block]) * p.block_stride_bytes);
    Vec* host = reinterpret_cast<Vec*>(p.host_blocks[block]) + static_cast<int64_t>(layer_kv) * p.segment_vectors;
    const Vec* src = p.to_host ? pool : host;
    Vec* dst = p.to_host ? host : pool;
    for (int64_t base = threadIdx.x; base < p.segment_vectors; base += kThreads * kUnroll) {
      Vec values[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = base + u * kThreads;
        if (i < p.segment_vectors) values[u] = src[i];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = base + u * kThreads;
        if (i < p.segment_vectors) dst[i] = values[u];
      }
    }
  }
}

// The widest access that every pool and host address of the copy is aligned to.
int access_width(const KVBlockCopyArgs& args) {
  uint64_t bits = static_cast<uint64_t>(args.block_bytes) | static_cast<uint64_t>(args.block_stride_bytes);
  for (int32_t l = 0; l < 2 * args.num_layers; ++l) bits |= args.layer_bases_host[l];
  for (int32_t b = 0; b < args.num_blocks; ++b) bits |= reinterpret_cast<uintptr_t>(args.host_blocks[b]);
  for (int width : {16, 8, 4}) {
    if (bits % width == 0) return width;
  }
  return 1;
}

template <typename Vec>
cudaError_t launch_chunks(const KVBlockCopyArgs& args, int32_t max_ctas, cudaStream_t stream) {
  KernelParams p{};
  p.layer_bases = args.layer_bases_device;
  p.block_stride_bytes = args.block_stride_bytes;
  p.segment_vectors = args.block_bytes / static_cast<int64_t>(sizeof(Vec));
  p.num_layers = args.num_layers;
  p.to_host = args.to_host;
  for (int32_t first = 0; first < args.num_blocks; first += kMaxBlocksPerLaunch) {
    p.num_blocks = std::min(kMaxBlocksPerLaunch, args.num_blocks - first);
    for (int32_t i = 0; i < p.num_blocks; ++i) {
      p.pool_blocks[i] = args.pool_blocks[first + i];
      p.host_blocks[i] = args.host_blocks[first + i];
    }
    const int32_t grid = std::min(max_ctas, p.num_blocks * 2 * p.num_layers);
    kv_block_copy_kernel<Vec><<<grid, kThreads, 0, stream>>>(p);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

cudaError_t check_args(const KVBlockCopyArgs& args) {
  if (args.num_layers <= 0 || args.block_bytes <= 0 || args.block_stride_bytes < args.block_bytes || args.num_blocks < 0 ||
      args.layer_bases_host == nullptr || (args.num_blocks > 0 && (args.pool_blocks == nullptr || args.host_blocks == nullptr))) {
    return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t launch_kv_block_copy_kernel(const KVBlockCopyArgs& args, int32_t max_ctas, cudaStream_t stream) {
  if (const cudaError_t err = check_args(args); err != cudaSuccess) return err;
  if (args.layer_bases_device == nullptr || max_ctas <= 0) return cudaErrorInvalidValue;
  if (args.num_blocks == 0) return cudaSuccess;
  switch (access_width(args)) {
    case 16: return launch_chunks<int4>(args, max_ctas, stream);
    case 8: return launch_chunks<int2>(args, max_ctas, stream);
    case 4: return launch_chunks<int>(args, max_ctas, stream);
    default: return launch_chunks<uint8_t>(args, max_ctas, stream);
  }
}

cudaError_t launch_kv_block_memcpy(const KVBlockCopyArgs& args, cudaStream_t stream) {
  if (const cudaError_t err = check_args(args); err != cudaSuccess) return err;
  for (int32_t b = 0; b < args.num_blocks; ++b) {
    const uint64_t pool_offset = static_cast<uint64_t>(args.pool_blocks[b]) * args.block_stride_bytes;
    for (int32_t layer_kv = 0; layer_kv < 2 * args.num_layers; ++layer_kv) {
      auto* pool = reinterpret_cast<uint8_t*>(args.layer_bases_host[layer_kv] + pool_offset);
      uint8_t* host = args.host_blocks[b] + static_cast<int64_t>(layer_kv) * args.block_bytes;
      const cudaError_t err = args.to_host ? cudaMemcpyAsync(host, pool, args.block_bytes, cudaMemcpyDeviceToHost, stream)
                                           : cudaMemcpyAsync(pool, host, args.block_bytes, cudaMemcpyHostToDevice, stream);
      if (err != cudaSuccess) return err;
    }
  }
  return cudaSuccess;
}

cudaError_t launch_kv_block_staged(const KVBlockCopyArgs& args, uint8_t* staging, int32_t staging_blocks, int32_t max_ctas,
                                   cudaStream_t stream) {
  if (const cudaError_t err = check_args(args); err != cudaSuccess) return err;
  if (staging == nullptr || staging_blocks <= 0) return cudaErrorInvalidValue;
  const int64_t image_bytes = 2 * static_cast<int64_t>(args.num_layers) * args.block_bytes;  // one host buffer
  std::vector<uint8_t*> images(static_cast<size_t>(staging_blocks));
  for (int32_t i = 0; i < staging_blocks; ++i) images[static_cast<size_t>(i)] = staging + i * image_bytes;
  const cudaMemcpyKind kind = args.to_host ? cudaMemcpyDeviceToHost : cudaMemcpyHostToDevice;
  // Host buffers first..first+n-1 crossed over PCIe, one cudaMemcpyAsync per buffer (a block image
  // is 1-2 MiB on real models, long enough to run at PCIe speed). Adjacent buffers are never merged:
  // they may be separate pinned allocations, and a copy across two of them fails.
  auto cross_pcie = [&](int32_t first, int32_t n) -> cudaError_t {
    for (int32_t i = 0; i < n; ++i) {
      uint8_t* host = args.host_blocks[first + i];
      uint8_t* image = images[static_cast<size_t>(i)];
      const size_t bytes = static_cast<size_t>(image_bytes);
      const cudaError_t err = args.to_host ? cudaMemcpyAsync(host, image, bytes, kind, stream)
                                           : cudaMemcpyAsync(image, host, bytes, kind, stream);
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  };
  for (int32_t first = 0; first < args.num_blocks; first += staging_blocks) {
    const int32_t n = std::min(staging_blocks, args.num_blocks - first);
    KVBlockCopyArgs round = args;
    round.pool_blocks = args.pool_blocks + first;
    round.host_blocks = images.data();
    round.num_blocks = n;
    cudaError_t err = args.to_host ? cudaSuccess : cross_pcie(first, n);
    if (err == cudaSuccess) err = launch_kv_block_copy_kernel(round, max_ctas, stream);
    if (err == cudaSuccess && args.to_host) err = cross_pcie(first, n);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace rtpllm::cuda

// Block copies between a paged KV pool in device memory and host block buffers in pinned,
// device-mapped host memory (cudaHostAlloc with cudaHostAllocMapped; with unified addressing the
// host pointer is valid on the device).
//
// Pool side: for layer l, K bytes of block b at layer_bases[2 * l] + b * block_stride_bytes and V
// bytes at layer_bases[2 * l + 1] + ..., block_bytes long each. Host side: one buffer per block,
// layer-major, K then V: segment (l, kv) at offset (2 * l + kv) * block_bytes.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace rtpllm::cuda {

struct KVBlockCopyArgs {
  const uint64_t* layer_bases_device = nullptr;  // [num_layers][2] (K, V) base addresses, in device memory
  const uint64_t* layer_bases_host = nullptr;    // the same table in host memory (for the memcpy method)
  int32_t num_layers = 0;
  int64_t block_bytes = 0;
  int64_t block_stride_bytes = 0;
  const int32_t* pool_blocks = nullptr;  // [num_blocks] host array: pool block ids
  uint8_t* const* host_blocks = nullptr; // [num_blocks] host array: host buffer of each block
  int32_t num_blocks = 0;
  bool to_host = false;                  // pool -> host (save), else host -> pool (load)
};

// One gather/scatter kernel per up to 128 blocks: at most max_ctas CTAs (so that the copy leaves
// most SMs to the model), 16-byte accesses when every address and size allows, narrower otherwise.
cudaError_t launch_kv_block_copy_kernel(const KVBlockCopyArgs& args, int32_t max_ctas, cudaStream_t stream);

// The same copies as one cudaMemcpyAsync per (block, layer, K/V) segment: the DMA engines instead
// of SMs, at the cost of 2 * num_layers API calls per block.
cudaError_t launch_kv_block_memcpy(const KVBlockCopyArgs& args, cudaStream_t stream);

// The same copies through `staging` (device memory, staging_blocks host-layout block images): the
// kernel gathers (scatters) up to staging_blocks blocks between the pool and staging at device
// memory speed, and one cudaMemcpyAsync per host buffer crosses PCIe on the copy
// engines. The SMs are then busy for the device-memory pass only (microseconds per block), not for
// the whole PCIe transfer as with the direct kernel, so a stream of saves disturbs the model's
// kernels far less. Rounds of staging_blocks run one after the other on `stream`.
cudaError_t launch_kv_block_staged(const KVBlockCopyArgs& args, uint8_t* staging, int32_t staging_blocks, int32_t max_ctas,
                                   cudaStream_t stream);

}  // namespace rtpllm::cuda

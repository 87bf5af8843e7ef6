// Where the paged KV pool lives, as the C++ runtime addresses it.
//
// Python allocates the pool (one tensor per layer, [2, num_blocks, block_size, num_kv_heads,
// head_dim]: the K plane, then the V plane) and stays its only owner. It registers each layer's K
// and V base address with the runtime, so that C++ (copy engine, tiers, transfer) can address
// block b of layer l without Python in the data path:
//   K bytes of block b, layer l: layers[l].k_base + b * block_stride_bytes, block_bytes() long
//   V bytes likewise from layers[l].v_base.
// C++ holds addresses, never ownership: the registration must not outlive the tensors.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "rtpllm/core/types.h"

namespace rtpllm {

enum class MemoryKind : uint8_t {
  HOST,  // ordinary (or pinned) host memory: the CPU build, and the host tier's buffers
  CUDA,  // device memory of device_index
};

struct KVLayerAddress {
  uint64_t k_base = 0;
  uint64_t v_base = 0;
};

struct KVLayout {
  MemoryKind memory = MemoryKind::HOST;
  int32_t device_index = 0;
  int32_t num_blocks = 0;
  int32_t block_size = 0;  // tokens per block
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t element_bytes = 0;       // 4 fp32, 2 fp16/bf16, 1 fp8
  int64_t block_stride_bytes = 0;  // from block b to block b + 1 inside one layer's K (or V) plane
  std::vector<KVLayerAddress> layers;

  int32_t num_layers() const { return static_cast<int32_t>(layers.size()); }
  // Contiguous bytes of one block in one plane (K or V) of one layer.
  int64_t block_bytes() const {
    return static_cast<int64_t>(block_size) * num_kv_heads * head_dim * element_bytes;
  }
  // K and V of every layer for one block: the unit every tier stores.
  int64_t bytes_per_block() const { return 2 * num_layers() * block_bytes(); }

  // Throws std::invalid_argument naming the bad field (non-positive sizes, null bases, a stride
  // shorter than a block).
  void validate() const;
};

}  // namespace rtpllm

// Shape of the paged KV cache as the runtime sees it (the tensors themselves live in Python).
#pragma once

#include <cstdint>

namespace rtpllm {

struct CacheOptions {
  int32_t num_blocks = 1024;
  int32_t block_size = 16;  // tokens per block
  bool enable_prefix_caching = true;
  // Parent of block 0 in the block-hash chain: the cache identity (model weights, dtype, block
  // size, KV layout), so copies of KV kept outside the GPU (host, disk, remote) by another model
  // or configuration never match. 0 (kRootBlockHash) when nothing outlives the process.
  uint64_t root_hash = 0;

  // Throws std::invalid_argument naming the bad field.
  void validate() const;
};

}  // namespace rtpllm

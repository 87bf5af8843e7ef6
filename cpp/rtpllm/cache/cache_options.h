// Shape of the paged KV cache as the runtime sees it (the tensors themselves live in Python).
#pragma once

#include <cstdint>

namespace rtpllm {

struct CacheOptions {
  int32_t num_blocks = 1024;
  int32_t block_size = 16;  // tokens per block
  bool enable_prefix_caching = true;

  // Throws std::invalid_argument naming the bad field.
  void validate() const;
};

}  // namespace rtpllm

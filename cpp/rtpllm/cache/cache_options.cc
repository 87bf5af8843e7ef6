#include "rtpllm/cache/cache_options.h"

#include <stdexcept>
#include <string>

namespace rtpllm {

void CacheOptions::validate() const {
  if (num_blocks <= 0) throw std::invalid_argument("num_blocks: must be positive, got " + std::to_string(num_blocks));
  if (block_size <= 0) throw std::invalid_argument("block_size: must be positive, got " + std::to_string(block_size));
  // Slot ids are int64, but block tables are int32 and kernels index tokens with int32.
  if (static_cast<int64_t>(num_blocks) * block_size > INT32_MAX) {
    throw std::invalid_argument("num_blocks: num_blocks * block_size must fit in int32");
  }
}

}  // namespace rtpllm

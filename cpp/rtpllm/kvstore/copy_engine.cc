#include "rtpllm/kvstore/copy_engine.h"

#include <stdexcept>
#include <string>

namespace rtpllm {

void check_block_copies(const KVLayout& layout, const std::vector<BlockCopy>& copies) {
  for (size_t i = 0; i < copies.size(); ++i) {
    const BlockCopy& copy = copies[i];
    if (copy.pool_block < 0 || copy.pool_block >= layout.num_blocks) {
      throw std::invalid_argument("block copy " + std::to_string(i) + ": pool block " + std::to_string(copy.pool_block) +
                                  " is outside [0, " + std::to_string(layout.num_blocks) + ")");
    }
    if (copy.host == nullptr) {
      throw std::invalid_argument("block copy " + std::to_string(i) + ": null host buffer");
    }
  }
}

void check_pool_blocks(const KVLayout& layout, const std::vector<BlockId>& blocks) {
  for (BlockId block : blocks) {
    if (block < 0 || block >= layout.num_blocks) {
      throw std::invalid_argument("gpu block " + std::to_string(block) + " is outside [0, " +
                                  std::to_string(layout.num_blocks) + ")");
    }
  }
}

}  // namespace rtpllm

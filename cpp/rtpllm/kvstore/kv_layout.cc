#include "rtpllm/kvstore/kv_layout.h"

#include <stdexcept>
#include <string>

namespace rtpllm {
namespace {

void require_positive(int64_t value, const char* field) {
  if (value <= 0) {
    throw std::invalid_argument(std::string("KVLayout.") + field + " must be positive, got " + std::to_string(value));
  }
}

}  // namespace

void KVLayout::validate() const {
  require_positive(num_blocks, "num_blocks");
  require_positive(block_size, "block_size");
  require_positive(num_kv_heads, "num_kv_heads");
  require_positive(head_dim, "head_dim");
  require_positive(element_bytes, "element_bytes");
  if (element_bytes != 1 && element_bytes != 2 && element_bytes != 4) {
    throw std::invalid_argument("KVLayout.element_bytes must be 1, 2 or 4, got " + std::to_string(element_bytes));
  }
  if (device_index < 0) {
    throw std::invalid_argument("KVLayout.device_index must be >= 0, got " + std::to_string(device_index));
  }
  if (layers.empty()) throw std::invalid_argument("KVLayout.layers must name at least one layer");
  if (block_stride_bytes < block_bytes()) {
    throw std::invalid_argument("KVLayout.block_stride_bytes (" + std::to_string(block_stride_bytes) +
                                ") is shorter than one block (" + std::to_string(block_bytes()) + " bytes)");
  }
  for (size_t l = 0; l < layers.size(); ++l) {
    if (layers[l].k_base == 0 || layers[l].v_base == 0) {
      throw std::invalid_argument("KVLayout.layers[" + std::to_string(l) + "] has a null K or V base address");
    }
  }
}

}  // namespace rtpllm

#include "rtpllm/transfer/kv_transfer.h"

#include <stdexcept>

namespace rtpllm {

void TransferOptions::validate() const {
  if (!(timeout_s > 0)) throw std::invalid_argument("timeout_s: must be positive");
  if (max_blocks_per_transfer <= 0) throw std::invalid_argument("max_blocks_per_transfer: must be positive");
  if (listen_port < 0 || listen_port > 65535) throw std::invalid_argument("listen_port: must be in [0, 65535]");
}

}  // namespace rtpllm

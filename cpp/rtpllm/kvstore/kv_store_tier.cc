#include "rtpllm/kvstore/kv_store_tier.h"

#include <cstdio>

namespace rtpllm {

KVStoreLogger default_kvstore_logger() {
  return [](const std::string& message) { std::fprintf(stderr, "[rtpllm kvstore] %s\n", message.c_str()); };
}

}  // namespace rtpllm

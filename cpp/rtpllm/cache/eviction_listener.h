// Hook for whoever keeps a copy of KV beyond the GPU pool (host/disk/remote tiers, KV transfer).
#pragma once

#include "rtpllm/core/types.h"

namespace rtpllm {

class BlockEvictionListener {
 public:
  virtual ~BlockEvictionListener() = default;
  // Called when a cached free block is about to be reused for other tokens: its contents (the KV
  // of the prefix keyed by `hash`) are still intact during the call and gone after it. The pool
  // may evict several blocks for one allocation; each gets its own call, in eviction order.
  // Must not call back into the pool.
  virtual void on_block_evicted(BlockId block_id, BlockHash hash) = 0;
};

}  // namespace rtpllm

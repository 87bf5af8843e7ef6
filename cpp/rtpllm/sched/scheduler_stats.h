// A snapshot of the scheduler and KV pool, for metrics and tests.
#pragma once

#include <cstdint>

namespace rtpllm {

struct SchedulerStats {
  int32_t num_running = 0;
  int32_t num_waiting = 0;  // includes preempted requests waiting to resume
  uint64_t num_preempted_total = 0;
  int32_t blocks_used = 0;        // held by at least one request
  int32_t blocks_total = 0;
  int32_t num_free_blocks = 0;    // blocks_total - blocks_used (cached free blocks included)
  int32_t num_cached_blocks = 0;  // blocks registered in the prefix cache, used or free
  uint64_t num_evicted_blocks = 0;
  uint64_t prefix_queries = 0;  // prompt (+ resumed context) tokens looked up on admission
  uint64_t prefix_hits = 0;     // of those, tokens found in the prefix cache
  double kv_usage = 0.0;        // blocks_used / blocks_total
  uint64_t num_steps = 0;       // schedule() calls
  // Tiers below the GPU pool (zero without a KV connector).
  int32_t num_waiting_for_kv = 0;        // requests whose prefix is loading (not in num_waiting)
  uint64_t kv_tier_hit_blocks = 0;       // blocks loaded from the tiers instead of computed
  uint64_t kv_tier_failed_loads = 0;     // loads that failed or timed out: their tokens recomputed
  uint64_t kv_tier_saved_blocks = 0;     // blocks submitted for saving
  int32_t kv_transfer_held_blocks = 0;   // GPU block references held by transfers under way
};

}  // namespace rtpllm

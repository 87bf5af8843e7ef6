// Block lists as a long-running instance's pool hands them out: a decode instance's churn (up to
// 32 requests, each reserving a prompt at once, growing a block now and then, finishing in random
// order with its full blocks left in the prefix cache or not), then a reservation. Either through
// BlockPool (free runs, run-aware eviction) or through the free list it replaced (uncached blocks
// reused last-freed first, cached ones least recently freed first, a freed table tail first), to
// show what each does to a KV transfer's write count. Shared by kv_transfer_bench and the block
// pool's tests (tests/cpp/block_pool_runs_test.cc).
#pragma once

#include <algorithm>
#include <deque>
#include <random>
#include <vector>

#include "rtpllm/cache/block_pool.h"

namespace rtpllm::kvbench {

// The free list BlockPool replaced: uncached blocks at the head (the last released reused first),
// cached ones at the tail in release order (a table tail first), allocation from the head.
class LegacyFreeList {
 public:
  explicit LegacyFreeList(int32_t num_blocks) {
    for (BlockId id = 0; id < num_blocks; ++id) list_.push_back(id);
  }
  void allocate(int32_t count, std::vector<BlockId>& out) {
    for (int32_t i = 0; i < count; ++i) {
      out.push_back(list_.front());
      list_.pop_front();
    }
  }
  // `num_cached`: the table's first blocks that were registered in the prefix cache.
  void release(const std::vector<BlockId>& table, size_t num_cached) {
    for (size_t i = table.size(); i-- > 0;) {
      if (i < num_cached) {
        list_.push_back(table[i]);
      } else {
        list_.push_front(table[i]);
      }
    }
  }

 private:
  std::deque<BlockId> list_;
};

// BlockPool behind LegacyFreeList's interface: a table's first `num_cached` blocks get fresh
// hashes (registered in the prefix cache) before the table is released.
struct ChurnPool {
  explicit ChurnPool(int32_t num_blocks) : pool(num_blocks) {}
  void allocate(int32_t count, std::vector<BlockId>& out) { pool.allocate(count, out); }
  void release(const std::vector<BlockId>& table, size_t num_cached) {
    for (size_t i = 0; i < num_cached; ++i) pool.cache(table[i], next_hash++);
    pool.release(table);
  }
  BlockPool pool;
  BlockHash next_hash = 1;
};

struct ChurnShape {
  int32_t min_prompt;   // blocks a request reserves on arrival: min_prompt + rng() % prompt_span
  int32_t prompt_span;
  int32_t cap;          // blocks the live requests may hold together
  bool cache = true;    // a finished request's full blocks (all but its last) stay in the prefix cache
};

// Runs the churn on `pool`; returns the requests still live (the free blocks are what churn left).
template <typename Pool>
std::vector<std::vector<BlockId>> churn(Pool& pool, const ChurnShape& shape, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<std::vector<BlockId>> live;
  int32_t used = 0;
  for (int round = 0; round < 3000; ++round) {
    const auto prompt = static_cast<int32_t>(shape.min_prompt + rng() % shape.prompt_span);
    if (live.size() < 32 && used + prompt <= shape.cap) {
      live.emplace_back();
      pool.allocate(prompt, live.back());
      used += prompt;
    }
    for (auto& table : live) {
      if (rng() % 12 != 0 || used + 1 > shape.cap) continue;
      pool.allocate(1, table);
      ++used;
    }
    if (rng() % 3 == 0 && !live.empty()) {
      const size_t victim = rng() % live.size();
      pool.release(live[victim], shape.cache ? live[victim].size() - 1 : 0);
      used -= static_cast<int32_t>(live[victim].size());
      live.erase(live.begin() + static_cast<long>(victim));
    }
  }
  return live;
}

// `count` blocks reserved after churn in a pool of `num_blocks` (count <= num_blocks / 8).
template <typename Pool>
std::vector<BlockId> reservation_after_churn(int32_t num_blocks, int32_t count, uint32_t seed) {
  Pool pool(num_blocks);
  const int32_t max_prompt = std::max(16, num_blocks / 32);
  churn(pool, ChurnShape{1, max_prompt, num_blocks - count - num_blocks / 32}, seed);
  std::vector<BlockId> reservation;
  pool.allocate(count, reservation);
  return reservation;
}

}  // namespace rtpllm::kvbench

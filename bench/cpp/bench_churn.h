// Block lists as a long-running instance's pool hands them out: a decode instance's churn (up to
// 32 requests, each reserving a prompt of 16..256 blocks at once, growing a block now and then,
// finishing in random order with its full blocks left in the prefix cache), then a reservation.
// Either through BlockPool (free runs, run-aware eviction) or through the free list it replaced
// (uncached blocks reused last-freed first, cached ones least recently freed first, a freed table
// tail first), to show what each does to a KV transfer's write count.
#pragma once

#include <algorithm>
#include <deque>
#include <random>
#include <vector>

#include "rtpllm/cache/block_pool.h"

namespace rtpllm::kvbench {

// The free list BlockPool replaced.
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
  // Every block but the last was registered in the prefix cache: those go to the tail.
  void release_cached(const std::vector<BlockId>& table) {
    for (size_t i = table.size(); i-- > 0;) {
      if (i + 1 < table.size()) {
        list_.push_back(table[i]);
      } else {
        list_.push_front(table[i]);
      }
    }
  }

 private:
  std::deque<BlockId> list_;
};

struct ChurnPool {
  explicit ChurnPool(int32_t num_blocks) : pool(num_blocks) {}
  void allocate(int32_t count, std::vector<BlockId>& out) { pool.allocate(count, out); }
  void release_cached(const std::vector<BlockId>& table) {
    for (size_t i = 0; i + 1 < table.size(); ++i) pool.cache(table[i], next_hash++);
    pool.release(table);
  }
  BlockPool pool;
  BlockHash next_hash = 1;
};

// `count` blocks reserved after churn in a pool of `num_blocks` (count <= num_blocks / 8).
template <typename Pool>
std::vector<BlockId> reservation_after_churn(int32_t num_blocks, int32_t count, uint32_t seed) {
  Pool pool(num_blocks);
  std::mt19937 rng(seed);
  std::vector<std::vector<BlockId>> live;
  int32_t used = 0;
  const int32_t cap = num_blocks - count - num_blocks / 32;
  const int32_t max_prompt = std::max(16, num_blocks / 32);
  for (int round = 0; round < 3000; ++round) {
    const auto prompt = static_cast<int32_t>(1 + rng() % max_prompt);
    if (live.size() < 32 && used + prompt <= cap) {
      live.emplace_back();
      pool.allocate(prompt, live.back());
      used += prompt;
    }
    for (auto& table : live) {
      if (rng() % 12 != 0 || used + 1 > cap) continue;
      pool.allocate(1, table);
      ++used;
    }
    if (rng() % 3 == 0 && !live.empty()) {
      const size_t victim = rng() % live.size();
      pool.release_cached(live[victim]);
      used -= static_cast<int32_t>(live[victim].size());
      live.erase(live.begin() + static_cast<long>(victim));
    }
  }
  std::vector<BlockId> reservation;
  pool.allocate(count, reservation);
  return reservation;
}

}  // namespace rtpllm::kvbench

// After churn that scatters a LIFO free list (sequences growing a block at a time side by side,
// finishing in random order), the pool still hands a large reservation out in few runs of
// consecutive ids, with prefix caching off and on (there it must evict), without leaking blocks
// or losing more cached blocks than the reservation needs.
#include <gtest/gtest.h>

#include <algorithm>
#include <set>
#include <vector>

#include "bench_churn.h"
#include "rtpllm/cache/block_pool.h"

namespace rtpllm {
namespace {

constexpr int32_t kPoolBlocks = 8192;
constexpr int32_t kReservation = 256;  // a 4k-token prompt in 16-token blocks
// What the pool must achieve after the churn below; the old free list needs ~250 runs.
constexpr int32_t kMaxRuns = 16;

int32_t count_runs(const std::vector<BlockId>& blocks) {
  int32_t runs = 0;
  for (size_t i = 0; i < blocks.size(); ++i) runs += (i == 0 || blocks[i] != blocks[i - 1] + 1) ? 1 : 0;
  return runs;
}

// A decode instance's churn (bench_churn.h): prompts of 16..256 blocks, reserved at once as for a
// prefill peer's KV. With `cache_hashes`, a request's full blocks (all but its last) are registered
// before release, so the free blocks end up almost all cached. Returns the requests still live.
template <typename Pool>
std::vector<std::vector<BlockId>> churn(Pool& pool, uint32_t seed, bool cache_hashes) {
  const int32_t cap = kPoolBlocks - kReservation - 64;  // room for the reservation after churn
  return kvbench::churn(pool, kvbench::ChurnShape{16, 241, cap, cache_hashes}, seed);
}

struct Listener : BlockEvictionListener {
  std::vector<BlockId> evicted;
  void on_block_evicted(BlockId block_id, BlockHash) override { evicted.push_back(block_id); }
};

TEST(BlockPoolRuns, LegacyFreeListScattersAReservationAfterChurn) {
  // The problem this pool solves: the same churn leaves the old free list handing out a 4k-token
  // reservation in scattered blocks (~225 runs of 256; with prefix caching a freed table also
  // comes back tail first, every block a run of its own). The pool below: 1 run without caching,
  // 7 to 8 with it.
  for (bool cache : {false, true}) {
    kvbench::LegacyFreeList legacy(kPoolBlocks);
    churn(legacy, 1, cache);
    std::vector<BlockId> reservation;
    legacy.allocate(kReservation, reservation);
    EXPECT_GT(count_runs(reservation), kReservation / 2) << "cache " << cache;
  }
}

TEST(BlockPoolRuns, ReservationAfterChurnComesInFewRuns) {
  for (uint32_t seed : {1u, 2u, 3u}) {
    kvbench::ChurnPool churn_pool(kPoolBlocks);
    BlockPool& pool = churn_pool.pool;
    const auto live = churn(churn_pool, seed, false);
    pool.check_invariants();
    std::vector<BlockId> reservation;
    pool.allocate(kReservation, reservation);
    EXPECT_LE(count_runs(reservation), kMaxRuns) << "seed " << seed;
    EXPECT_EQ(std::set<BlockId>(reservation.begin(), reservation.end()).size(), size_t{kReservation});
    pool.release(reservation);
    for (const auto& table : live) pool.release(table);
    EXPECT_EQ(pool.num_free_blocks(), kPoolBlocks);
    EXPECT_EQ(pool.free_uncached_runs().size(), 1u) << "every block is free again: one run";
    pool.check_invariants();
  }
}

TEST(BlockPoolRuns, ReservationThatEvictsComesInFewRunsAndEvictsOnlyWhatItNeeds) {
  for (uint32_t seed : {1u, 2u, 3u}) {
    kvbench::ChurnPool churn_pool(kPoolBlocks);
    BlockPool& pool = churn_pool.pool;
    Listener listener;
    pool.set_eviction_listener(&listener);
    auto live = churn(churn_pool, seed, true);
    // One sequence ends without caching (aborted), so some free blocks are uncached: those go
    // first, the rest is evicted.
    pool.release(live.back());
    live.pop_back();
    listener.evicted.clear();
    int32_t uncached = 0;
    for (const auto& [first, length] : pool.free_uncached_runs()) uncached += length;
    ASSERT_GT(uncached, 0);
    ASSERT_LT(uncached, kReservation);
    const int32_t cached_before = pool.num_cached_blocks();

    std::vector<BlockId> reservation;
    pool.allocate(kReservation, reservation);
    EXPECT_LE(count_runs(reservation), kMaxRuns) << "seed " << seed;
    const auto evicted = static_cast<int32_t>(listener.evicted.size());
    EXPECT_EQ(evicted, kReservation - uncached) << "evicts exactly the missing blocks";
    EXPECT_EQ(pool.num_cached_blocks(), cached_before - evicted);
    for (BlockId b : listener.evicted) {
      EXPECT_FALSE(pool.hash_of(b).has_value());
      EXPECT_TRUE(std::find(reservation.begin(), reservation.end(), b) != reservation.end());
    }
    pool.check_invariants();
    pool.release(reservation);
    for (const auto& table : live) pool.release(table);
    EXPECT_EQ(pool.num_free_blocks(), kPoolBlocks);
    pool.check_invariants();
  }
}

}  // namespace
}  // namespace rtpllm

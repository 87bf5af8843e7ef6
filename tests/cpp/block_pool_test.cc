#include <gtest/gtest.h>

#include <stdexcept>
#include <utility>
#include <vector>

#include "rtpllm/cache/block_pool.h"

namespace rtpllm {
namespace {

struct RecordingListener : BlockEvictionListener {
  std::vector<std::pair<BlockId, BlockHash>> evicted;
  void on_block_evicted(BlockId block_id, BlockHash hash) override { evicted.emplace_back(block_id, hash); }
};

std::vector<BlockId> allocate(BlockPool& pool, int32_t count) {
  std::vector<BlockId> out;
  pool.allocate(count, out);
  return out;
}

TEST(BlockPool, AllocatesAndReleases) {
  BlockPool pool(4);
  EXPECT_EQ(pool.num_free_blocks(), 4);
  const auto blocks = allocate(pool, 3);
  EXPECT_EQ(blocks, (std::vector<BlockId>{0, 1, 2}));
  EXPECT_EQ(pool.num_free_blocks(), 1);
  EXPECT_EQ(pool.num_used_blocks(), 3);
  for (BlockId b : blocks) EXPECT_EQ(pool.ref_count(b), 1);
  pool.check_invariants();
  pool.release(blocks);
  EXPECT_EQ(pool.num_free_blocks(), 4);
  pool.check_invariants();
}

TEST(BlockPool, RejectsBadSizesAndOverAllocation) {
  EXPECT_THROW(BlockPool(0), std::invalid_argument);
  BlockPool pool(2);
  std::vector<BlockId> out;
  EXPECT_THROW(pool.allocate(3, out), std::logic_error);
  EXPECT_TRUE(out.empty());
  EXPECT_EQ(pool.num_free_blocks(), 2);
  EXPECT_THROW(pool.ref_count(2), std::out_of_range);
}

TEST(BlockPool, DoubleReleaseThrows) {
  BlockPool pool(2);
  const auto blocks = allocate(pool, 1);
  pool.release(blocks);
  EXPECT_THROW(pool.release(blocks), std::logic_error);
  pool.check_invariants();
}

TEST(BlockPool, SharedBlockIsFreedByItsLastHolder) {
  BlockPool pool(2);
  const auto blocks = allocate(pool, 1);
  ASSERT_TRUE(pool.cache(blocks[0], 42));
  pool.touch(blocks[0]);  // a second sequence shares the prefix
  EXPECT_EQ(pool.ref_count(blocks[0]), 2);
  pool.release(blocks);
  EXPECT_EQ(pool.ref_count(blocks[0]), 1);
  EXPECT_EQ(pool.num_free_blocks(), 1);
  pool.release(blocks);
  EXPECT_EQ(pool.num_free_blocks(), 2);
  pool.check_invariants();
}

TEST(BlockPool, FreedCachedBlocksStayFindableUntilEvicted) {
  BlockPool pool(3);
  RecordingListener listener;
  pool.set_eviction_listener(&listener);
  const auto blocks = allocate(pool, 2);
  ASSERT_TRUE(pool.cache(blocks[0], 100));
  ASSERT_TRUE(pool.cache(blocks[1], 101));
  pool.release(blocks);
  EXPECT_EQ(pool.num_cached_blocks(), 2);
  EXPECT_EQ(pool.lookup(100), blocks[0]);

  // Revive one: it leaves the free list with its contents intact.
  pool.touch(blocks[0]);
  EXPECT_EQ(pool.num_free_blocks(), 2);
  EXPECT_EQ(pool.hash_of(blocks[0]), BlockHash{100});
  pool.check_invariants();

  // The uncached block 2 is reused before the cached block 1; then block 1 is evicted.
  EXPECT_EQ(allocate(pool, 1), std::vector<BlockId>{2});
  EXPECT_TRUE(listener.evicted.empty());
  EXPECT_EQ(allocate(pool, 1), std::vector<BlockId>{blocks[1]});
  ASSERT_EQ(listener.evicted.size(), 1u);
  EXPECT_EQ(listener.evicted[0], std::make_pair(blocks[1], BlockHash{101}));
  EXPECT_FALSE(pool.lookup(101).has_value());
  EXPECT_FALSE(pool.hash_of(blocks[1]).has_value());
  EXPECT_EQ(pool.num_evictions(), 1u);
  pool.check_invariants();
}

TEST(BlockPool, EvictsLeastRecentlyFreedFirstAndTailBeforeHead) {
  BlockPool pool(4);
  RecordingListener listener;
  pool.set_eviction_listener(&listener);
  const auto first = allocate(pool, 2);   // a sequence's blocks: head 0, tail 1
  const auto second = allocate(pool, 2);  // another sequence: 2, 3
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(pool.cache(i, 1000 + i));
  pool.release(first);   // freed first: evicted first, tail (1) before head (0)
  pool.release(second);
  EXPECT_EQ(allocate(pool, 2), (std::vector<BlockId>{0, 1}));  // handed out in id order
  EXPECT_EQ(allocate(pool, 2), (std::vector<BlockId>{2, 3}));
  ASSERT_EQ(listener.evicted.size(), 4u);
  EXPECT_EQ(listener.evicted[0].second, BlockHash{1001});
  EXPECT_EQ(listener.evicted[1].second, BlockHash{1000});
  EXPECT_EQ(listener.evicted[2].second, BlockHash{1003});
  pool.check_invariants();
}

TEST(BlockPool, ReusesUncachedBlocksAsRunsInIdOrder) {
  BlockPool pool(8);
  const auto a = allocate(pool, 3);  // 0..2
  const auto b = allocate(pool, 2);  // 3..4
  const auto c = allocate(pool, 3);  // 5..7
  pool.release(a);
  pool.release(c);
  EXPECT_EQ(pool.free_uncached_runs(), (std::vector<std::pair<BlockId, int32_t>>{{0, 3}, {5, 3}}));
  pool.release(b);  // joins both neighbours: one run again
  EXPECT_EQ(pool.free_uncached_runs(), (std::vector<std::pair<BlockId, int32_t>>{{0, 8}}));
  pool.check_invariants();
}

TEST(BlockPool, AGrowingTableContinuesAtItsNextBlock) {
  BlockPool pool(16);
  const auto filler = allocate(pool, 16);
  pool.release({filler[2], filler[3], filler[4], filler[10], filler[11]});
  std::vector<BlockId> table = {1};  // a table ending at block 1 grows into 2, 3, 4 before 10
  pool.allocate(2, table);
  EXPECT_EQ(table, (std::vector<BlockId>{1, 2, 3}));
  pool.allocate(2, table);  // 4, then the best fit for the last one
  EXPECT_EQ(table, (std::vector<BlockId>{1, 2, 3, 4, 10}));
  pool.check_invariants();
}

TEST(BlockPool, RegisteringAFreeBlockFilesItAsCached) {
  BlockPool pool(2);
  const auto blocks = allocate(pool, 1);
  pool.release(blocks);
  ASSERT_TRUE(pool.cache(blocks[0], 5));
  pool.check_invariants();
  EXPECT_EQ(allocate(pool, 1), std::vector<BlockId>{1});  // the uncached block first
  EXPECT_EQ(pool.lookup(5), blocks[0]);
  pool.check_invariants();
}

TEST(BlockPool, TouchingAFreeUncachedBlockTakesItOutOfItsRun) {
  BlockPool pool(5);
  pool.touch(2);
  EXPECT_EQ(pool.ref_count(2), 1);
  EXPECT_EQ(pool.free_uncached_runs(), (std::vector<std::pair<BlockId, int32_t>>{{0, 2}, {3, 2}}));
  pool.check_invariants();
  pool.release({2});
  pool.check_invariants();
}

TEST(BlockPool, KeepsTheFirstCopyOfADuplicatePrefix) {
  BlockPool pool(2);
  const auto blocks = allocate(pool, 2);
  EXPECT_TRUE(pool.cache(blocks[0], 7));
  EXPECT_FALSE(pool.cache(blocks[1], 7));  // computed the same prefix concurrently
  EXPECT_TRUE(pool.cache(blocks[0], 7));   // re-registering the same block is a no-op
  EXPECT_EQ(pool.lookup(7), blocks[0]);
  EXPECT_FALSE(pool.hash_of(blocks[1]).has_value());
  pool.check_invariants();
}

}  // namespace
}  // namespace rtpllm

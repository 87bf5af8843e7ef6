// FreeBlockRuns: runs merge and split as blocks come and go, and take() hands blocks out in the
// fewest runs the free blocks allow (checked against a brute-force count under random traffic).
#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <random>
#include <set>
#include <stdexcept>
#include <utility>
#include <vector>

#include "rtpllm/cache/free_block_runs.h"

namespace rtpllm {
namespace {

using Runs = std::vector<std::pair<BlockId, int32_t>>;

// Runs of consecutive ids in a block list, in list order.
int32_t count_runs(const std::vector<BlockId>& blocks) {
  int32_t runs = 0;
  for (size_t i = 0; i < blocks.size(); ++i) runs += (i == 0 || blocks[i] != blocks[i - 1] + 1) ? 1 : 0;
  return runs;
}

// The fewest runs any choice of `count` free blocks can come in: the k longest runs must cover it.
int32_t fewest_runs(const Runs& runs, int32_t count) {
  std::vector<int32_t> lengths;
  for (const auto& [first, length] : runs) lengths.push_back(length);
  std::sort(lengths.rbegin(), lengths.rend());
  int32_t k = 0, covered = 0;
  while (covered < count) covered += lengths[k++];
  return k;
}

std::vector<BlockId> take(FreeBlockRuns& runs, int32_t count, BlockId continue_at = -1) {
  std::vector<BlockId> out;
  runs.take(count, continue_at, out);
  return out;
}

FreeBlockRuns with_blocks(int32_t num_blocks, const std::vector<BlockId>& free) {
  FreeBlockRuns runs(num_blocks);
  for (BlockId id : free) runs.insert(id);
  runs.check_invariants();
  return runs;
}

TEST(FreeBlockRuns, InsertMergesNeighboursAndEraseSplits) {
  FreeBlockRuns runs(10);
  EXPECT_EQ(runs.size(), 0);
  for (BlockId id : {5, 3, 9, 0}) runs.insert(id);
  EXPECT_EQ(runs.runs(), (Runs{{0, 1}, {3, 1}, {5, 1}, {9, 1}}));
  runs.insert(4);  // joins 3 and 5
  EXPECT_EQ(runs.runs(), (Runs{{0, 1}, {3, 3}, {9, 1}}));
  EXPECT_EQ(runs.num_runs(), 3);
  EXPECT_EQ(runs.size(), 5);
  runs.check_invariants();
  runs.erase(4);
  EXPECT_EQ(runs.runs(), (Runs{{0, 1}, {3, 1}, {5, 1}, {9, 1}}));
  runs.erase(0);
  runs.erase(9);
  EXPECT_EQ(runs.runs(), (Runs{{3, 1}, {5, 1}}));
  runs.check_invariants();
  EXPECT_THROW(runs.insert(3), std::logic_error);
  EXPECT_THROW(runs.insert(10), std::logic_error);
  EXPECT_THROW(runs.erase(4), std::logic_error);
  EXPECT_FALSE(runs.contains(-1));
  EXPECT_FALSE(runs.contains(10));
  EXPECT_THROW(FreeBlockRuns(0), std::invalid_argument);
}

TEST(FreeBlockRuns, TakesTheShortestRunThatFits) {
  // Runs of 3 (0..2), 8 (4..11), 5 (13..17).
  FreeBlockRuns runs = with_blocks(20, {0, 1, 2, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17});
  EXPECT_EQ(take(runs, 4), (std::vector<BlockId>{13, 14, 15, 16}));  // the 5, not the 8
  EXPECT_EQ(take(runs, 1), (std::vector<BlockId>{17}));              // the leftover 1
  EXPECT_EQ(take(runs, 3), (std::vector<BlockId>{0, 1, 2}));
  runs.check_invariants();
  EXPECT_EQ(runs.runs(), (Runs{{4, 8}}));
}

TEST(FreeBlockRuns, TakesLongestRunsWhenNoneFits) {
  // Runs of 3 (0..2), 4 (4..7), 2 (9..10), 1 (12).
  FreeBlockRuns runs = with_blocks(13, {0, 1, 2, 4, 5, 6, 7, 9, 10, 12});
  // 8 blocks: the 4, then the 3, then one from the shortest run that fits (the single block).
  EXPECT_EQ(take(runs, 8), (std::vector<BlockId>{4, 5, 6, 7, 0, 1, 2, 12}));
  EXPECT_EQ(runs.runs(), (Runs{{9, 2}}));
  EXPECT_THROW(take(runs, 3), std::logic_error);
  EXPECT_EQ(runs.size(), 2);
  runs.check_invariants();
}

TEST(FreeBlockRuns, ContinuesAtTheGivenBlockFirst) {
  FreeBlockRuns runs = with_blocks(12, {2, 3, 6, 7, 8, 9, 10});
  EXPECT_EQ(take(runs, 3, /*continue_at=*/2), (std::vector<BlockId>{2, 3, 6}));
  EXPECT_EQ(take(runs, 1, /*continue_at=*/7), (std::vector<BlockId>{7}));
  EXPECT_EQ(take(runs, 1, /*continue_at=*/0), (std::vector<BlockId>{8}));  // 0 is not free: best fit
  runs.check_invariants();
}

TEST(FreeBlockRuns, RandomTrafficKeepsInvariantsAndTakesTheFewestRuns) {
  for (int32_t num_blocks : {1, 7, 64, 129, 4100}) {  // around the bitmaps' word boundaries
    std::mt19937 rng(static_cast<uint32_t>(num_blocks));
    FreeBlockRuns runs(num_blocks);
    std::set<BlockId> free;  // the reference
    for (int step = 0; step < 3000; ++step) {
      const auto op = rng() % 3;
      if (op == 0 && static_cast<int32_t>(free.size()) < num_blocks) {
        BlockId id = static_cast<BlockId>(rng() % num_blocks);
        while (free.count(id)) id = (id + 1) % num_blocks;
        runs.insert(id);
        free.insert(id);
      } else if (op == 1 && !free.empty()) {
        const BlockId id = *std::next(free.begin(), static_cast<long>(rng() % free.size()));
        runs.erase(id);
        free.erase(id);
      } else if (!free.empty()) {
        const auto count = static_cast<int32_t>(1 + rng() % std::min<size_t>(free.size(), 40));
        const int32_t best = fewest_runs(runs.runs(), count);
        const std::vector<BlockId> out = take(runs, count);
        ASSERT_EQ(static_cast<int32_t>(out.size()), count);
        EXPECT_EQ(count_runs(out), best) << "count " << count;
        for (BlockId id : out) ASSERT_EQ(free.erase(id), 1u) << "block " << id << " was not free";
      }
      ASSERT_EQ(runs.size(), static_cast<int32_t>(free.size()));
      if (step % 97 == 0) {
        runs.check_invariants();
        for (BlockId id = 0; id < num_blocks; ++id) ASSERT_EQ(runs.contains(id), free.count(id) == 1);
      }
    }
    runs.check_invariants();
  }
}

}  // namespace
}  // namespace rtpllm

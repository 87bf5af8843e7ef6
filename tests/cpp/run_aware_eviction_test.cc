// RunAwareEviction: which k of a window of cached free blocks (oldest first) to evict so that with
// the free uncached blocks they form few runs; plain LRU when nothing can join.
#include <gtest/gtest.h>

#include <set>
#include <stdexcept>
#include <vector>

#include "rtpllm/cache/run_aware_eviction.h"

namespace rtpllm {
namespace {

// The chosen blocks of `window`, in window order.
// `free`: free uncached blocks; `cached`: cached free blocks outside the window.
std::vector<BlockId> choose(const std::vector<BlockId>& window, int32_t count, const std::vector<BlockId>& free,
                            const std::set<BlockId>& cached = {}) {
  FreeBlockRuns runs(64);
  for (BlockId id : free) runs.insert(id);
  std::set<BlockId> cached_free(window.begin(), window.end());
  cached_free.insert(cached.begin(), cached.end());
  RunAwareEviction eviction(64);
  std::vector<uint8_t> chosen;
  eviction.choose(window, count, runs, [&](BlockId id) { return cached_free.count(id) == 1; }, chosen);
  EXPECT_EQ(chosen.size(), window.size());
  std::vector<BlockId> victims;
  for (size_t i = 0; i < window.size(); ++i) {
    if (chosen[i]) victims.push_back(window[i]);
  }
  EXPECT_EQ(static_cast<int32_t>(victims.size()), count);
  return victims;
}

TEST(RunAwareEviction, NothingToJoinIsPlainLeastRecentlyUsed) {
  // Isolated cached blocks, no free runs: the oldest go.
  EXPECT_EQ(choose({40, 10, 30, 20}, 2, {}), (std::vector<BlockId>{40, 10}));
}

TEST(RunAwareEviction, ClosesTheGapBetweenTwoFreeRuns) {
  // Free runs 0..4 and 6..9; block 5 (the youngest in the window) joins them.
  EXPECT_EQ(choose({30, 20, 5, 40}, 1, {0, 1, 2, 3, 4, 6, 7, 8, 9}), (std::vector<BlockId>{5}));
  // Two gaps: the shorter one closes within the budget; the rest extends a run.
  EXPECT_EQ(choose({12, 13, 14, 5, 50, 51}, 2, {0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 15}),
            (std::vector<BlockId>{12, 5}));
}

TEST(RunAwareEviction, ExtendsAFreeRunFromItsTouchingEnd) {
  // Free run 10..12. Window piece 13..16 touches its end: take 13, 14 (not the older 15, 16).
  EXPECT_EQ(choose({16, 15, 14, 13, 40}, 2, {10, 11, 12}), (std::vector<BlockId>{14, 13}));
  // Piece 4..7 touches free run 8..9 from below: take 6, 7.
  EXPECT_EQ(choose({4, 5, 6, 7, 30, 31}, 2, {8, 9}), (std::vector<BlockId>{6, 7}));
}

TEST(RunAwareEviction, PrefersOneLongPieceToSeveralShortOnes) {
  // Pieces 1, 3, 20..23 (younger): 3 blocks from 20..23 are one run, the older two would be two.
  EXPECT_EQ(choose({1, 3, 20, 21, 22, 23}, 3, {}), (std::vector<BlockId>{20, 21, 22}));
  // Longest whole first (8..10), then the best fit for the last one (the single 30, not 1..2).
  EXPECT_EQ(choose({1, 2, 8, 9, 10, 30, 40, 41, 42}, 4, {}, {11}), (std::vector<BlockId>{8, 9, 10, 30}));
}

TEST(RunAwareEviction, CutsAPieceWhereTheRestStaysJoined) {
  // Piece 20..22 continues into cached block 19 below the window: cut from the top (22, 21),
  // although 20 is the oldest, so that 19..20 stays one stretch.
  EXPECT_EQ(choose({20, 21, 22, 50, 51, 52, 53, 54}, 2, {}, {19, 55}), (std::vector<BlockId>{21, 22}));
  // Nothing beyond either end: from the older end, here the top (a table freed tail first).
  EXPECT_EQ(choose({22, 21, 20, 50, 51, 52, 53, 54}, 2, {}, {55}), (std::vector<BlockId>{22, 21}));
}

TEST(RunAwareEviction, WholeWindowOrNothing) {
  EXPECT_EQ(choose({3, 1, 2}, 3, {}), (std::vector<BlockId>{3, 1, 2}));
  EXPECT_EQ(choose({3, 1, 2}, 0, {}), (std::vector<BlockId>{}));
  RunAwareEviction eviction(4);
  std::vector<uint8_t> chosen;
  EXPECT_THROW(eviction.choose({1}, 2, FreeBlockRuns(4), [](BlockId) { return false; }, chosen), std::logic_error);
}

}  // namespace
}  // namespace rtpllm

#include <gtest/gtest.h>

#include <random>
#include <stdexcept>
#include <unordered_map>

#include "rtpllm/cache/block_hash_index.h"

namespace rtpllm {
namespace {

TEST(BlockHashIndex, InsertFindErase) {
  BlockHashIndex index(4);
  EXPECT_TRUE(index.insert(10, 0));
  EXPECT_FALSE(index.insert(10, 1));  // present already
  EXPECT_EQ(index.find(10), BlockId{0});
  EXPECT_FALSE(index.find(11).has_value());
  EXPECT_TRUE(index.erase(10));
  EXPECT_FALSE(index.erase(10));
  EXPECT_EQ(index.size(), 0u);
}

TEST(BlockHashIndex, RefusesMoreEntriesThanBlocks) {
  BlockHashIndex index(2);
  EXPECT_TRUE(index.insert(1, 0));
  EXPECT_TRUE(index.insert(2, 1));
  EXPECT_THROW(index.insert(3, 0), std::logic_error);
}

TEST(BlockHashIndex, MatchesAMapUnderChurnWithCollidingHomes) {
  // Hashes sharing their low bits land in the same probe runs: erasing from the middle of a run
  // must keep every other entry findable.
  constexpr int32_t kMax = 64;
  BlockHashIndex index(kMax);
  std::unordered_map<BlockHash, BlockId> reference;
  std::mt19937_64 rng(7);
  for (int i = 0; i < 20000; ++i) {
    const BlockHash hash = (rng() % 40) << 20 | (rng() % 3);  // few distinct homes
    if (rng() % 2 == 0 && reference.size() < kMax) {
      const auto id = static_cast<BlockId>(rng() % 1000);
      EXPECT_EQ(index.insert(hash, id), reference.emplace(hash, id).second);
    } else {
      EXPECT_EQ(index.erase(hash), reference.erase(hash) == 1);
    }
    ASSERT_EQ(index.size(), reference.size());
  }
  for (BlockHash probe = 0; probe < (40ULL << 20); probe += 1ULL << 20) {
    for (BlockHash low = 0; low < 3; ++low) {
      const auto it = reference.find(probe | low);
      const auto found = index.find(probe | low);
      ASSERT_EQ(found.has_value(), it != reference.end());
      if (found) {
        EXPECT_EQ(*found, it->second);
      }
    }
  }
}

}  // namespace
}  // namespace rtpllm

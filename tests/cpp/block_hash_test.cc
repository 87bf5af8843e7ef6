#include <gtest/gtest.h>

#include <set>
#include <vector>

#include "rtpllm/cache/block_hash.h"

namespace rtpllm {
namespace {

BlockHash hash_of(BlockHash parent, const std::vector<TokenId>& tokens, uint64_t extra = 0) {
  return hash_block_tokens(parent, tokens.data(), tokens.size(), extra);
}

TEST(BlockHash, IsStableAcrossBuildsAndProcesses) {
  // Golden values: other processes (KV tiers, transfer peers) key on these. Changing the function
  // is a format change and must update them deliberately.
  EXPECT_EQ(hash_of(kRootBlockHash, {1, 2, 3, 4}), 0x36a357bdf9c7848cULL);
  EXPECT_EQ(hash_of(0x1234, {7}, 99), 0xcfa047a00b6348e4ULL);
}

TEST(BlockHash, DependsOnEveryInput) {
  const std::vector<TokenId> tokens = {11, 12, 13, 14};
  const BlockHash base = hash_of(kRootBlockHash, tokens);
  EXPECT_EQ(base, hash_of(kRootBlockHash, tokens));
  EXPECT_NE(base, hash_of(1, tokens));                        // parent
  EXPECT_NE(base, hash_of(kRootBlockHash, tokens, 1));        // extra key
  EXPECT_NE(base, hash_of(kRootBlockHash, {12, 11, 13, 14}));  // order
  EXPECT_NE(base, hash_of(kRootBlockHash, {11, 12, 13, 15}));  // one token
  EXPECT_NE(hash_of(kRootBlockHash, {0, 0}), hash_of(kRootBlockHash, {0, 0, 0}));  // length
  EXPECT_NE(hash_of(kRootBlockHash, {1, 0}), hash_of(kRootBlockHash, {0, 1}));
}

TEST(BlockHash, ChainsDistinguishPrefixes) {
  // Same block tokens under different parents give different keys, so no false prefix hit.
  std::set<BlockHash> seen;
  for (TokenId first = 0; first < 200; ++first) {
    const BlockHash parent = hash_of(kRootBlockHash, {first, 1, 2, 3});
    EXPECT_TRUE(seen.insert(hash_of(parent, {4, 5, 6, 7})).second);
  }
}

}  // namespace
}  // namespace rtpllm

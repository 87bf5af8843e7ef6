#include <gtest/gtest.h>

#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

#include "rtpllm/cache/kv_cache_manager.h"

namespace rtpllm {
namespace {

constexpr int32_t kBlockSize = 4;

Request make_request(RequestId id, int32_t num_tokens, TokenId first = 1) {
  RequestSpec spec;
  spec.request_id = id;
  spec.prompt_token_ids.resize(num_tokens);
  std::iota(spec.prompt_token_ids.begin(), spec.prompt_token_ids.end(), first);
  return Request(spec);
}

// Admits `r`, computes all but its last token and registers the computed full blocks, as one
// scheduler step followed by update() would.
PrefixHit admit_and_compute(KVCacheManager& kv, Request& r) {
  PrefixHit hit = kv.find_cached_prefix(r);
  const int32_t num_new = r.num_tokens() - hit.num_tokens;
  EXPECT_TRUE(kv.allocate_slots(r, num_new, &hit));
  r.num_computed_tokens += num_new;
  kv.cache_computed_blocks(r);
  return hit;
}

TEST(KVCacheManager, RejectsBadOptionsNamingTheField) {
  struct Case {
    int32_t num_blocks, block_size;
    const char* field;
  };
  const Case cases[] = {{0, 16, "num_blocks"}, {-1, 16, "num_blocks"}, {8, 0, "block_size"}, {8, -4, "block_size"},
                        {1 << 30, 16, "num_blocks"}};
  for (const Case& c : cases) {
    try {
      KVCacheManager kv(CacheOptions{c.num_blocks, c.block_size, true});
      FAIL() << "accepted num_blocks=" << c.num_blocks << " block_size=" << c.block_size;
    } catch (const std::invalid_argument& e) {
      EXPECT_EQ(std::string(e.what()).rfind(std::string(c.field) + ":", 0), 0u) << e.what();
    }
  }
}

TEST(KVCacheManager, AllocatesBlocksForNewTokens) {
  KVCacheManager kv(CacheOptions{8, kBlockSize, true});
  Request r = make_request(1, 10);
  PrefixHit none;
  ASSERT_TRUE(kv.allocate_slots(r, 6, &none));  // a first chunk of 6 tokens: 2 blocks
  EXPECT_EQ(r.block_table.size(), 2u);
  r.num_computed_tokens = 6;
  ASSERT_TRUE(kv.allocate_slots(r, 2));  // tokens 6, 7 fit in block 1
  EXPECT_EQ(r.block_table.size(), 2u);
  ASSERT_TRUE(kv.allocate_slots(r, 4));  // tokens 6..9: one more block
  EXPECT_EQ(r.block_table.size(), 3u);
  EXPECT_EQ(kv.num_free_blocks(), 5);
  kv.free(r);
  EXPECT_TRUE(r.block_table.empty());
  EXPECT_EQ(kv.num_free_blocks(), 8);
}

TEST(KVCacheManager, FailedAllocationChangesNothing) {
  KVCacheManager kv(CacheOptions{2, kBlockSize, true});
  Request r = make_request(1, 12);
  PrefixHit none;
  EXPECT_FALSE(kv.allocate_slots(r, 12, &none));  // needs 3 blocks
  EXPECT_TRUE(r.block_table.empty());
  EXPECT_EQ(kv.num_free_blocks(), 2);
  EXPECT_EQ(kv.num_prefix_query_tokens(), 0u);
  kv.pool().check_invariants();
}

TEST(KVCacheManager, FindsTheLongestCachedPrefixOfFullBlocks) {
  KVCacheManager kv(CacheOptions{16, kBlockSize, true});
  Request first = make_request(1, 11);  // blocks [1..4] [5..8] full, [9..11] partial
  admit_and_compute(kv, first);
  const std::vector<BlockId> first_blocks = first.block_table;
  kv.free(first);

  Request second = make_request(2, 14);  // same first 11 tokens, then more
  const PrefixHit hit = kv.find_cached_prefix(second);
  ASSERT_EQ(hit.blocks.size(), 2u);  // the partial block is never shared
  EXPECT_EQ(hit.num_tokens, 8);
  EXPECT_EQ(hit.blocks, std::vector<BlockId>(first_blocks.begin(), first_blocks.begin() + 2));
  ASSERT_TRUE(kv.allocate_slots(second, second.num_tokens() - hit.num_tokens, &hit));
  EXPECT_EQ(second.num_computed_tokens, 8);
  EXPECT_EQ(std::vector<BlockId>(second.block_table.begin(), second.block_table.begin() + 2), hit.blocks);
  EXPECT_EQ(second.block_table.size(), 4u);
  EXPECT_EQ(kv.num_prefix_query_tokens(), 11u + 14u);
  EXPECT_EQ(kv.num_prefix_hit_tokens(), 8u);
  kv.pool().check_invariants();
}

TEST(KVCacheManager, NeverMatchesTheWholePrompt) {
  KVCacheManager kv(CacheOptions{16, kBlockSize, true});
  Request first = make_request(1, 9);
  admit_and_compute(kv, first);  // computes 9 tokens: blocks 0 and 1 full
  kv.free(first);
  Request same = make_request(2, 8);  // exactly the two cached blocks
  const PrefixHit hit = kv.find_cached_prefix(same);
  EXPECT_EQ(hit.num_tokens, 4);  // the last token must be computed to get logits
}

TEST(KVCacheManager, DifferentExtraKeyOrPrefixMisses) {
  KVCacheManager kv(CacheOptions{16, kBlockSize, true});
  Request first = make_request(1, 9);
  admit_and_compute(kv, first);
  RequestSpec spec;
  spec.request_id = 2;
  spec.prompt_token_ids = first.token_ids;
  spec.extra_key = 77;
  Request other_key(spec);
  EXPECT_EQ(kv.find_cached_prefix(other_key).num_tokens, 0);
  Request other_start = make_request(3, 9, /*first=*/2);
  EXPECT_EQ(kv.find_cached_prefix(other_start).num_tokens, 0);
}

TEST(KVCacheManager, SharesBlocksBetweenLiveRequests) {
  KVCacheManager kv(CacheOptions{8, kBlockSize, true});
  Request a = make_request(1, 9);
  admit_and_compute(kv, a);  // 3 blocks, 2 cached
  Request b = make_request(2, 9);
  const PrefixHit hit = admit_and_compute(kv, b);
  EXPECT_EQ(hit.num_tokens, 8);
  EXPECT_EQ(kv.pool().ref_count(a.block_table[0]), 2);
  EXPECT_EQ(kv.pool().ref_count(a.block_table[1]), 2);
  EXPECT_EQ(kv.num_free_blocks(), 4);  // 3 + 1 new
  kv.free(a);
  EXPECT_EQ(kv.pool().ref_count(b.block_table[0]), 1);
  kv.free(b);
  EXPECT_EQ(kv.num_free_blocks(), 8);
  kv.pool().check_invariants();
}

TEST(KVCacheManager, CountsRevivedFreeBlocksAgainstTheBudget) {
  KVCacheManager kv(CacheOptions{3, kBlockSize, true});
  Request a = make_request(1, 9);
  admit_and_compute(kv, a);
  kv.free(a);  // all 3 free, 2 of them cached
  Request b = make_request(2, 12);
  PrefixHit hit = kv.find_cached_prefix(b);
  ASSERT_EQ(hit.num_tokens, 8);
  // 2 revived + 1 fresh = 3 free blocks: fits exactly, and the fresh block is not a hit block.
  ASSERT_TRUE(kv.allocate_slots(b, 4, &hit));
  EXPECT_NE(b.block_table[2], b.block_table[0]);
  EXPECT_NE(b.block_table[2], b.block_table[1]);
  EXPECT_EQ(kv.num_free_blocks(), 0);
  kv.pool().check_invariants();
}

TEST(KVCacheManager, PrefixCachingOffFindsNothing) {
  KVCacheManager kv(CacheOptions{8, kBlockSize, false});
  Request a = make_request(1, 9);
  admit_and_compute(kv, a);
  EXPECT_EQ(kv.pool().num_cached_blocks(), 0);
  Request b = make_request(2, 9);
  EXPECT_EQ(kv.find_cached_prefix(b).num_tokens, 0);
}

}  // namespace
}  // namespace rtpllm

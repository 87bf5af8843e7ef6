// The transfer plan: token ranges between layouts of different block sizes, the byte copies, the
// registered regions, and the control channel's message encoding. No UCX here: the copies are
// applied with memcpy, so a wrong address shows up as a wrong token.
#include <gtest/gtest.h>

#include <cstring>
#include <stdexcept>

#include "host_kv_pool.h"
#include "rtpllm/transfer/transfer_messages.h"
#include "rtpllm/transfer/transfer_plan.h"

namespace rtpllm {
namespace {

using testing::HostKVPool;
using testing::KVShape;

void apply(const std::vector<CopyOp>& copies) {
  for (const CopyOp& c : copies) {
    std::memcpy(reinterpret_cast<void*>(c.dst), reinterpret_cast<const void*>(c.src), c.bytes);
  }
}

std::vector<BlockId> ids(std::initializer_list<BlockId> list) { return list; }

TEST(TransferPlan, SameBlockSizeIsOneSegmentPerBlock) {
  HostKVPool src(KVShape{}, 8, 4);
  HostKVPool dst(KVShape{}, 8, 4);
  const auto segments = plan_transfer(src.layout(), ids({5, 1, 2}), dst.layout(), ids({0, 7, 3}), 11);
  ASSERT_EQ(segments.size(), 3u);
  EXPECT_EQ(segments[0].src_block, 5);
  EXPECT_EQ(segments[0].dst_block, 0);
  EXPECT_EQ(segments[2].num_tokens, 3);  // partial last block
}

TEST(TransferPlan, LargeToSmallBlocksSplitsEachSourceBlock) {
  // Prefill 64-token blocks into decode 16-token blocks: 4 segments per source block.
  HostKVPool src(KVShape{}, 4, 64);
  HostKVPool dst(KVShape{}, 16, 16);
  const std::vector<BlockId> src_blocks = {2, 0};
  const std::vector<BlockId> dst_blocks = {9, 1, 4, 3, 15, 0, 7, 8};
  const auto segments = plan_transfer(src.layout(), src_blocks, dst.layout(), dst_blocks, 128);
  ASSERT_EQ(segments.size(), 8u);
  for (size_t i = 0; i < segments.size(); ++i) {
    EXPECT_EQ(segments[i].src_block, src_blocks[i / 4]);
    EXPECT_EQ(segments[i].src_token, static_cast<int32_t>(i % 4) * 16);
    EXPECT_EQ(segments[i].dst_block, dst_blocks[i]);
    EXPECT_EQ(segments[i].dst_token, 0);
    EXPECT_EQ(segments[i].num_tokens, 16);
  }
}

// Every pair of block sizes, odd token counts: the bytes of each token land where the destination
// layout says that token lives, and nothing else in the destination changes.
TEST(TransferPlan, CopiesMoveEveryTokenBetweenAnyBlockSizes) {
  for (int32_t src_size : {1, 3, 16, 64}) {
    for (int32_t dst_size : {1, 5, 16, 64}) {
      for (int64_t tokens : {1, 19, 130}) {
        HostKVPool src(KVShape{}, 160, src_size);
        HostKVPool dst(KVShape{}, 160, dst_size);
        std::vector<BlockId> src_blocks, dst_blocks;
        for (int64_t i = 0; i < (tokens + src_size - 1) / src_size; ++i) src_blocks.push_back(static_cast<BlockId>((i * 7 + 3) % 160));
        for (int64_t i = 0; i < (tokens + dst_size - 1) / dst_size; ++i) dst_blocks.push_back(static_cast<BlockId>(159 - i));
        src.fill_sequence(src_blocks, tokens, 42);
        const uint64_t untouched = dst.checksum_except(dst_blocks);
        const auto segments = plan_transfer(src.layout(), src_blocks, dst.layout(), dst_blocks, tokens);
        apply(plan_copies(src.layout(), dst.layout(), segments, -1));
        SCOPED_TRACE("src " + std::to_string(src_size) + " dst " + std::to_string(dst_size) + " tokens " +
                     std::to_string(tokens));
        EXPECT_EQ(dst.mismatches_all_layers(dst_blocks, tokens, 42), 0);
        EXPECT_EQ(dst.checksum_except(dst_blocks), untouched);
      }
    }
  }
}

TEST(TransferPlan, OneLayerTouchesOnlyThatLayer) {
  HostKVPool src(KVShape{}, 6, 4);
  HostKVPool dst(KVShape{}, 6, 8);
  const std::vector<BlockId> s = {1, 2, 3}, d = {4, 0};
  src.fill_sequence(s, 10, 7);
  apply(plan_copies(src.layout(), dst.layout(), plan_transfer(src.layout(), s, dst.layout(), d, 10), 1));
  EXPECT_EQ(dst.mismatches(d, 10, 7, 1, 0), 0);
  EXPECT_EQ(dst.mismatches(d, 10, 7, 1, 1), 0);
  EXPECT_EQ(dst.mismatches(d, 10, 7, 0, 0), 10);
  EXPECT_EQ(dst.mismatches(d, 10, 7, 2, 1), 10);
}

TEST(TransferPlan, ConsecutiveBlocksMergeIntoOneCopy) {
  HostKVPool src(KVShape{}, 8, 4);
  HostKVPool dst(KVShape{}, 8, 4);
  // Blocks 2,3,4 -> 5,6,7 are contiguous on both sides: one copy per layer and plane.
  const auto segments = plan_transfer(src.layout(), ids({2, 3, 4}), dst.layout(), ids({5, 6, 7}), 12);
  const auto copies = plan_copies(src.layout(), dst.layout(), segments, -1);
  ASSERT_EQ(copies.size(), 3u * 2u);
  EXPECT_EQ(copies[0].bytes, static_cast<uint64_t>(3 * src.layout().block_bytes()));
}

TEST(TransferPlan, RejectsBadBlockListsNamingTheField) {
  HostKVPool src(KVShape{}, 4, 8);
  HostKVPool dst(KVShape{}, 4, 4);
  auto expect_error = [&](const std::vector<BlockId>& s, const std::vector<BlockId>& d, int64_t tokens,
                          const std::string& field) {
    try {
      plan_transfer(src.layout(), s, dst.layout(), d, tokens);
      ADD_FAILURE() << "no error for " << field;
    } catch (const std::invalid_argument& e) {
      EXPECT_EQ(std::string(e.what()).rfind(field, 0), 0u) << e.what();
    }
  };
  expect_error({0}, {0, 1, 2}, 8, "dst_blocks");     // 8 tokens need 2 destination blocks
  expect_error({0, 1}, {0, 1}, 8, "src_blocks");     // ... and 1 source block
  expect_error({4}, {0, 1}, 8, "src_blocks");        // out of range
  expect_error({0}, {0, -1}, 8, "dst_blocks");
  expect_error({0}, {1, 1}, 8, "dst_blocks");        // written twice
  expect_error({0}, {0, 1}, 0, "num_tokens");
  EXPECT_THROW(plan_copies(src.layout(), dst.layout(), {}, 3), std::invalid_argument);  // layer
}

TEST(TransferPlan, RejectsIncompatibleLayouts) {
  HostKVPool a(KVShape{3, 2, 5, 2}, 4, 8);
  HostKVPool heads(KVShape{3, 4, 5, 2}, 4, 8);
  HostKVPool layers(KVShape{2, 2, 5, 2}, 4, 8);
  HostKVPool dtype(KVShape{3, 2, 5, 4}, 4, 8);
  EXPECT_NO_THROW(check_compatible(a.layout(), heads.layout()));  // a head slice can move between them
  EXPECT_THROW(check_compatible(a.layout(), layers.layout()), std::invalid_argument);
  EXPECT_THROW(check_compatible(a.layout(), dtype.layout()), std::invalid_argument);
  EXPECT_THROW(plan_copies(a.layout(), heads.layout(), plan_transfer(a.layout(), {0}, heads.layout(), {0}, 8), -1),
               std::invalid_argument);  // every head, but the head counts differ
  KVLayout broken = a.layout();
  broken.block_stride_bytes = 1;
  EXPECT_THROW(check_layout(broken), std::invalid_argument);
  broken = a.layout();
  broken.layers[1].v_base = 0;
  EXPECT_THROW(check_layout(broken), std::invalid_argument);
}

// Token t's heads [offset, offset + count) in `pool`, as bytes.
std::vector<uint8_t> heads_of(HostKVPool& pool, const std::vector<BlockId>& blocks, int64_t t, int32_t layer, int plane,
                              int32_t offset, int32_t count, int32_t head_bytes) {
  const uint8_t* token = pool.token(layer, plane, blocks, t) + offset * head_bytes;
  return std::vector<uint8_t>(token, token + count * head_bytes);
}

// Tensor parallelism of different sizes: one 4-head rank (prefill TP=1) writes heads [0, 2) to one
// 2-head rank and [2, 4) to another (decode TP=2), with block sizes 8 and 4; then the reverse (two
// 2-head ranks fill the two halves of one 4-head rank). Every token's slice lands where it belongs,
// and nothing else is written.
TEST(TransferPlan, HeadSlicesReshardBetweenTensorParallelSizes) {
  const KVShape four{3, 4, 5, 2}, two{3, 2, 5, 2};
  const int32_t head_bytes = 5 * 2;
  const int64_t tokens = 13;
  HostKVPool whole(four, 4, 8);
  HostKVPool half0(two, 6, 4), half1(two, 6, 4);
  const std::vector<BlockId> w = {3, 1}, h = {5, 0, 2, 4};
  whole.fill_sequence(w, tokens, 11);
  const auto segments = plan_transfer(whole.layout(), w, half0.layout(), h, tokens);
  const auto copies0 = plan_copies(whole.layout(), half0.layout(), segments, -1, HeadSlice{0, 0, 2});
  EXPECT_EQ(copies0.size(), static_cast<size_t>(3 * 2 * tokens));  // a copy per token and plane: strided
  apply(copies0);
  apply(plan_copies(whole.layout(), half1.layout(), segments, -1, HeadSlice{2, 0, 2}));
  for (int32_t l = 0; l < 3; ++l) {
    for (int plane = 0; plane < 2; ++plane) {
      for (int64_t t = 0; t < tokens; ++t) {
        EXPECT_EQ(heads_of(half0, h, t, l, plane, 0, 2, head_bytes), heads_of(whole, w, t, l, plane, 0, 2, head_bytes));
        EXPECT_EQ(heads_of(half1, h, t, l, plane, 0, 2, head_bytes), heads_of(whole, w, t, l, plane, 2, 2, head_bytes));
      }
    }
  }
  EXPECT_EQ(half0.checksum_except(h), HostKVPool(two, 6, 4).checksum_except(h));  // nothing outside h

  HostKVPool back(four, 4, 8);
  const auto reverse = plan_transfer(half0.layout(), h, back.layout(), w, tokens);
  apply(plan_copies(half0.layout(), back.layout(), reverse, -1, HeadSlice{0, 0, 2}));
  apply(plan_copies(half1.layout(), back.layout(), reverse, -1, HeadSlice{0, 2, 2}));
  EXPECT_EQ(back.mismatches_all_layers(w, tokens, 11), 0);
}

TEST(TransferPlan, HeadSlicesOutOfRangeNameTheField) {
  HostKVPool four(KVShape{3, 4, 5, 2}, 4, 8), two(KVShape{3, 2, 5, 2}, 4, 8);
  const auto segments = plan_transfer(four.layout(), {0}, two.layout(), {1}, 8);
  auto expect_error = [&](HeadSlice slice, const std::string& field) {
    try {
      plan_copies(four.layout(), two.layout(), segments, -1, slice);
      ADD_FAILURE() << "no error for " << field;
    } catch (const std::invalid_argument& e) {
      EXPECT_EQ(std::string(e.what()).rfind(field, 0), 0u) << e.what();
    }
  };
  expect_error({0, 0, -1}, "num_heads");       // every head, but 4 and 2
  expect_error({0, 0, 0}, "num_heads");
  expect_error({3, 0, 2}, "src_head_offset");  // heads [3, 5) of 4
  expect_error({0, 1, 2}, "dst_head_offset");  // heads [1, 3) of 2
  expect_error({-1, 0, 1}, "src_head_offset");
  // The same slice of every head is whole tokens again: one merged copy per plane and layer.
  HostKVPool other(KVShape{3, 4, 5, 2}, 4, 8);
  const auto whole = plan_transfer(four.layout(), {0, 1}, other.layout(), {2, 3}, 16);
  EXPECT_EQ(plan_copies(four.layout(), other.layout(), whole, -1, HeadSlice{0, 0, 4}).size(), 3u * 2u);
}

TEST(TransferPlan, RegionsMergeOnlyOverlappingPlanes) {
  HostKVPool pool(KVShape{}, 4, 8);
  const auto regions = layout_regions(pool.layout());
  // K and V of one layer touch in one buffer, and layers may touch too: touching planes stay
  // separate regions (they may be separate allocations), one per plane.
  ASSERT_EQ(regions.size(), 6u);
  uint64_t total = 0;
  for (const auto& r : regions) total += r.length;
  EXPECT_EQ(total, 3u * 2u * 4u * static_cast<uint64_t>(pool.layout().block_bytes()));

  std::vector<uint8_t> store(7 * 2 * 3 * 8 * 20);
  const KVLayout block_major =
      make_block_major_layout(reinterpret_cast<uint64_t>(store.data()), MemoryKind::HOST, 7, 3, 8, 2, 5, 2);
  const auto one = layout_regions(block_major);
  ASSERT_EQ(one.size(), 1u);
  EXPECT_EQ(one[0].length, store.size());
  EXPECT_EQ(block_major.bytes_per_block(), block_major.block_stride_bytes);
}

TEST(TransferMessages, RoundTripAndRejectTruncation) {
  HostKVPool pool(KVShape{}, 4, 8);
  PeerDescriptor d;
  d.name = "prefill-0";
  d.identity = "llama|bf16";
  d.worker_address = std::string("\0\1\2worker", 9);
  d.layout = pool.layout();
  d.regions = {{1, 2, "key-one", std::string("ipc\0handle", 10)}, {3, 4, "", ""}};
  d.memory_scope = "host|boot|cuda";
  const std::string bytes = encode_descriptor(d);
  const PeerDescriptor back = decode_descriptor(bytes);
  EXPECT_EQ(back.name, d.name);
  EXPECT_EQ(back.worker_address, d.worker_address);
  EXPECT_EQ(back.layout.layers.size(), 3u);
  EXPECT_EQ(back.layout.layers[2].v_base, d.layout.layers[2].v_base);
  EXPECT_EQ(back.regions[0].rkey, "key-one");
  EXPECT_EQ(back.regions[0].exported, d.regions[0].exported);
  EXPECT_EQ(back.regions[1].exported, "");
  EXPECT_EQ(back.memory_scope, d.memory_scope);
  for (size_t cut : {size_t{0}, size_t{3}, bytes.size() / 2, bytes.size() - 1}) {
    EXPECT_THROW(decode_descriptor(bytes.substr(0, cut)), std::runtime_error) << cut;
  }
  EXPECT_THROW(decode_descriptor(bytes + "x"), std::runtime_error);
  EXPECT_FALSE(back.requires_write_grants);
  EXPECT_EQ(back.connection_key, 0u);
  d.requires_write_grants = true;
  d.connection_key = 0x0123456789abcdefULL;
  const PeerDescriptor keyed = decode_descriptor(encode_descriptor(d));
  EXPECT_TRUE(keyed.requires_write_grants);
  EXPECT_EQ(keyed.connection_key, d.connection_key);
  EXPECT_EQ(decode_put_ack(encode_put_ack(41)), 41u);
  EXPECT_THROW(decode_put_ack("1234567"), std::runtime_error);

  const GrantMessage g{5, true, {7, 0, 3}};
  const GrantMessage h = decode_grant(encode_grant(g));
  EXPECT_EQ(h.request_id, 5u);
  EXPECT_TRUE(h.granted);
  EXPECT_EQ(h.blocks, g.blocks);
  EXPECT_FALSE(decode_grant(encode_grant({6, false, {}})).granted);
  EXPECT_THROW(decode_grant(encode_grant(g) + "x"), std::runtime_error);
  EXPECT_THROW(decode_grant(encode_grant(g).substr(0, 10)), std::runtime_error);
  EXPECT_EQ(decode_grant_query(encode_grant_query(99)), 99u);
  EXPECT_THROW(decode_grant_query("abc"), std::runtime_error);

  const NoticeMessage n{77, 2, 19, {4, 0, 9}};
  const NoticeMessage m = decode_notice(encode_notice(n));
  EXPECT_EQ(m.request_id, 77u);
  EXPECT_EQ(m.layer, 2);
  EXPECT_EQ(m.num_tokens, 19);
  EXPECT_EQ(m.blocks, n.blocks);
  std::string huge_count = encode_notice(n);
  huge_count[20] = '\xff';  // the block count claims far more blocks than the payload holds
  EXPECT_THROW(decode_notice(huge_count), std::runtime_error);
}

}  // namespace
}  // namespace rtpllm

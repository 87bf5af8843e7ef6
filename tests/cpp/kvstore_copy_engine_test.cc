#include <gtest/gtest.h>

#include <cstring>
#include <stdexcept>
#include <vector>

#include "kvstore_fixture.h"
#include "rtpllm/kvstore/checksum.h"
#include "rtpllm/kvstore/cpu_copy_engine.h"

namespace rtpllm {
namespace {

using testing::FakeKVPool;

TEST(KVLayout, ValidateNamesTheBadField) {
  FakeKVPool pool(2, 4, 3, 3, 5, 2);
  EXPECT_NO_THROW(pool.layout().validate());
  auto expect_error = [&](auto mutate, const std::string& field) {
    KVLayout layout = pool.layout();
    mutate(layout);
    try {
      layout.validate();
      ADD_FAILURE() << "no error for " << field;
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find(field), std::string::npos) << e.what();
    }
  };
  expect_error([](KVLayout& l) { l.num_blocks = 0; }, "num_blocks");
  expect_error([](KVLayout& l) { l.head_dim = -1; }, "head_dim");
  expect_error([](KVLayout& l) { l.element_bytes = 3; }, "element_bytes");
  expect_error([](KVLayout& l) { l.block_stride_bytes = 8; }, "block_stride_bytes");
  expect_error([](KVLayout& l) { l.layers[1].v_base = 0; }, "layers[1]");
  expect_error([](KVLayout& l) { l.layers.clear(); }, "layers");
}

TEST(KVLayout, BytesPerBlockCoversKAndVOfEveryLayer) {
  FakeKVPool pool(3, 4, 3, 3, 5, 2);
  EXPECT_EQ(pool.layout().block_bytes(), 3 * 3 * 5 * 2);
  EXPECT_EQ(pool.layout().bytes_per_block(), 2 * 3 * 90);
}

TEST(CpuKVCopyEngine, RoundTripOddBlockListThroughHostBuffers) {
  FakeKVPool pool(3, 11, 3, 3, 5, 2);  // 90-byte segments, 24 bytes of padding between blocks
  auto engine = pool.make_engine();
  const std::vector<BlockId> sources = {7, 2, 9, 0, 5};
  const std::vector<BlockId> targets = {1, 10, 3, 8, 4};
  for (size_t i = 0; i < sources.size(); ++i) pool.fill(sources[i], 100 + i);

  std::vector<HostBuffer> buffers;
  std::vector<BlockCopy> out;
  for (BlockId block : sources) {
    buffers.emplace_back(engine->host_allocator(), static_cast<size_t>(pool.layout().bytes_per_block()));
    out.push_back(BlockCopy{block, buffers.back().data()});
  }
  ASSERT_EQ(engine->wait(engine->submit(CopyDirection::POOL_TO_HOST, out)), TransferState::DONE);

  // Host layout: layer-major, K then V, one contiguous buffer per block.
  const KVLayout& layout = pool.layout();
  for (int32_t l = 0; l < layout.num_layers(); ++l) {
    EXPECT_EQ(std::memcmp(buffers[1].data() + host_segment_offset(layout, l, 1), pool.segment(2, l, 1), 90), 0);
  }

  std::vector<BlockCopy> in;
  for (size_t i = 0; i < targets.size(); ++i) in.push_back(BlockCopy{targets[i], buffers[i].data()});
  const CopyTicket ticket = engine->submit(CopyDirection::HOST_TO_POOL, in);
  TransferState state = TransferState::PENDING;
  while ((state = engine->query(ticket)) == TransferState::PENDING) {
  }
  EXPECT_EQ(state, TransferState::DONE);
  for (size_t i = 0; i < targets.size(); ++i) EXPECT_TRUE(pool.holds(targets[i], 100 + i)) << "block " << targets[i];
  EXPECT_FALSE(pool.holds(6, 100));
  EXPECT_TRUE(pool.padding_intact());
}

TEST(CpuKVCopyEngine, TicketsAreReportedOnceAndBadCopiesThrow) {
  FakeKVPool pool(1, 4, 2, 1, 4, 4);
  auto engine = pool.make_engine();
  HostBuffer buffer(engine->host_allocator(), static_cast<size_t>(pool.layout().bytes_per_block()));

  const CopyTicket empty = engine->submit(CopyDirection::POOL_TO_HOST, {});
  EXPECT_EQ(engine->query(empty), TransferState::DONE);
  EXPECT_THROW(engine->query(empty), std::invalid_argument);
  EXPECT_THROW(engine->query(12345), std::invalid_argument);

  EXPECT_THROW(engine->submit(CopyDirection::POOL_TO_HOST, {BlockCopy{4, buffer.data()}}), std::invalid_argument);
  EXPECT_THROW(engine->submit(CopyDirection::POOL_TO_HOST, {BlockCopy{-1, buffer.data()}}), std::invalid_argument);
  EXPECT_THROW(engine->submit(CopyDirection::HOST_TO_POOL, {BlockCopy{0, nullptr}}), std::invalid_argument);

  KVLayout cuda_layout = pool.layout();
  cuda_layout.memory = MemoryKind::CUDA;
  EXPECT_THROW(CpuKVCopyEngine{cuda_layout}, std::invalid_argument);
}

TEST(CpuKVCopyEngine, ManyConcurrentSubmittersAllComplete) {
  FakeKVPool pool(2, 64, 4, 2, 8, 2);
  auto engine = pool.make_engine();
  for (BlockId b = 0; b < 32; ++b) pool.fill(b, 1000 + b);
  std::vector<HostBuffer> buffers;
  for (int i = 0; i < 32; ++i) buffers.emplace_back(engine->host_allocator(), static_cast<size_t>(pool.layout().bytes_per_block()));
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = t; i < 32; i += 4) {
        const CopyTicket out = engine->submit(CopyDirection::POOL_TO_HOST, {BlockCopy{i, buffers[i].data()}});
        ASSERT_EQ(engine->wait(out), TransferState::DONE);
        const CopyTicket in = engine->submit(CopyDirection::HOST_TO_POOL, {BlockCopy{32 + i, buffers[i].data()}});
        ASSERT_EQ(engine->wait(in), TransferState::DONE);
      }
    });
  }
  for (auto& thread : threads) thread.join();
  for (BlockId b = 0; b < 32; ++b) EXPECT_TRUE(pool.holds(32 + b, 1000 + b));
}

TEST(Checksum, DetectsSingleBitFlipsAndIsStable) {
  std::vector<uint8_t> data(1000);
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<uint8_t>(i * 7);
  const uint64_t base = checksum64(data.data(), data.size());
  // Pinned: files written by one build must verify in the next (a change needs a new file version).
  EXPECT_EQ(base, 0xc87eb24fbb9f0248ULL);
  EXPECT_EQ(checksum64("rtpllm", 6), 0x4559e7086de7cebdULL);
  EXPECT_NE(checksum64(data.data(), 999), base);
  EXPECT_NE(checksum64(data.data(), data.size(), 1), base);
  for (size_t byte : {0u, 31u, 32u, 500u, 995u, 999u}) {
    for (int bit = 0; bit < 8; bit += 3) {
      data[byte] ^= static_cast<uint8_t>(1 << bit);
      EXPECT_NE(checksum64(data.data(), data.size()), base) << byte << ":" << bit;
      data[byte] ^= static_cast<uint8_t>(1 << bit);
    }
  }
  EXPECT_EQ(checksum64(data.data(), data.size()), base);
}

}  // namespace
}  // namespace rtpllm

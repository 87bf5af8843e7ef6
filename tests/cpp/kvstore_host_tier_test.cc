#include <gtest/gtest.h>

#include <functional>
#include <mutex>
#include <stdexcept>
#include <utility>
#include <vector>

#include "kvstore_fixture.h"
#include "rtpllm/kvstore/host_tier.h"

namespace rtpllm {
namespace {

using testing::FakeKVPool;
using testing::poll_until_done;

// A next tier that records offers and holds them until told to release.
struct RecordingSink : KVBlockSink {
  std::mutex mutex;
  std::vector<std::pair<BlockHash, std::vector<uint8_t>>> received;
  std::vector<std::function<void()>> held;
  bool accept = true;
  size_t bytes = 0;
  bool offer(BlockHash hash, const uint8_t* data, std::function<void()> release) override {
    std::lock_guard<std::mutex> lock(mutex);
    if (!accept) return false;
    received.emplace_back(hash, std::vector<uint8_t>(data, data + bytes));
    held.push_back(std::move(release));
    return true;
  }
  void release_all() {
    std::vector<std::function<void()>> releases;
    {
      std::lock_guard<std::mutex> lock(mutex);
      releases.swap(held);
    }
    for (auto& release : releases) release();
  }
};

struct HostTierTest : ::testing::Test {
  FakeKVPool pool{2, 16, 3, 2, 5, 2};  // 60-byte segments, 240-byte blocks
  std::shared_ptr<CpuKVCopyEngine> engine = pool.make_engine();
  int64_t block = pool.layout().bytes_per_block();

  void save(HostTier& tier, const std::vector<BlockHash>& hashes, const std::vector<BlockId>& blocks) {
    for (size_t i = 0; i < hashes.size(); ++i) pool.fill(blocks[i], hashes[i]);
    ASSERT_EQ(poll_until_done(tier, tier.save(hashes, blocks)), TransferState::DONE);
    tier.check_invariants();
  }
};

TEST_F(HostTierTest, CapacityIsWholeBlocks) {
  HostTier tier(engine, 3 * block + block / 2);
  EXPECT_EQ(tier.capacity_blocks(), 3);
  EXPECT_EQ(tier.stats()[0].capacity_blocks, 3u);
  EXPECT_THROW(HostTier(engine, block - 1), std::invalid_argument);
  EXPECT_THROW(HostTier(nullptr, block), std::invalid_argument);
}

std::vector<KVEvent> drained(KVEventLog& log) {
  std::vector<KVEvent> events;
  EXPECT_FALSE(log.drain(events));
  return events;
}

TEST_F(HostTierTest, RecordsStoredAndEvictedBlocksUnderItsTier) {
  HostTier tier(engine, 2 * block);
  save(tier, {1}, {0});  // before the log: reported by held_blocks(), not as an event
  KVEventLog log(16);
  tier.set_event_log(&log);
  std::vector<KVEvent> held;
  tier.held_blocks(held);
  ASSERT_EQ(held.size(), 1u);
  EXPECT_EQ(held[0].hash, 1u);
  EXPECT_EQ(held[0].tier, KVTier::kHost);
  save(tier, {2}, {1});
  save(tier, {3}, {2});  // full: evicts 1, the least recently used
  const std::vector<KVEvent> events = drained(log);
  ASSERT_EQ(events.size(), 3u);
  EXPECT_EQ(events[0].hash, 2u);
  EXPECT_EQ(events[0].kind, KVEventKind::kStored);
  EXPECT_EQ(events[1].hash, 1u);
  EXPECT_EQ(events[1].kind, KVEventKind::kRemoved);
  EXPECT_EQ(events[2].hash, 3u);
  EXPECT_EQ(events[2].kind, KVEventKind::kStored);
  for (const KVEvent& e : events) EXPECT_EQ(e.tier, KVTier::kHost);
  tier.set_event_log(nullptr);
  save(tier, {4}, {3});
  EXPECT_TRUE(drained(log).empty());
}

TEST_F(HostTierTest, SaveMatchLoadRoundTrip) {
  HostTier tier(engine, 8 * block);
  save(tier, {11, 12, 13}, {4, 9, 2});
  EXPECT_EQ(tier.match({11, 12, 13, 14}), 3);
  EXPECT_EQ(tier.match({11, 99, 13}), 1);  // a leading run only
  EXPECT_EQ(tier.match({99}), 0);

  for (BlockId b : {0, 5, 7}) pool.clear(b);
  ASSERT_EQ(poll_until_done(tier, tier.load({12, 11, 13}, {0, 5, 7})), TransferState::DONE);
  EXPECT_TRUE(pool.holds(0, 12));
  EXPECT_TRUE(pool.holds(5, 11));
  EXPECT_TRUE(pool.holds(7, 13));
  EXPECT_TRUE(pool.padding_intact());

  const KVTierStats stats = tier.stats()[0];
  EXPECT_EQ(stats.name, "host");
  EXPECT_EQ(stats.queries, 3u);
  EXPECT_EQ(stats.query_blocks, 8u);
  EXPECT_EQ(stats.hit_blocks, 4u);
  EXPECT_EQ(stats.saved_blocks, 3u);
  EXPECT_EQ(stats.loaded_blocks, 3u);
  EXPECT_EQ(stats.load_bytes, static_cast<uint64_t>(3 * block));
  EXPECT_EQ(stats.used_blocks, 3u);
  EXPECT_EQ(stats.load_latency_s.size(), 1u);
  EXPECT_TRUE(tier.stats()[0].load_latency_s.empty());  // reported once
  tier.check_invariants();
}

TEST_F(HostTierTest, SavingAHeldHashIsSkipped) {
  HostTier tier(engine, 4 * block);
  save(tier, {1, 2}, {0, 1});
  pool.fill(3, 777);  // other contents under an already saved hash: the first copy stays
  save(tier, {2, 3}, {3, 2});
  EXPECT_EQ(tier.stats()[0].saved_blocks, 3u);
  ASSERT_EQ(poll_until_done(tier, tier.load({2}, {5})), TransferState::DONE);
  EXPECT_TRUE(pool.holds(5, 2));
}

TEST_F(HostTierTest, EvictsLeastRecentlyUsed) {
  HostTier tier(engine, 3 * block);
  save(tier, {1, 2, 3}, {0, 1, 2});
  ASSERT_EQ(poll_until_done(tier, tier.load({1}, {5})), TransferState::DONE);  // 1 is now the most recent
  save(tier, {4}, {3});
  EXPECT_TRUE(tier.contains(1));
  EXPECT_FALSE(tier.contains(2));  // least recently used
  EXPECT_TRUE(tier.contains(3));
  EXPECT_TRUE(tier.contains(4));
  EXPECT_EQ(tier.stats()[0].evicted_blocks, 1u);
  EXPECT_EQ(tier.stats()[0].used_blocks, 3u);
}

TEST_F(HostTierTest, BlocksBeingLoadedAreNotEvicted) {
  HostTier tier(engine, 2 * block);
  save(tier, {1, 2}, {0, 1});
  const TransferHandle loading = tier.load({1, 2}, {5, 6});  // pins both until polled DONE
  save(tier, {3}, {2});  // no free buffer and nothing evictable: skipped, still DONE
  EXPECT_FALSE(tier.contains(3));
  ASSERT_EQ(poll_until_done(tier, loading), TransferState::DONE);
  save(tier, {3}, {2});
  EXPECT_TRUE(tier.contains(3));
  tier.check_invariants();
}

TEST_F(HostTierTest, LoadOfAMissingBlockFailsAndBadArgumentsThrow) {
  HostTier tier(engine, 4 * block);
  save(tier, {1}, {0});
  EXPECT_EQ(poll_until_done(tier, tier.load({1, 2}, {5, 6})), TransferState::FAILED);
  EXPECT_EQ(tier.stats()[0].failed_loads, 1u);
  EXPECT_THROW(tier.load({1}, {}), std::invalid_argument);
  EXPECT_THROW(tier.save({1}, {16}), std::invalid_argument);
  EXPECT_THROW(tier.load({1}, {-1}), std::invalid_argument);
  const TransferHandle handle = tier.load({1}, {3});
  EXPECT_EQ(poll_until_done(tier, handle), TransferState::DONE);
  EXPECT_THROW(tier.poll(handle), std::invalid_argument);  // reported once
  EXPECT_THROW(tier.poll(999), std::invalid_argument);
  tier.check_invariants();
}

TEST_F(HostTierTest, SavedBlocksAreOfferedToTheNextTierAndPinnedUntilReleased) {
  auto sink = std::make_shared<RecordingSink>();
  sink->bytes = static_cast<size_t>(block);
  HostTier tier(engine, 2 * block, sink);
  save(tier, {1, 2}, {0, 1});
  ASSERT_EQ(sink->received.size(), 2u);
  EXPECT_EQ(sink->received[0].first, 1u);
  // The offered bytes are the block's host copy: load them back through another tier's layout.
  HostBuffer copy(engine->host_allocator(), static_cast<size_t>(block));
  std::copy(sink->received[1].second.begin(), sink->received[1].second.end(), copy.data());
  ASSERT_EQ(engine->wait(engine->submit(CopyDirection::HOST_TO_POOL, {BlockCopy{7, copy.data()}})), TransferState::DONE);
  EXPECT_TRUE(pool.holds(7, 2));

  save(tier, {3}, {2});  // both buffers pinned by the sink: nothing to evict
  EXPECT_FALSE(tier.contains(3));
  sink->release_all();
  tier.check_invariants();
  save(tier, {3}, {2});
  EXPECT_TRUE(tier.contains(3));

  sink->release_all();
  sink->accept = false;  // a refused offer unpins at once: both buffers stay evictable
  save(tier, {4}, {3});
  save(tier, {5}, {4});
  EXPECT_TRUE(tier.contains(4));
  EXPECT_TRUE(tier.contains(5));
  tier.check_invariants();
}

}  // namespace
}  // namespace rtpllm

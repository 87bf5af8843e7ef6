#include <gtest/gtest.h>

#include <stdexcept>
#include <vector>

#include "rtpllm/cache/block_pool.h"
#include "rtpllm/cache/kv_event_log.h"

namespace rtpllm {
namespace {

std::vector<KVEvent> drained(KVEventLog& log, bool* overflowed = nullptr) {
  std::vector<KVEvent> out;
  const bool lost = log.drain(out);
  if (overflowed != nullptr) *overflowed = lost;
  return out;
}

TEST(KVEventLog, PoolRecordsStoresAndEvictionsInOrder) {
  KVEventLog log(16);
  BlockPool pool(2);
  pool.set_event_log(&log);
  std::vector<BlockId> blocks;
  pool.allocate(2, blocks);
  EXPECT_TRUE(pool.cache(blocks[0], 111));
  EXPECT_TRUE(pool.cache(blocks[0], 111));  // already registered: no second event
  EXPECT_TRUE(pool.cache(blocks[1], 222));
  pool.release(blocks);
  std::vector<BlockId> again;
  pool.allocate(1, again);  // evicts the least recently freed cached block
  const auto events = drained(log);
  ASSERT_EQ(events.size(), 3u);
  EXPECT_EQ(events[0].kind, KVEventKind::kStored);
  EXPECT_EQ(events[0].hash, 111u);
  EXPECT_EQ(events[1].hash, 222u);
  EXPECT_EQ(events[2].kind, KVEventKind::kRemoved);
  EXPECT_EQ(events[2].tier, KVTier::kDevice);
  EXPECT_EQ(pool.lookup(events[2].hash), std::nullopt);
  EXPECT_TRUE(drained(log).empty());
  // The snapshot holds exactly what is still cached.
  EXPECT_EQ(pool.cached_hashes(), (std::vector<BlockHash>{events[2].hash == 111u ? 222u : 111u}));
}

TEST(KVEventLog, OverflowDropsEverythingUntilDrained) {
  KVEventLog log(2);
  log.record(KVEventKind::kStored, KVTier::kDevice, 1);
  log.record(KVEventKind::kStored, KVTier::kHost, 2);
  log.record(KVEventKind::kStored, KVTier::kDevice, 3);  // one too many
  log.record(KVEventKind::kRemoved, KVTier::kDevice, 1);
  bool overflowed = false;
  EXPECT_TRUE(drained(log, &overflowed).empty());
  EXPECT_TRUE(overflowed);
  log.record(KVEventKind::kStored, KVTier::kDisk, 4);  // recording resumes after the drain
  const auto events = drained(log, &overflowed);
  EXPECT_FALSE(overflowed);
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].tier, KVTier::kDisk);
  EXPECT_THROW(KVEventLog(0), std::invalid_argument);
}

}  // namespace
}  // namespace rtpllm

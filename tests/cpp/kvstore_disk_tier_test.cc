#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <random>
#include <thread>
#include <fstream>
#include <stdexcept>
#include <vector>

#include "kvstore_fixture.h"
#include "rtpllm/kvstore/disk_block_file.h"
#include "rtpllm/kvstore/disk_tier.h"
#include "rtpllm/kvstore/host_tier.h"

namespace rtpllm {
namespace {

namespace fs = std::filesystem;
using testing::FakeKVPool;
using testing::poll_until_done;
using testing::TempDir;
using testing::WarningLog;

constexpr uint64_t kIdentity = 0xC0FFEE;

struct DiskTierTest : ::testing::Test {
  FakeKVPool pool{3, 16, 5, 3, 7, 2};  // 210-byte segments, 1260-byte blocks (not page multiples)
  std::shared_ptr<CpuKVCopyEngine> engine = pool.make_engine();
  TempDir dir;
  WarningLog warnings;

  std::unique_ptr<DiskTier> open(int64_t capacity_blocks = 64, uint64_t identity = kIdentity) {
    DiskTierOptions options;
    options.directory = dir.path();
    options.capacity_bytes = capacity_blocks * static_cast<int64_t>(disk_block_file_bytes(pool.layout().bytes_per_block()));
    options.cache_identity = identity;
    options.load_chunk_blocks = 3;
    return std::make_unique<DiskTier>(engine, options, warnings.logger());
  }
  void save(DiskTier& tier, const std::vector<BlockHash>& hashes, const std::vector<BlockId>& blocks) {
    for (size_t i = 0; i < hashes.size(); ++i) pool.fill(blocks[i], hashes[i]);
    ASSERT_EQ(poll_until_done(tier, tier.save(hashes, blocks)), TransferState::DONE);
    tier.flush();
    tier.check_invariants();
  }
  std::string path(BlockHash hash) const { return dir.path() + "/" + block_file_name(hash); }
};

TEST_F(DiskTierTest, RoundTripInChunks) {
  auto tier = open();
  const std::vector<BlockHash> hashes = {21, 22, 23, 24, 25, 26, 27};  // 3 chunks of <= 3 blocks
  save(*tier, hashes, {0, 1, 2, 3, 4, 5, 6});
  EXPECT_EQ(tier->match({21, 22, 23, 24, 25, 26, 27, 28}), 7);
  EXPECT_TRUE(fs::exists(path(21)));
  EXPECT_EQ(fs::file_size(path(21)), static_cast<uintmax_t>(tier->file_bytes_per_block()));
  EXPECT_EQ(tier->file_bytes_per_block() % 4096, 0);

  const std::vector<BlockId> targets = {15, 8, 9, 10, 11, 12, 13};
  ASSERT_EQ(poll_until_done(*tier, tier->load(hashes, targets)), TransferState::DONE);
  for (size_t i = 0; i < hashes.size(); ++i) EXPECT_TRUE(pool.holds(targets[i], hashes[i])) << i;
  EXPECT_TRUE(pool.padding_intact());
  const KVTierStats stats = tier->stats()[0];
  EXPECT_EQ(stats.name, "disk");
  EXPECT_EQ(stats.saved_blocks, 7u);
  EXPECT_EQ(stats.loaded_blocks, 7u);
  EXPECT_EQ(stats.used_blocks, 7u);
  EXPECT_EQ(stats.capacity_blocks, 64u);
  EXPECT_TRUE(stats.enabled);
  EXPECT_EQ(warnings.count(), 0u);
}

TEST_F(DiskTierTest, RestartRebuildsTheIndex) {
  {
    auto tier = open();
    save(*tier, {1, 2, 3}, {0, 1, 2});
  }
  auto tier = open();
  EXPECT_EQ(tier->match({1, 2, 3}), 3);
  EXPECT_EQ(tier->stats()[0].used_blocks, 3u);
  ASSERT_EQ(poll_until_done(*tier, tier->load({1, 2, 3}, {7, 8, 9})), TransferState::DONE);
  EXPECT_TRUE(pool.holds(7, 1) && pool.holds(8, 2) && pool.holds(9, 3));
  EXPECT_EQ(warnings.count(), 0u);
}

TEST_F(DiskTierTest, CorruptBlockFailsTheLoadWithOneWarning) {
  auto tier = open();
  save(*tier, {1, 2}, {0, 1});
  {
    std::fstream file(path(2), std::ios::in | std::ios::out | std::ios::binary);
    file.seekp(4096 + 100);
    file.put('\x5A');
  }
  pool.fill(9, 12345);
  EXPECT_EQ(tier->match({1, 2}), 2);  // found only by reading the payload
  EXPECT_EQ(poll_until_done(*tier, tier->load({1, 2}, {8, 9})), TransferState::FAILED);
  EXPECT_TRUE(pool.holds(9, 12345));  // the bad copy never reached the pool
  EXPECT_EQ(warnings.count(), 1u);
  EXPECT_NE(warnings.lines[0].find("checksum"), std::string::npos) << warnings.lines[0];
  EXPECT_EQ(tier->match({1, 2}), 1);  // dropped, and deleted
  EXPECT_FALSE(fs::exists(path(2)));
  EXPECT_EQ(tier->stats()[0].failed_loads, 1u);
  EXPECT_EQ(tier->take_warnings(), warnings.lines);
  EXPECT_TRUE(tier->take_warnings().empty());
  tier->check_invariants();
}

TEST_F(DiskTierTest, TruncatedFilesAreMisses) {
  {
    auto tier = open();
    save(*tier, {1, 2, 3}, {0, 1, 2});
  }
  fs::resize_file(path(2), 4096 + 100);  // torn write, seen at the scan
  auto tier = open();
  EXPECT_EQ(tier->match({1, 2, 3}), 1);
  EXPECT_EQ(warnings.count(), 1u);
  EXPECT_FALSE(fs::exists(path(2)));
  fs::resize_file(path(3), 3000);  // truncated behind a running tier's back
  EXPECT_EQ(poll_until_done(*tier, tier->load({3}, {5})), TransferState::FAILED);
  EXPECT_EQ(warnings.count(), 2u);
  EXPECT_FALSE(tier->contains(3));
  tier->check_invariants();
}

TEST_F(DiskTierTest, ForeignIdentityIsIgnoredNotDeleted) {
  {
    auto tier = open();
    save(*tier, {1, 2}, {0, 1});
  }
  auto other = open(64, kIdentity + 1);
  EXPECT_EQ(other->match({1, 2}), 0);
  EXPECT_EQ(warnings.count(), 1u);  // one summary line for all foreign files
  EXPECT_NE(warnings.lines[0].find("another cache identity"), std::string::npos);
  EXPECT_TRUE(fs::exists(path(1)));
  // A file of another identity under a name the index holds: a failed load, the file kept.
  save(*other, {7}, {3});
  auto tier = open();
  fs::copy_file(path(7), path(2), fs::copy_options::overwrite_existing);
  EXPECT_EQ(poll_until_done(*tier, tier->load({2}, {5})), TransferState::FAILED);
  EXPECT_NE(warnings.lines.back().find("another cache identity"), std::string::npos) << warnings.lines.back();
  EXPECT_TRUE(fs::exists(path(2)));
  EXPECT_FALSE(tier->contains(2));
}

TEST_F(DiskTierTest, CapacityEvictsLeastRecentlyUsedFiles) {
  auto tier = open(3);
  // One at a time: the writer threads of one save() may finish its blocks in any order, and a
  // block's recency starts when its file is written.
  save(*tier, {1}, {0});
  save(*tier, {2}, {1});
  save(*tier, {3}, {2});
  ASSERT_EQ(poll_until_done(*tier, tier->load({1}, {9})), TransferState::DONE);  // 1 most recent
  save(*tier, {4}, {3});
  EXPECT_TRUE(tier->contains(1));
  EXPECT_FALSE(tier->contains(2));
  EXPECT_FALSE(fs::exists(path(2)));
  EXPECT_TRUE(tier->contains(4));
  EXPECT_EQ(tier->stats()[0].evicted_blocks, 1u);
  EXPECT_LE(tier->used_bytes(), 3 * tier->file_bytes_per_block());
  tier->check_invariants();
}

TEST_F(DiskTierTest, RecordsWrittenAndEvictedBlocksUnderItsTier) {
  { save(*open(2), {1}, {0}); }
  auto tier = open(2);  // a restart finds block 1 on disk
  KVEventLog log(16);
  tier->set_event_log(&log);
  std::vector<KVEvent> held;
  tier->held_blocks(held);
  ASSERT_EQ(held.size(), 1u);
  EXPECT_EQ(held[0].hash, 1u);
  EXPECT_EQ(held[0].tier, KVTier::kDisk);
  save(*tier, {2}, {1});
  save(*tier, {3}, {2});  // capacity 2: evicts 1
  std::vector<KVEvent> events;
  ASSERT_FALSE(log.drain(events));
  ASSERT_EQ(events.size(), 3u);
  EXPECT_EQ(events[0].hash, 2u);
  EXPECT_EQ(events[0].kind, KVEventKind::kStored);
  EXPECT_EQ(events[1].hash, 1u);
  EXPECT_EQ(events[1].kind, KVEventKind::kRemoved);
  EXPECT_EQ(events[2].hash, 3u);
  EXPECT_EQ(events[2].kind, KVEventKind::kStored);
  for (const KVEvent& e : events) EXPECT_EQ(e.tier, KVTier::kDisk);
  tier->set_event_log(nullptr);
}

TEST_F(DiskTierTest, CapacityBelowOneBlockStopsWritesButServing) {
  DiskTierOptions options;
  options.directory = dir.path();
  options.capacity_bytes = 4096;  // less than one block file
  options.cache_identity = kIdentity;
  DiskTier tier(engine, options, warnings.logger());
  EXPECT_FALSE(tier.stats()[0].enabled);
  EXPECT_EQ(warnings.count(), 1u);
  save(tier, {1}, {0});  // DONE, nothing stored
  EXPECT_EQ(tier.match({1}), 0);
  EXPECT_FALSE(tier.offer(2, pool.segment(0, 0, 0), [] {}));
}

TEST_F(DiskTierTest, WriteFailureStopsWritesAndKeepsServing) {
  auto tier = open();
  save(*tier, {1}, {0});
  // The directory vanishes (a failed or unmounted disk): the next write fails.
  const std::string moved = dir.path() + ".moved";
  fs::rename(dir.path(), moved);
  save(*tier, {2}, {1});
  EXPECT_FALSE(tier->stats()[0].enabled);
  EXPECT_EQ(warnings.count(), 1u);
  EXPECT_NE(warnings.lines[0].find("writes stopped"), std::string::npos);
  fs::rename(moved, dir.path());
  EXPECT_EQ(tier->match({1, 2}), 1);  // reads go on
  ASSERT_EQ(poll_until_done(*tier, tier->load({1}, {9})), TransferState::DONE);
  EXPECT_TRUE(pool.holds(9, 1));
  save(*tier, {3}, {2});  // stopped for good
  EXPECT_FALSE(tier->contains(3));
  tier->check_invariants();
}

TEST_F(DiskTierTest, BadOptionsAndArgumentsThrow) {
  DiskTierOptions options;
  options.capacity_bytes = 1 << 20;
  EXPECT_THROW(DiskTier(engine, options), std::invalid_argument);  // no directory
  options.directory = dir.path();
  options.writer_threads = 0;
  EXPECT_THROW(DiskTier(engine, options), std::invalid_argument);
  auto tier = open();
  EXPECT_THROW(tier->load({1, 2}, {0}), std::invalid_argument);
  EXPECT_THROW(tier->save({1}, {16}), std::invalid_argument);
  EXPECT_THROW(tier->poll(77), std::invalid_argument);
  EXPECT_EQ(poll_until_done(*tier, tier->load({5}, {0})), TransferState::FAILED);  // not held
}

TEST_F(DiskTierTest, HostTierWritesThroughToDisk) {
  std::shared_ptr<DiskTier> disk = open();
  HostTier host(engine, 2 * pool.layout().bytes_per_block(), disk);
  for (BlockHash h = 1; h <= 5; ++h) {
    pool.fill(static_cast<BlockId>(h), h);
    ASSERT_EQ(poll_until_done(host, host.save({h}, {static_cast<BlockId>(h)})), TransferState::DONE);
    disk->flush();
  }
  EXPECT_EQ(disk->match({1, 2, 3, 4, 5}), 5);  // every saved block, not only the evicted ones
  EXPECT_EQ(host.match({4, 5}), 2);
  ASSERT_EQ(poll_until_done(*disk, disk->load({1, 5}, {10, 11})), TransferState::DONE);
  EXPECT_TRUE(pool.holds(10, 1) && pool.holds(11, 5));
  host.check_invariants();
}

// Writer threads fed by several offering threads while the test thread loads and a small capacity
// keeps evicting: every accepted offer is released exactly once, every DONE load has the right
// bytes, and index, LRU list and byte count agree throughout.
TEST_F(DiskTierTest, ConcurrentOffersLoadsAndEvictions) {
  auto tier = open(6);
  const size_t block = static_cast<size_t>(pool.layout().bytes_per_block());
  // Host copies of blocks 1..24, made by saving pool contents through the engine.
  std::vector<HostBuffer> host;
  for (BlockHash h = 1; h <= 24; ++h) {
    host.emplace_back(engine->host_allocator(), block);
    pool.fill(0, h);
    ASSERT_EQ(engine->wait(engine->submit(CopyDirection::POOL_TO_HOST, {BlockCopy{0, host.back().data()}})), TransferState::DONE);
  }
  std::atomic<int> accepted{0};
  std::atomic<int> released{0};
  std::atomic<bool> stop{false};
  std::vector<std::thread> producers;
  for (int t = 0; t < 3; ++t) {
    producers.emplace_back([&, t] {
      std::mt19937 rng(static_cast<uint32_t>(t));
      while (!stop.load()) {
        const BlockHash h = 1 + rng() % 24;
        if (tier->offer(h, host[h - 1].data(), [&] { released.fetch_add(1); })) accepted.fetch_add(1);
        std::this_thread::yield();
      }
    });
  }
  std::mt19937 rng(99);
  int loads_done = 0;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  for (int round = 0; (round < 150 || accepted.load() < 60 || loads_done < 20) && std::chrono::steady_clock::now() < deadline;
       ++round) {
    std::vector<BlockHash> hashes;
    for (BlockHash h = 1 + rng() % 24; hashes.size() < 3 && h <= 24; ++h) hashes.push_back(h);
    const int32_t hits = tier->match(hashes);
    if (hits > 0) {
      hashes.resize(static_cast<size_t>(hits));
      std::vector<BlockId> targets;
      for (int32_t i = 0; i < hits; ++i) targets.push_back(8 + i);
      if (poll_until_done(*tier, tier->load(hashes, targets)) == TransferState::DONE) {
        ++loads_done;
        for (int32_t i = 0; i < hits; ++i) ASSERT_TRUE(pool.holds(targets[i], hashes[i])) << "round " << round;
      }
    }
    tier->check_invariants();
  }
  stop = true;
  for (auto& producer : producers) producer.join();
  tier->flush();
  tier->check_invariants();
  EXPECT_EQ(released.load(), accepted.load());
  EXPECT_GT(loads_done, 10);
  EXPECT_LE(tier->used_bytes(), 6 * tier->file_bytes_per_block());
  EXPECT_GT(tier->stats()[0].evicted_blocks, 0u);
  EXPECT_EQ(warnings.count(), 0u);
}

TEST_F(DiskTierTest, ManyLoadsAtOnceShareTheStagingBuffersAndMeasureTheReads) {
  DiskTierOptions options;
  options.directory = dir.path();
  options.capacity_bytes = 64 * static_cast<int64_t>(disk_block_file_bytes(pool.layout().bytes_per_block()));
  options.cache_identity = kIdentity;
  options.reader_threads = 2;  // 2 x 2 x 1 staging buffers for 12 blocks in flight
  options.load_chunk_blocks = 1;
  DiskTier tier(engine, options, warnings.logger());
  std::vector<BlockHash> hashes;
  std::vector<BlockId> blocks;
  for (BlockId b = 0; b < 12; ++b) {
    hashes.push_back(static_cast<BlockHash>(100 + b));
    blocks.push_back(b);
  }
  save(tier, hashes, blocks);
  EXPECT_EQ(tier.expected_load_seconds(4), 0);  // nothing read yet: no estimate
  for (BlockId b : blocks) pool.fill(b, 999);    // the loads must bring the bytes back
  std::vector<TransferHandle> loads;
  for (size_t first = 0; first < 12; first += 3) {
    loads.push_back(tier.load({hashes.begin() + first, hashes.begin() + first + 3}, {blocks.begin() + first, blocks.begin() + first + 3}));
  }
  for (TransferHandle load : loads) EXPECT_EQ(poll_until_done(tier, load), TransferState::DONE);
  for (BlockId b : blocks) EXPECT_TRUE(pool.holds(b, hashes[static_cast<size_t>(b)])) << b;
  EXPECT_TRUE(pool.padding_intact());
  const double one = tier.expected_load_seconds(1);
  EXPECT_GT(one, 0);
  EXPECT_NEAR(tier.expected_load_seconds(8), 8 * one, 1e-12);  // nothing queued: linear in the blocks
  EXPECT_EQ(tier.stats()[0].loaded_blocks, 12u);
  tier.check_invariants();
  EXPECT_EQ(warnings.count(), 0u);
}

TEST(DiskBlockFile, NamesRoundTrip) {
  BlockHash hash = 0;
  EXPECT_TRUE(parse_block_file_name(block_file_name(0xDEADBEEF01234567ULL), &hash));
  EXPECT_EQ(hash, 0xDEADBEEF01234567ULL);
  EXPECT_FALSE(parse_block_file_name("deadbeef01234567.kvb.tmp", &hash));
  EXPECT_FALSE(parse_block_file_name("DEADBEEF01234567.kvb", &hash));
  EXPECT_FALSE(parse_block_file_name("notes.txt", &hash));
  EXPECT_EQ(disk_block_file_bytes(1), 8192u);
  EXPECT_EQ(disk_block_file_bytes(4096), 8192u);
  EXPECT_EQ(disk_block_file_bytes(4097), 12288u);
}

}  // namespace
}  // namespace rtpllm

#include <gtest/gtest.h>

#include <condition_variable>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <stdexcept>
#include <vector>

#include "kvstore_fixture.h"
#include "rtpllm/kvstore/disk_block_file.h"
#include "rtpllm/kvstore/disk_tier.h"
#include "rtpllm/kvstore/host_tier.h"
#include "rtpllm/kvstore/tiered_connector.h"

namespace rtpllm {
namespace {

using testing::FakeKVPool;
using testing::poll_until_done;
using testing::TempDir;
using testing::WarningLog;

// A tier whose loads never finish until cancelled: a stuck disk.
struct StuckTier : KVStoreTier {
  std::set<BlockHash> held;
  std::map<TransferHandle, bool> cancelled;
  TransferHandle next = 1;
  std::string name() const override { return "stuck"; }
  int32_t match(const std::vector<BlockHash>&) override { return 0; }
  TransferHandle load(const std::vector<BlockHash>&, const std::vector<BlockId>&) override {
    cancelled[next] = false;
    return next++;
  }
  TransferHandle save(const std::vector<BlockHash>&, const std::vector<BlockId>&) override {
    cancelled[next] = true;  // finishes at the first poll
    return next++;
  }
  TransferState poll(TransferHandle handle) override {
    if (!cancelled.at(handle)) return TransferState::PENDING;
    cancelled.erase(handle);
    return TransferState::FAILED;
  }
  std::vector<KVTierStats> stats() override { return {KVTierStats{}}; }
  bool contains(BlockHash hash) override { return held.count(hash) != 0; }
  void cancel(TransferHandle handle) override { cancelled.at(handle) = true; }
};

// Holds blocks, and says each one takes `seconds_per_block` to load: a disk of a given speed.
struct SlowTier : StuckTier {
  double seconds_per_block = 0;
  double expected_load_seconds(int32_t num_blocks) override { return seconds_per_block * num_blocks; }
};

// A copy engine whose loads (host -> pool) wait at a gate until the test opens it: a slow device.
struct GatedEngine : KVCopyEngine {
  std::shared_ptr<CpuKVCopyEngine> inner;
  std::mutex mutex;
  std::condition_variable cv;
  bool open = false;
  int waiting = 0;
  explicit GatedEngine(std::shared_ptr<CpuKVCopyEngine> engine) : inner(std::move(engine)) {}
  std::string name() const override { return "gated"; }
  const KVLayout& layout() const override { return inner->layout(); }
  std::shared_ptr<HostAllocator> host_allocator() const override { return inner->host_allocator(); }
  CopyTicket submit(CopyDirection direction, const std::vector<BlockCopy>& copies) override {
    if (direction == CopyDirection::HOST_TO_POOL) {
      std::unique_lock<std::mutex> lock(mutex);
      ++waiting;
      cv.notify_all();
      cv.wait(lock, [&] { return open; });
    }
    return inner->submit(direction, copies);
  }
  TransferState query(CopyTicket ticket) override { return inner->query(ticket); }
  TransferState wait(CopyTicket ticket) override { return inner->wait(ticket); }
  void wait_for_waiter() {
    std::unique_lock<std::mutex> lock(mutex);
    cv.wait(lock, [&] { return waiting > 0; });
  }
  void release() {
    std::lock_guard<std::mutex> lock(mutex);
    open = true;
    cv.notify_all();
  }
};

struct TieredTest : ::testing::Test {
  FakeKVPool pool{2, 32, 4, 2, 6, 2};
  std::shared_ptr<CpuKVCopyEngine> engine = pool.make_engine();
  TempDir dir;
  WarningLog warnings;
  int64_t block = pool.layout().bytes_per_block();

  std::shared_ptr<DiskTier> make_disk(int64_t capacity_blocks) {
    DiskTierOptions options;
    options.directory = dir.path();
    options.capacity_bytes = capacity_blocks * static_cast<int64_t>(disk_block_file_bytes(block));
    options.cache_identity = 42;
    options.load_chunk_blocks = 2;
    return std::make_shared<DiskTier>(engine, options, warnings.logger());
  }
};

TEST_F(TieredTest, ChainsHostThenDisk) {
  auto disk = make_disk(64);
  auto host = std::make_shared<HostTier>(engine, 2 * block, disk);
  TieredKVConnector tiers({host, disk}, 5.0);
  for (BlockHash h = 1; h <= 4; ++h) {
    pool.fill(static_cast<BlockId>(h), h);
    ASSERT_EQ(poll_until_done(tiers, tiers.save({h}, {static_cast<BlockId>(h)})), TransferState::DONE);
    disk->flush();
  }
  EXPECT_FALSE(host->contains(1));  // evicted from the host, still on disk
  EXPECT_TRUE(host->contains(4));
  EXPECT_EQ(tiers.match({1, 2, 3, 4, 5}), 4);
  EXPECT_EQ(tiers.match({3, 99, 1}), 1);

  const std::vector<BlockId> targets = {20, 21, 22, 23};
  ASSERT_EQ(poll_until_done(tiers, tiers.load({1, 2, 3, 4}, targets)), TransferState::DONE);
  for (BlockHash h = 1; h <= 4; ++h) EXPECT_TRUE(pool.holds(targets[h - 1], h)) << h;

  const std::vector<KVTierStats> stats = tiers.stats();
  ASSERT_EQ(stats.size(), 2u);
  EXPECT_EQ(stats[0].name, "host");
  EXPECT_EQ(stats[1].name, "disk");
  EXPECT_EQ(stats[0].queries, 2u);
  EXPECT_EQ(stats[0].hit_blocks, 3u);  // 3, 4 of the first query; 3 of the second
  EXPECT_EQ(stats[1].hit_blocks, 2u);  // 1, 2
  EXPECT_EQ(stats[0].loaded_blocks, 2u);
  EXPECT_EQ(stats[1].loaded_blocks, 2u);
  EXPECT_EQ(stats[0].saved_blocks, 4u);
  EXPECT_EQ(stats[1].saved_blocks, 4u);
  EXPECT_EQ(tiers.num_pending(), 0u);
}

TEST_F(TieredTest, LoadOfABlockNoTierHoldsFails) {
  auto disk = make_disk(8);
  auto host = std::make_shared<HostTier>(engine, 4 * block, disk);
  TieredKVConnector tiers({host, disk}, 5.0);
  EXPECT_EQ(poll_until_done(tiers, tiers.load({1}, {0})), TransferState::FAILED);
  EXPECT_EQ(tiers.stats()[0].failed_loads, 1u);
  EXPECT_THROW(tiers.load({1, 2}, {0}), std::invalid_argument);
  EXPECT_THROW(tiers.poll(12345), std::invalid_argument);
  EXPECT_THROW(TieredKVConnector({}, 1.0), std::invalid_argument);
  EXPECT_THROW(TieredKVConnector({host}, 0.0), std::invalid_argument);
}

TEST_F(TieredTest, LoadPastItsDeadlineIsCancelledAndFails) {
  auto host = std::make_shared<HostTier>(engine, 4 * block);
  auto stuck = std::make_shared<StuckTier>();
  stuck->held = {2};
  TieredKVConnector tiers({host, stuck}, 0.05);
  pool.fill(0, 1);
  ASSERT_EQ(poll_until_done(tiers, tiers.save({1}, {0})), TransferState::DONE);
  const TransferHandle handle = tiers.load({1, 2}, {10, 11});
  EXPECT_EQ(tiers.poll(handle), TransferState::PENDING);
  std::this_thread::sleep_for(std::chrono::milliseconds(80));
  EXPECT_EQ(poll_until_done(tiers, handle), TransferState::FAILED);
  EXPECT_TRUE(pool.holds(10, 1));  // the host part arrived; the load as a whole failed
  const auto stats = tiers.stats();
  EXPECT_EQ(stats[1].timed_out_loads, 1u);
  EXPECT_EQ(tiers.num_pending(), 0u);
}

TEST_F(TieredTest, KnownRecomputeCostShortensTheLoadDeadline) {
  auto stuck = std::make_shared<StuckTier>();
  stuck->held = {1, 2};
  TieredKVConnector tiers({stuck}, 60.0);  // the configured deadline alone would wait a minute
  tiers.set_recompute_seconds_per_block(0.001);  // budget: 0.5 s + 4 x 2 x 1 ms
  const auto start = std::chrono::steady_clock::now();
  const TransferHandle handle = tiers.load({1, 2}, {3, 4});
  TransferState state = TransferState::PENDING;
  while (state == TransferState::PENDING && std::chrono::steady_clock::now() - start < std::chrono::seconds(5)) {
    state = tiers.poll(handle);
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_EQ(state, TransferState::FAILED);
  EXPECT_GE(waited, TieredKVConnector::kMinLoadBudgetSeconds);
  EXPECT_LT(waited, 2.0);
  EXPECT_EQ(tiers.stats()[0].timed_out_loads, 1u);
}

// A real disk tier behind a stuck device: a load queued behind it is cancelled at its deadline
// and never touches its GPU blocks; the one in progress finishes its chunk, then fails.
TEST_F(TieredTest, DiskLoadsPastTheirDeadlineNeverWriteTheirBlocks) {
  auto gated = std::make_shared<GatedEngine>(engine);
  DiskTierOptions options;
  options.directory = dir.path();
  options.capacity_bytes = 64 * static_cast<int64_t>(disk_block_file_bytes(block));
  options.cache_identity = 42;
  options.reader_threads = 1;
  options.load_chunk_blocks = 1;
  auto disk = std::make_shared<DiskTier>(gated, options, warnings.logger());
  TieredKVConnector tiers({disk}, 0.02);
  for (BlockHash h = 1; h <= 4; ++h) pool.fill(static_cast<BlockId>(h), h);
  ASSERT_EQ(poll_until_done(tiers, tiers.save({1, 2, 3, 4}, {1, 2, 3, 4})), TransferState::DONE);
  disk->flush();
  for (BlockId b = 10; b < 14; ++b) pool.fill(b, 777);

  const TransferHandle first = tiers.load({1, 2}, {10, 11});   // the reader blocks in its first copy
  const TransferHandle second = tiers.load({3, 4}, {12, 13});  // queued behind it
  gated->wait_for_waiter();
  std::this_thread::sleep_for(std::chrono::milliseconds(40));
  EXPECT_EQ(tiers.poll(second), TransferState::PENDING);  // past the deadline: cancelled now
  EXPECT_EQ(tiers.poll(first), TransferState::PENDING);   // cancelled, its copy still in flight
  gated->release();
  EXPECT_EQ(poll_until_done(tiers, first), TransferState::FAILED);
  EXPECT_EQ(poll_until_done(tiers, second), TransferState::FAILED);
  EXPECT_TRUE(pool.holds(10, 1));    // the chunk in flight landed
  EXPECT_TRUE(pool.holds(11, 777));  // the rest of the cancelled load did not
  EXPECT_TRUE(pool.holds(12, 777) && pool.holds(13, 777));
  const KVTierStats stats = tiers.stats()[0];
  EXPECT_EQ(stats.timed_out_loads, 2u);
  EXPECT_EQ(stats.failed_loads, 2u);
  EXPECT_EQ(tiers.match({1, 2, 3, 4}), 4);  // a timeout is not a broken file
  disk->check_invariants();
}

// Random saves and loads through host (small) and disk (small) tiers, as a scheduler would issue
// them: pool blocks named by a pending transfer are left alone until it finishes. Every DONE load
// must have put the right bytes in place; the tiers' invariants hold throughout.
TEST_F(TieredTest, RandomTrafficKeepsInvariantsAndNeverGivesWrongBytes) {
  auto disk = make_disk(12);
  auto host = std::make_shared<HostTier>(engine, 5 * block, disk);
  TieredKVConnector tiers({host, disk}, 5.0);
  std::mt19937 rng(7);
  struct Pending {
    bool is_load;
    std::vector<BlockHash> hashes;
    std::vector<BlockId> blocks;
  };
  std::map<TransferHandle, Pending> pending;
  std::set<BlockId> busy;
  auto free_blocks = [&](size_t count) {
    std::vector<BlockId> out;
    for (BlockId b = 0; b < pool.layout().num_blocks && out.size() < count; ++b) {
      if (!busy.count(b)) out.push_back(b);
    }
    return out;
  };
  size_t loads_done = 0;
  for (int step = 0; step < 400; ++step) {
    const int op = static_cast<int>(rng() % 3);
    const size_t count = 1 + rng() % 4;
    std::vector<BlockHash> hashes;
    const BlockHash first = 1 + rng() % 30;
    for (size_t i = 0; i < count; ++i) hashes.push_back(first + i);
    std::vector<BlockId> blocks = free_blocks(count);
    if (blocks.size() == count && op == 0) {
      for (size_t i = 0; i < count; ++i) pool.fill(blocks[i], hashes[i]);
      pending[tiers.save(hashes, blocks)] = Pending{false, hashes, blocks};
      busy.insert(blocks.begin(), blocks.end());
    } else if (blocks.size() == count && op == 1) {
      const int32_t hits = tiers.match(hashes);
      if (hits > 0) {
        hashes.resize(static_cast<size_t>(hits));
        blocks.resize(static_cast<size_t>(hits));
        pending[tiers.load(hashes, blocks)] = Pending{true, hashes, blocks};
        busy.insert(blocks.begin(), blocks.end());
      }
    }
    for (auto it = pending.begin(); it != pending.end();) {
      const TransferState state = tiers.poll(it->first);
      if (state == TransferState::PENDING) {
        ++it;
        continue;
      }
      if (it->second.is_load && state == TransferState::DONE) {
        ++loads_done;
        for (size_t i = 0; i < it->second.hashes.size(); ++i) {
          ASSERT_TRUE(pool.holds(it->second.blocks[i], it->second.hashes[i])) << "step " << step;
        }
      }
      ASSERT_TRUE(state == TransferState::DONE || it->second.is_load) << "a save failed";
      for (BlockId b : it->second.blocks) busy.erase(b);
      it = pending.erase(it);
    }
    host->check_invariants();
    disk->check_invariants();
    if (step % 8 == 7) {  // let the background writers catch up now and then, as real steps would
      for (auto& [handle, transfer] : pending) {
        if (poll_until_done(tiers, handle) != TransferState::DONE || !transfer.is_load) continue;
        ++loads_done;
        for (size_t i = 0; i < transfer.hashes.size(); ++i) ASSERT_TRUE(pool.holds(transfer.blocks[i], transfer.hashes[i]));
      }
      pending.clear();
      busy.clear();
      disk->flush();
    }
  }
  for (auto& [handle, transfer] : pending) poll_until_done(tiers, handle);
  disk->flush();
  host->check_invariants();
  disk->check_invariants();
  EXPECT_GT(loads_done, 20u);
  const auto stats = tiers.stats();
  EXPECT_LE(stats[0].used_blocks, 5u);
  EXPECT_LE(stats[1].used_blocks, 12u);
  EXPECT_GT(stats[1].loaded_blocks, 0u);
  EXPECT_GT(stats[1].evicted_blocks, 0u);
  EXPECT_EQ(warnings.count(), 0u);
}

TEST_F(TieredTest, MatchLeavesOutATierSlowerThanRecomputing) {
  auto host = std::make_shared<HostTier>(engine, 8 * block);
  auto slow = std::make_shared<SlowTier>();
  slow->held = {3, 4, 5};
  slow->seconds_per_block = 0.010;
  TieredKVConnector tiers({host, slow}, 5.0);
  pool.fill(1, 1);
  pool.fill(2, 2);
  ASSERT_EQ(poll_until_done(tiers, tiers.save({1, 2}, {1, 2})), TransferState::DONE);
  const std::vector<BlockHash> chain = {1, 2, 3, 4, 5, 6};
  EXPECT_EQ(tiers.match(chain), 5);  // recomputing's cost unknown: every tier counts
  tiers.set_recompute_seconds_per_block(0.020);
  EXPECT_EQ(tiers.match(chain), 5);  // the slow tier still beats recomputing
  tiers.set_recompute_seconds_per_block(0.005);
  EXPECT_EQ(tiers.match(chain), 2);  // it does not: the run ends where its blocks begin
  EXPECT_EQ(tiers.match({3, 4}), 0);
  const std::vector<KVTierStats> stats = tiers.stats();
  EXPECT_EQ(stats[0].hit_blocks, 6u);
  EXPECT_EQ(stats[0].skipped_blocks, 0u);
  EXPECT_EQ(stats[1].hit_blocks, 6u);
  EXPECT_EQ(stats[1].skipped_blocks, 5u);
  tiers.set_recompute_seconds_per_block(0);  // unknown again
  EXPECT_EQ(tiers.match(chain), 5);
}

}  // namespace
}  // namespace rtpllm

// The scheduler with tiers below the GPU pool (a KVConnector), against the in-memory fake: tier
// hits load instead of computing, requests wait for KV without blocking others, failed or timed
// out loads recompute, and no transfer's blocks are ever freed, reused or evicted before it ends.
// The fake model checks every KV read, so a block loaded with the wrong contents fails a test.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "fake_kv_connector.h"
#include "scheduler_harness.h"

namespace rtpllm::testing {
namespace {

constexpr int32_t kBlockSize = 4;
constexpr int32_t kVocab = 97;

struct TierHarness {
  TierHarness(int32_t num_blocks, int32_t budget = 64, uint64_t root_hash = 0,
              std::shared_ptr<FakeKVConnector> shared = nullptr, double timeout_s = 30.0)
      : h({budget, 8, true, 256}, cache_options(num_blocks, root_hash), kVocab),
        tiers(shared ? shared : std::make_shared<FakeKVConnector>(&h.model)) {
    tiers->model_ = &h.model;
    h.scheduler.set_kv_connector(tiers, timeout_s);
  }
  static CacheOptions cache_options(int32_t num_blocks, uint64_t root_hash) {
    CacheOptions c{num_blocks, kBlockSize, true};
    c.root_hash = root_hash;
    return c;
  }
  // Steps until every request finished and every transfer ended.
  void drain(int max_steps = 10000) {
    for (int i = 0; i < max_steps && (h.scheduler.has_unfinished() || h.scheduler.has_pending_kv_transfers()); ++i) {
      h.step();
    }
    ASSERT_FALSE(h.scheduler.has_unfinished());
    ASSERT_FALSE(h.scheduler.has_pending_kv_transfers());
    EXPECT_EQ(h.scheduler.num_free_blocks(), h.scheduler.cache_options().num_blocks) << "blocks leaked";
    EXPECT_EQ(tiers->num_open_transfers(), 0u);
  }
  // The scheduler's view of one request this step: tokens it computes (0 when not scheduled).
  int32_t scheduled_tokens(RequestId id) const {
    for (int32_t i = 0; i < h.batch.num_seqs; ++i) {
      if (h.batch.request_ids[i] == id) return h.batch.query_start_loc[i + 1] - h.batch.query_start_loc[i];
    }
    return 0;
  }
  RequestStatus status(RequestId id) const { return h.scheduler.find(id)->status; }

  SchedulerHarness h;
  std::shared_ptr<FakeKVConnector> tiers;
};

std::vector<TokenId> prompt_of(int32_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<TokenId> t(static_cast<size_t>(n));
  for (TokenId& x : t) x = static_cast<TokenId>(rng() % kVocab);
  return t;
}

// Runs `prompt` alone to completion in a fresh scheduler that shares `tiers`, so its full blocks
// end up saved there; returns what it generated.
std::vector<TokenId> run_to_warm(const std::shared_ptr<FakeKVConnector>& tiers, const std::vector<TokenId>& prompt,
                                 int32_t max_new, uint64_t root_hash = 0) {
  TierHarness warm(64, 64, root_hash, tiers);
  warm.h.add(make_spec(1, prompt, max_new));
  warm.drain();
  return warm.h.generated.at(1);
}

TEST(SchedulerKVTier, TierHitLoadsThePrefixAndComputesOnlyTheRest) {
  auto tiers = std::make_shared<FakeKVConnector>(nullptr);
  const std::vector<TokenId> prompt = prompt_of(22, 7);  // 5 full blocks + 2 tokens
  const std::vector<TokenId> expected = run_to_warm(tiers, prompt, 6);
  ASSERT_EQ(tiers->num_stored_blocks(), 6u);  // prompt + outputs: 27 tokens known, 26 computed -> 6 full

  TierHarness t(32, 64, 0, tiers);  // a fresh GPU pool ("restart"): nothing cached on the GPU
  t.h.add(make_spec(1, prompt, 6));
  t.h.step();
  EXPECT_EQ(t.status(1), RequestStatus::WAITING_FOR_KV);
  EXPECT_EQ(t.h.batch.num_seqs, 0);
  EXPECT_EQ(t.h.scheduler.stats().num_waiting_for_kv, 1);
  t.h.step();  // the load ended: only the tokens after the 5 loaded blocks are computed
  EXPECT_EQ(t.status(1), RequestStatus::RUNNING);
  EXPECT_EQ(t.scheduled_tokens(1), 2);
  t.drain();
  EXPECT_EQ(t.h.generated.at(1), expected);
  const SchedulerStats s = t.h.scheduler.stats();
  EXPECT_EQ(s.kv_tier_hit_blocks, 5u);  // never the block holding the last prompt token
  EXPECT_EQ(s.kv_tier_failed_loads, 0u);
  EXPECT_EQ(s.prefix_hits, 0u);  // the GPU prefix cache had nothing
}

TEST(SchedulerKVTier, GpuHitFirstThenTierForTheRest) {
  auto tiers = std::make_shared<FakeKVConnector>(nullptr);
  const std::vector<TokenId> prompt = prompt_of(30, 8);
  const std::vector<TokenId> expected = run_to_warm(tiers, prompt, 4);
  TierHarness t(32, 64, 0, tiers);
  // Another request computes the first 2 blocks on this GPU, so only blocks 2.. come from the tier.
  std::vector<TokenId> head(prompt.begin(), prompt.begin() + 9);
  t.tiers->drop_all();
  t.h.add(make_spec(2, head, 1));
  t.drain();
  run_to_warm(tiers, prompt, 4);  // the tier holds the whole prompt again
  t.tiers->model_ = &t.h.model;
  t.h.add(make_spec(1, prompt, 4));
  t.h.step();
  ASSERT_EQ(t.status(1), RequestStatus::WAITING_FOR_KV);
  const Request* r = t.h.scheduler.find(1);
  EXPECT_EQ(r->num_computed_tokens, 2 * kBlockSize);  // the GPU prefix hit
  EXPECT_EQ(r->block_table.size(), 7u);                // + the 5 blocks being loaded
  t.drain();
  EXPECT_EQ(t.h.generated.at(1), expected);
  EXPECT_EQ(t.h.scheduler.stats().kv_tier_hit_blocks, 5u);
}

TEST(SchedulerKVTier, WaitingForKVBlocksNeitherTheStepLoopNorTheQueue) {
  auto tiers = std::make_shared<FakeKVConnector>(nullptr);
  const std::vector<TokenId> prompt = prompt_of(40, 9);
  const std::vector<TokenId> expected = run_to_warm(tiers, prompt, 3);
  TierHarness t(64, 64, 0, tiers);
  t.tiers->latency_polls = 5;
  t.h.add(make_spec(1, prompt, 3));
  t.h.add(make_spec(2, prompt_of(10, 99), 8));  // behind it in the queue, nothing in the tiers
  t.h.step();
  EXPECT_EQ(t.status(1), RequestStatus::WAITING_FOR_KV);
  EXPECT_EQ(t.scheduled_tokens(2), 10) << "the request behind a load must be admitted at once";
  for (int i = 0; i < 4; ++i) {
    t.h.step();
    EXPECT_EQ(t.status(1), RequestStatus::WAITING_FOR_KV);
    EXPECT_EQ(t.scheduled_tokens(2), 1);  // decoding on meanwhile
  }
  t.drain();
  EXPECT_EQ(t.h.generated.at(1), expected);
  EXPECT_EQ(t.h.generated.at(2).size(), 8u);
}

TEST(SchedulerKVTier, FailedLoadRecomputesWithTheSameTokens) {
  auto tiers = std::make_shared<FakeKVConnector>(nullptr);
  const std::vector<TokenId> prompt = prompt_of(26, 10);
  const std::vector<TokenId> expected = run_to_warm(tiers, prompt, 5);
  TierHarness t(32, 64, 0, tiers);
  t.tiers->fail_loads = true;
  t.h.add(make_spec(1, prompt, 5));
  t.h.step();
  EXPECT_EQ(t.status(1), RequestStatus::WAITING_FOR_KV);
  t.h.step();  // FAILED: back to the queue's head and admitted to compute everything
  EXPECT_EQ(t.scheduled_tokens(1), 26);
  t.drain();
  EXPECT_EQ(t.h.generated.at(1), expected);
  EXPECT_EQ(t.h.scheduler.stats().kv_tier_failed_loads, 1u);
  EXPECT_EQ(t.h.scheduler.stats().kv_tier_hit_blocks, 0u);
}

TEST(SchedulerKVTier, RefusedLoadComputesAtOnce) {
  auto tiers = std::make_shared<FakeKVConnector>(nullptr);
  const std::vector<TokenId> prompt = prompt_of(26, 11);
  const std::vector<TokenId> expected = run_to_warm(tiers, prompt, 5);
  TierHarness t(32, 64, 0, tiers);
  t.tiers->throw_on_load = true;
  t.h.add(make_spec(1, prompt, 5));
  t.h.step();
  EXPECT_EQ(t.scheduled_tokens(1), 26);
  t.drain();
  EXPECT_EQ(t.h.generated.at(1), expected);
  EXPECT_EQ(t.h.scheduler.stats().kv_tier_failed_loads, 1u);
}

TEST(SchedulerKVTier, TimedOutLoadRecomputesAndItsBlocksStayHeldUntilItEnds) {
  auto tiers = std::make_shared<FakeKVConnector>(nullptr);
  const std::vector<TokenId> prompt = prompt_of(26, 12);
  const std::vector<TokenId> expected = run_to_warm(tiers, prompt, 5);
  TierHarness t(20, 64, 0, tiers, /*timeout_s=*/0.02);
  t.tiers->hang_loads = true;
  t.h.add(make_spec(1, prompt, 5));
  t.h.step();
  ASSERT_EQ(t.status(1), RequestStatus::WAITING_FOR_KV);
  std::this_thread::sleep_for(std::chrono::milliseconds(40));
  t.h.step();  // timed out: recomputed in blocks of its own; the hung load still holds 6 blocks
  EXPECT_EQ(t.scheduled_tokens(1), 26);
  EXPECT_EQ(t.h.scheduler.stats().kv_tier_failed_loads, 1u);
  EXPECT_EQ(t.h.scheduler.stats().kv_transfer_held_blocks, 6);  // 6 loading (nothing saved yet)
  // Keep the pool busy so that a block the hung load writes into would be noticed if handed out.
  t.h.add(make_spec(2, prompt_of(17, 13), 4));
  for (int i = 0; i < 3; ++i) t.h.step();
  t.tiers->hang_loads = false;  // the load finally ends (late writes land in its own blocks)
  t.drain();
  EXPECT_EQ(t.h.generated.at(1), expected);
}

TEST(SchedulerKVTier, AbortDuringALoadKeepsItsBlocksUntilTheTransferEnds) {
  auto tiers = std::make_shared<FakeKVConnector>(nullptr);
  const std::vector<TokenId> prompt = prompt_of(30, 14);
  run_to_warm(tiers, prompt, 2);
  constexpr int32_t kBlocks = 14;
  TierHarness t(kBlocks, 64, 0, tiers);
  t.tiers->hang_loads = true;
  t.h.add(make_spec(1, prompt, 2));
  t.h.step();
  ASSERT_EQ(t.status(1), RequestStatus::WAITING_FOR_KV);
  EXPECT_TRUE(t.h.scheduler.abort(1));
  t.h.scheduler.check_invariants();
  EXPECT_EQ(t.h.scheduler.num_free_blocks(), kBlocks - 7) << "the loading blocks went back before the load ended";
  // A request that wants every free block gets them, never the loading ones.
  const std::vector<TokenId> other = prompt_of(4 * (kBlocks - 7) - 3, 15);
  t.h.add(make_spec(2, other, 3));
  t.h.step();
  t.h.step();
  t.tiers->hang_loads = false;  // the late load writes its blocks: request 2 must not read them
  t.drain();
  EXPECT_EQ(t.h.generated.at(2).size(), 3u);
  EXPECT_FALSE(t.h.finished.count(1));
}

TEST(SchedulerKVTier, SavesHoldTheirBlocksSoEvictionNeverRacesACopy) {
  auto tiers = std::make_shared<FakeKVConnector>(nullptr);
  constexpr int32_t kBlocks = 10;
  TierHarness t(kBlocks, 64, 0, tiers);
  t.tiers->latency_polls = 3;
  t.h.add(make_spec(1, prompt_of(21, 16), 1));  // 5 full blocks cached on finishing
  t.h.step();
  t.h.step();  // the save of its blocks is submitted
  EXPECT_GE(t.h.scheduler.stats().kv_transfer_held_blocks, 5);
  // A request that needs more blocks than are free must wait rather than evict a block being saved.
  t.h.add(make_spec(2, prompt_of(4 * kBlocks - 2, 17), 1));
  t.drain();
  // The saved copies are right: a fresh GPU loads them and produces the same tokens.
  const std::vector<TokenId> expected = t.h.generated.at(1);
  TierHarness fresh(32, 64, 0, tiers);
  fresh.h.add(make_spec(1, prompt_of(21, 16), 1));
  fresh.drain();
  EXPECT_EQ(fresh.h.generated.at(1), expected);
  EXPECT_EQ(fresh.h.scheduler.stats().kv_tier_hit_blocks, 5u);
}

TEST(SchedulerKVTier, TightPoolLoadsWhatFitsAndComputesTheRest) {
  auto tiers = std::make_shared<FakeKVConnector>(nullptr);
  const std::vector<TokenId> prompt = prompt_of(30, 21);
  const std::vector<TokenId> expected = run_to_warm(tiers, prompt, 3);  // 7 loadable blocks
  TierHarness t(12, 64, 0, tiers);
  t.h.add(make_spec(2, prompt_of(30, 22), 8));
  t.h.step();  // request 2 holds 8 blocks: 4 free
  t.h.add(make_spec(1, prompt, 3));
  t.h.step();
  ASSERT_EQ(t.status(1), RequestStatus::WAITING_FOR_KV);
  EXPECT_EQ(t.h.scheduler.find(1)->block_table.size(), 4u);
  t.drain();
  EXPECT_EQ(t.h.generated.at(1), expected);
  EXPECT_GE(t.h.scheduler.stats().kv_tier_hit_blocks, 4u);  // more if it was preempted and came back
}

TEST(SchedulerKVTier, AnotherRootHashNeverMatches) {
  auto tiers = std::make_shared<FakeKVConnector>(nullptr);
  const std::vector<TokenId> prompt = prompt_of(24, 18);
  run_to_warm(tiers, prompt, 2, /*root_hash=*/111);
  TierHarness other(32, 64, /*root_hash=*/222, tiers);
  other.h.add(make_spec(1, prompt, 2));
  other.drain();
  EXPECT_EQ(other.h.scheduler.stats().kv_tier_hit_blocks, 0u);
  TierHarness same(32, 64, /*root_hash=*/111, tiers);
  same.h.add(make_spec(1, prompt, 2));
  same.drain();
  EXPECT_EQ(same.h.scheduler.stats().kv_tier_hit_blocks, 5u);
}

TEST(SchedulerKVTier, TierEvictedBetweenMatchAndLoadIsAFailedLoad) {
  auto tiers = std::make_shared<FakeKVConnector>(nullptr);
  const std::vector<TokenId> prompt = prompt_of(26, 19);
  const std::vector<TokenId> expected = run_to_warm(tiers, prompt, 3);
  TierHarness t(32, 64, 0, tiers);
  t.tiers->latency_polls = 1;
  t.h.add(make_spec(1, prompt, 3));
  t.h.step();
  ASSERT_EQ(t.status(1), RequestStatus::WAITING_FOR_KV);
  t.tiers->drop_all();
  t.drain();
  EXPECT_EQ(t.h.generated.at(1), expected);
  EXPECT_EQ(t.h.scheduler.stats().kv_tier_failed_loads, 1u);
}

TEST(SchedulerKVTier, ConnectorCannotChangeWhileRequestsRun) {
  TierHarness t(16);
  t.h.add(make_spec(1, prompt_of(9, 20), 2));
  EXPECT_THROW(t.h.scheduler.set_kv_connector(nullptr), std::logic_error);
  t.drain();
  t.h.scheduler.set_kv_connector(nullptr);
  EXPECT_EQ(t.h.scheduler.stats().num_waiting_for_kv, 0);
}

// Random traffic with a tiny pool (preemption), a small tier (its own evictions), shared prefixes
// (tier hits), random latency, failures, hangs and aborts, also of requests waiting for KV.
TEST(SchedulerKVTier, SurvivesRandomTrafficWithTiers) {
  constexpr int32_t kBlocks = 20;
  constexpr int kNumRequests = 1500;
  std::mt19937 rng(5);
  auto uniform = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  TierHarness t(kBlocks, 24, 0, nullptr, /*timeout_s=*/0.002);
  t.tiers->capacity_blocks = 60;
  std::vector<std::vector<TokenId>> prefixes;
  for (int i = 0; i < 6; ++i) prefixes.push_back(prompt_of(uniform(8, 30), 100 + i));

  RequestId next_id = 0;
  int steps = 0;
  while (next_id < kNumRequests || t.h.scheduler.has_unfinished()) {
    for (int n = t.h.scheduler.num_waiting() < 10 ? uniform(0, 2) : 0; n > 0 && next_id < kNumRequests; --n) {
      std::vector<TokenId> prompt = uniform(0, 3) > 0 ? prefixes[uniform(0, 5)] : std::vector<TokenId>{};
      for (int extra = uniform(prompt.empty() ? 1 : 0, 12); extra > 0; --extra) prompt.push_back(uniform(0, kVocab - 1));
      t.h.add(make_spec(next_id++, prompt, uniform(1, 12)));
    }
    t.tiers->latency_polls = uniform(0, 3);
    t.tiers->fail_loads = uniform(0, 9) == 0;
    t.tiers->hang_loads = uniform(0, 19) == 0;
    if (uniform(0, 7) == 0 && next_id > 0) t.h.scheduler.abort(uniform(0, static_cast<int>(next_id) - 1));
    t.h.step();
    ASSERT_LT(++steps, 100000) << "no progress";
  }
  t.tiers->hang_loads = false;
  t.tiers->fail_loads = false;
  t.drain();
  const SchedulerStats s = t.h.scheduler.stats();
  EXPECT_GT(s.kv_tier_hit_blocks, 0u);
  EXPECT_GT(s.kv_tier_failed_loads, 0u);
  EXPECT_GT(s.num_preempted_total, 0u);
  EXPECT_EQ(s.kv_transfer_held_blocks, 0);
}

TEST(SchedulerKVTier, StepsWithManyTokensTellTheConnectorWhatRecomputingCosts) {
  TierHarness t(512, 512);
  t.h.add(make_spec(1, prompt_of(100, 3), 2));  // steps of a few tokens say nothing about prefill
  t.drain();
  EXPECT_EQ(t.tiers->recompute_seconds_per_block, 0);
  t.h.add(make_spec(2, prompt_of(200, 4), 2));  // one step of 400 prompt tokens, then decode
  t.h.add(make_spec(3, prompt_of(200, 5), 2));
  t.h.step();
  EXPECT_EQ(t.h.batch.num_tokens, 400);
  std::this_thread::sleep_for(std::chrono::milliseconds(4));  // the step "runs" 4 ms: 10 us a token
  t.h.step();
  EXPECT_GE(t.tiers->recompute_seconds_per_block, kBlockSize * 4e-3 / 400);
  EXPECT_LT(t.tiers->recompute_seconds_per_block, 1.0);
  t.drain();
}

TEST(SchedulerKVTier, DecodeBlocksAreSavedInBatchesWhileNothingIsEvicted) {
  TierHarness t(512, 512);
  // Prompts of 1 block + 3 tokens: the first block is cached at prefill, the second one 1 decode
  // step later. Two requests keep running (max_new 40), so no step is "idle".
  t.h.add(make_spec(1, prompt_of(7, 11), 40));
  t.h.add(make_spec(2, prompt_of(7, 12), 40));
  t.h.step();  // prefill: 2 blocks cached, fewer than a batch
  t.h.step();  // decode: 2 more
  t.h.step();
  EXPECT_EQ(t.h.scheduler.stats().kv_tier_saved_blocks, 0u) << "a few blocks wait for more";
  for (int i = 0; i < KVTransfers::kMaxSaveWaitPolls; ++i) t.h.step();
  EXPECT_GE(t.h.scheduler.stats().kv_tier_saved_blocks, 4u) << "but not longer than kMaxSaveWaitPolls steps";
  t.drain();
}

TEST(SchedulerKVTier, UnderEvictionBlocksAreSavedAtOnce) {
  TierHarness t(6, 64);  // 6 blocks: the second request evicts the first one's cached blocks
  t.h.add(make_spec(1, prompt_of(13, 21), 1));
  t.drain();
  const uint64_t saved = t.h.scheduler.stats().kv_tier_saved_blocks;
  EXPECT_EQ(saved, 3u);  // the pool went idle: saved at once
  t.h.add(make_spec(2, prompt_of(21, 22), 3));
  t.h.step();  // prefill of 5 blocks evicts cached ones; its own 5 blocks are saved without waiting
  t.h.step();
  EXPECT_GE(t.h.scheduler.stats().kv_tier_saved_blocks, saved + 5);
  t.drain();
}

}  // namespace
}  // namespace rtpllm::testing

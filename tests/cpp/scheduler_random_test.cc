// Randomized stress: thousands of arrivals, aborts (also mid-step) and preemptions under a tiny
// block pool with shared prefixes. Invariants are checked after every step; the fake model checks
// every KV read; at the end every request finished correctly and the pool is fully free.
#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <vector>

#include "scheduler_harness.h"

namespace rtpllm::testing {
namespace {

struct RandomConfig {
  bool chunked_prefill;
  bool prefix_caching;
  int32_t num_blocks;
  int32_t budget;
  uint32_t seed;
};

class SchedulerRandom : public ::testing::TestWithParam<RandomConfig> {};

TEST_P(SchedulerRandom, SurvivesRandomTraffic) {
  const RandomConfig cfg = GetParam();
  constexpr int32_t kBlockSize = 4;
  constexpr int32_t kVocab = 97;
  constexpr int32_t kMaxModelLen = 64;
  constexpr int kNumRequests = 2000;
  std::mt19937 rng(cfg.seed);
  auto uniform = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };

  SchedulerHarness h({cfg.budget, 8, cfg.chunked_prefill, kMaxModelLen}, {cfg.num_blocks, kBlockSize, cfg.prefix_caching},
                     kVocab);
  // A few shared system prompts make prefix hits (and shared blocks) common.
  std::vector<std::vector<TokenId>> prefixes;
  for (int i = 0; i < 4; ++i) {
    std::vector<TokenId> p(static_cast<size_t>(uniform(4, 20)));
    for (TokenId& t : p) t = uniform(0, kVocab - 1);
    prefixes.push_back(p);
  }

  std::map<RequestId, RequestSpec> specs;
  std::vector<RequestId> aborted;
  RequestId next_id = 0;
  int steps = 0;
  while (next_id < kNumRequests || h.scheduler.has_unfinished()) {
    // Arrivals, in bursts, while the queue is short (a long queue only slows the test down).
    for (int n = h.scheduler.num_waiting() < 12 ? uniform(0, 3) : 0; n > 0 && next_id < kNumRequests; --n) {
      std::vector<TokenId> prompt = uniform(0, 2) > 0 ? prefixes[uniform(0, 3)] : std::vector<TokenId>{};
      for (int extra = uniform(prompt.empty() ? 1 : 0, 24); extra > 0; --extra) prompt.push_back(uniform(0, kVocab - 1));
      if (!cfg.chunked_prefill) prompt.resize(std::min<size_t>(prompt.size(), static_cast<size_t>(cfg.budget)));
      RequestSpec spec = make_spec(next_id, prompt, uniform(1, 30));
      for (int s = uniform(0, 2); s > 0; --s) spec.stop_token_ids.push_back(uniform(0, kVocab - 1));
      spec.min_new_tokens = uniform(0, std::min(3, spec.max_new_tokens));
      spec.priority = uniform(0, 2);
      spec.extra_key = uniform(0, 9) == 0 ? 1 : 0;
      h.add(spec);
      specs[next_id++] = spec;
    }
    // Abort a random live request now and then.
    if (uniform(0, 9) == 0 && next_id > 0) {
      const RequestId victim = uniform(0, static_cast<int>(next_id) - 1);
      if (h.scheduler.abort(victim)) aborted.push_back(victim);
    }
    if (uniform(0, 49) == 0) {
      ScheduledBatch dropped;  // scheduled, never run: must be harmless
      h.scheduler.schedule(dropped);
    }

    h.scheduler.schedule(h.batch);
    const std::vector<TokenId> sampled = h.model.run(h.batch);
    if (uniform(0, 19) == 0 && h.batch.num_seqs > 0) {  // abort while the step is in flight
      const RequestId victim = h.batch.request_ids[uniform(0, h.batch.num_seqs - 1)];
      if (h.scheduler.abort(victim)) aborted.push_back(victim);
    }
    h.apply(sampled);
    ASSERT_LT(++steps, 200000) << "the scheduler stopped making progress";
  }

  const SchedulerStats stats = h.scheduler.stats();
  EXPECT_EQ(h.scheduler.num_free_blocks(), cfg.num_blocks);
  EXPECT_EQ(stats.blocks_used, 0);
  EXPECT_EQ(stats.num_running + stats.num_waiting, 0);
  EXPECT_GT(stats.num_preempted_total, 0u) << "the pool was never tight enough to preempt";
  if (cfg.prefix_caching) {
    EXPECT_GT(stats.prefix_hits, 0u);
  }

  // Every request that was not aborted finished for a reason its outputs justify.
  for (const auto& [id, spec] : specs) {
    if (std::find(aborted.begin(), aborted.end(), id) != aborted.end()) continue;
    ASSERT_EQ(h.finished.count(id), 1u) << "request " << id << " never finished";
    const std::vector<TokenId>& out = h.generated.at(id);
    ASSERT_FALSE(out.empty());
    const auto n = static_cast<int32_t>(out.size());
    const bool is_stop = std::find(spec.stop_token_ids.begin(), spec.stop_token_ids.end(), out.back()) !=
                         spec.stop_token_ids.end();
    for (int32_t i = spec.min_new_tokens; i + 1 < n; ++i) {
      EXPECT_EQ(std::count(spec.stop_token_ids.begin(), spec.stop_token_ids.end(), out[i]), 0)
          << "request " << id << " ran past a stop token";
    }
    if (h.finished.at(id) == FinishReason::STOP) {
      EXPECT_TRUE(is_stop && n >= spec.min_new_tokens);
    } else {
      ASSERT_EQ(h.finished.at(id), FinishReason::LENGTH);
      EXPECT_TRUE(n == spec.max_new_tokens || static_cast<int32_t>(spec.prompt_token_ids.size()) + n == kMaxModelLen);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Configs, SchedulerRandom,
                         ::testing::Values(RandomConfig{true, true, 24, 32, 1}, RandomConfig{true, false, 24, 32, 2},
                                           RandomConfig{false, true, 24, 32, 3}, RandomConfig{true, true, 17, 7, 4}),
                         [](const ::testing::TestParamInfo<RandomConfig>& info) {
                           return std::string(info.param.chunked_prefill ? "Chunked" : "Whole") +
                                  (info.param.prefix_caching ? "PrefixCache" : "NoCache") + "_" +
                                  std::to_string(info.param.num_blocks) + "blocks_budget" + std::to_string(info.param.budget);
                         });

}  // namespace
}  // namespace rtpllm::testing

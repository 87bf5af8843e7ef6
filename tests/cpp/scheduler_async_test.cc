// Asynchronous stepping (commit() now, resolve() one step later): under random traffic with stop
// tokens, length limits, preemption and aborts, every request produces exactly what it produces
// with synchronous update(), the fake model checks every KV read and input token, invariants hold
// after every call, and the pool ends fully free.
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <optional>
#include <random>
#include <vector>

#include "scheduler_harness.h"

namespace rtpllm::testing {
namespace {

// Runs the scheduler one step ahead of its results, as the engine does: the batch of step k is
// launched (the fake model is the device: it knows every sampled token at once) and committed,
// then step k - 1 is resolved.
class AsyncHarness {
 public:
  AsyncHarness(const SchedulerOptions& options, const CacheOptions& cache, int32_t vocab)
      : scheduler(options, cache), model(cache.num_blocks, cache.block_size, vocab) {}

  void add(const RequestSpec& spec) {
    scheduler.add_request(spec);
    model.add_request(spec.request_id, spec.prompt_token_ids, spec.extra_key);
  }

  void step() {
    ScheduledBatch batch;
    scheduler.schedule(batch);
    scheduler.check_invariants();
    if (!batch.empty()) {
      // Placeholders are the previous step's samples, which only the device knows yet.
      for (int32_t i = 0; i < batch.num_seqs; ++i) {
        for (int32_t t = batch.query_start_loc[i]; t < batch.query_start_loc[i + 1]; ++t) {
          if (batch.input_token_ids[t] != kPendingToken) continue;
          ASSERT_TRUE(pending_ && device_last_.count(batch.request_ids[i])) << "a placeholder with no sample behind it";
          batch.input_token_ids[t] = device_last_.at(batch.request_ids[i]);
        }
      }
      const std::vector<TokenId> sampled = model.run(batch);
      for (int32_t k = 0; k < batch.num_sampled; ++k) {
        model.append_token(batch.sampled_request_ids[k], sampled[k]);
        device_last_[batch.sampled_request_ids[k]] = sampled[k];
      }
      scheduler.commit(batch);
      scheduler.check_invariants();
      resolve_pending();
      pending_ = Pending{batch, sampled};
    } else {
      resolve_pending();
    }
  }

  void resolve_pending() {
    if (!pending_) return;
    scheduler.resolve(pending_->batch, pending_->sampled.data(), pending_->sampled.size(), outputs);
    for (size_t i = 0; i < outputs.size(); ++i) {
      const auto& e = outputs.entry(i);
      for (int32_t t = 0; t < e.token_count; ++t) generated[e.request_id].push_back(outputs.tokens(i)[t]);
      if (e.finished) {
        finished[e.request_id] = e.finish_reason;
        // The device may have run the request one step past its stop: realign it for a later id reuse.
        model.forget(e.request_id);
      }
    }
    pending_.reset();
    scheduler.check_invariants();
  }

  bool busy() const { return scheduler.has_unfinished() || pending_.has_value(); }

  Scheduler scheduler;
  FakeKVModel model;
  StepOutputs outputs;
  std::map<RequestId, std::vector<TokenId>> generated;
  std::map<RequestId, FinishReason> finished;

 private:
  struct Pending {
    ScheduledBatch batch;
    std::vector<TokenId> sampled;
  };
  std::optional<Pending> pending_;
  std::map<RequestId, TokenId> device_last_;
};

struct Workload {
  std::vector<std::pair<int, RequestSpec>> arrivals;  // (step, spec)
};

Workload random_workload(uint32_t seed, int32_t vocab, int num_requests) {
  std::mt19937 rng(seed);
  auto uniform = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  Workload w;
  std::vector<TokenId> shared(12);
  for (TokenId& t : shared) t = uniform(0, vocab - 1);
  for (int id = 0; id < num_requests; ++id) {
    std::vector<TokenId> prompt = uniform(0, 1) ? shared : std::vector<TokenId>{};
    for (int extra = uniform(prompt.empty() ? 1 : 0, 20); extra > 0; --extra) prompt.push_back(uniform(0, vocab - 1));
    RequestSpec spec = make_spec(id, prompt, uniform(1, 25));
    for (int s = uniform(0, 3); s > 0; --s) spec.stop_token_ids.push_back(uniform(0, vocab - 1));
    spec.min_new_tokens = uniform(0, std::min(2, spec.max_new_tokens));
    w.arrivals.push_back({id / 3, spec});
  }
  return w;
}

class SchedulerAsync : public ::testing::TestWithParam<int32_t> {};  // param: pool size in blocks

TEST_P(SchedulerAsync, ProducesWhatSynchronousUpdateProduces) {
  constexpr int32_t kVocab = 29;  // small, so stop tokens are hit often
  constexpr int32_t kBlockSize = 4;
  const int32_t num_blocks = GetParam();
  const SchedulerOptions options{24, 6, true, 48};
  const CacheOptions cache{num_blocks, kBlockSize, true};
  for (uint32_t seed = 1; seed <= 20; ++seed) {
    const Workload w = random_workload(seed, kVocab, 40);

    SchedulerHarness sync(options, cache, kVocab);
    AsyncHarness async(options, cache, kVocab);
    size_t next_sync = 0, next_async = 0;
    for (int step = 0; step < 5000 && (next_sync < w.arrivals.size() || sync.scheduler.has_unfinished()); ++step) {
      for (; next_sync < w.arrivals.size() && w.arrivals[next_sync].first <= step; ++next_sync) sync.add(w.arrivals[next_sync].second);
      sync.step();
    }
    for (int step = 0; step < 5000 && (next_async < w.arrivals.size() || async.busy()); ++step) {
      for (; next_async < w.arrivals.size() && w.arrivals[next_async].first <= step; ++next_async) {
        async.add(w.arrivals[next_async].second);
      }
      async.step();
      if (HasFatalFailure()) return;
    }
    ASSERT_FALSE(async.busy()) << "seed " << seed;
    EXPECT_EQ(async.generated, sync.generated) << "seed " << seed;
    EXPECT_EQ(async.finished, sync.finished) << "seed " << seed;
    EXPECT_EQ(async.scheduler.num_free_blocks(), num_blocks) << "seed " << seed;
    EXPECT_EQ(async.scheduler.num_committed_unresolved(), 0);
  }
}

INSTANTIATE_TEST_SUITE_P(PoolSizes, SchedulerAsync, ::testing::Values(12, 16, 64));

TEST(SchedulerAsyncOrder, AbortWhileTwoStepsAreUnresolvedFreesEverything) {
  AsyncHarness h({64, 4, true, 64}, {32, 4, true}, 1000);
  h.add(make_spec(1, iota_tokens(9), 50));
  h.add(make_spec(2, iota_tokens(5, 100), 50));
  h.step();
  h.step();  // step 2 committed, step 1 resolved
  ScheduledBatch third;
  h.scheduler.schedule(third);
  h.scheduler.commit(third);  // two committed steps unresolved (2 and 3)
  EXPECT_EQ(h.scheduler.num_committed_unresolved(), 2);
  EXPECT_TRUE(h.scheduler.abort(1));
  h.scheduler.check_invariants();
  EXPECT_TRUE(h.scheduler.abort(2));
  EXPECT_FALSE(h.scheduler.has_unfinished());
  EXPECT_EQ(h.scheduler.num_free_blocks(), 32);
}

TEST(SchedulerAsyncOrder, RejectsOutOfOrderCalls) {
  SchedulerHarness h({64, 8, true, 256}, {32, 4, true});
  h.add(make_spec(1, iota_tokens(5), 10));
  ScheduledBatch first;
  h.scheduler.schedule(first);
  h.scheduler.commit(first);
  EXPECT_THROW(h.scheduler.commit(first), std::invalid_argument);  // committed already
  ScheduledBatch second;
  h.scheduler.schedule(second);
  StepOutputs out;
  const TokenId token = 7;
  EXPECT_THROW(h.scheduler.resolve(second, &token, 1, out), std::invalid_argument);  // not the oldest
  EXPECT_THROW(h.scheduler.update(second, &token, 1, out), std::invalid_argument);   // first is unresolved
  h.scheduler.resolve(first, &token, 1, out);
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out.tokens(0)[0], 7);
  h.scheduler.check_invariants();
}

}  // namespace
}  // namespace rtpllm::testing

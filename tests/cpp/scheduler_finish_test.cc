// Stop conditions, abort at any time, and update() contract checks.
#include <gtest/gtest.h>

#include <vector>

#include "scheduler_harness.h"

namespace rtpllm::testing {
namespace {

// Feeds explicit tokens to a single running request, one step at a time.
struct ScriptedRun {
  explicit ScriptedRun(const RequestSpec& spec, int32_t max_model_len = 256)
      : h({64, 8, true, max_model_len}, {32, 4, true}) {
    h.add(spec);
  }
  // Returns the output entry of the step, if any.
  const StepOutputs& feed(TokenId token) {
    h.scheduler.schedule(h.batch);
    h.apply(std::vector<TokenId>(static_cast<size_t>(h.batch.num_sampled), token));
    return h.outputs;
  }
  SchedulerHarness h;
};

TEST(SchedulerFinish, StopTokenFinishesAndIsReported) {
  ScriptedRun run(make_spec(1, iota_tokens(3), 10, {50, 2}));
  EXPECT_FALSE(run.feed(7).entry(0).finished);
  const StepOutputs& out = run.feed(50);
  ASSERT_EQ(out.size(), 1u);
  EXPECT_TRUE(out.entry(0).finished);
  EXPECT_EQ(out.entry(0).finish_reason, FinishReason::STOP);
  EXPECT_EQ(out.entry(0).stop_token_id, 50);
  EXPECT_EQ(out.materialize(0).new_token_ids, std::vector<TokenId>{50});  // the stop token is reported
  EXPECT_FALSE(run.h.scheduler.has_unfinished());
  EXPECT_EQ(run.h.scheduler.num_free_blocks(), 32);
}

TEST(SchedulerFinish, StopTokensIgnoredBeforeMinNewTokens) {
  RequestSpec spec = make_spec(1, iota_tokens(3), 10, {2});
  spec.min_new_tokens = 3;
  ScriptedRun run(spec);
  EXPECT_FALSE(run.feed(2).entry(0).finished);  // 1 output
  EXPECT_FALSE(run.feed(2).entry(0).finished);  // 2 outputs
  const StepOutputs& out = run.feed(2);           // 3 outputs: now it may stop
  EXPECT_EQ(out.entry(0).finish_reason, FinishReason::STOP);
  EXPECT_EQ(run.h.generated.at(1), (std::vector<TokenId>{2, 2, 2}));
}

TEST(SchedulerFinish, MaxNewTokensFinishesWithLength) {
  ScriptedRun run(make_spec(1, iota_tokens(3), 2, {2}));
  EXPECT_FALSE(run.feed(9).entry(0).finished);
  const StepOutputs& out = run.feed(9);
  EXPECT_EQ(out.entry(0).finish_reason, FinishReason::LENGTH);
  EXPECT_EQ(out.entry(0).stop_token_id, -1);
}

TEST(SchedulerFinish, FullContextFinishesWithLength) {
  ScriptedRun run(make_spec(1, iota_tokens(6), 100), /*max_model_len=*/8);
  EXPECT_FALSE(run.feed(9).entry(0).finished);  // 7 tokens
  EXPECT_EQ(run.feed(9).entry(0).finish_reason, FinishReason::LENGTH);  // 8 = max_model_len
  // A prompt of exactly max_model_len still gets its one token.
  ScriptedRun full(make_spec(2, iota_tokens(8), 100), /*max_model_len=*/8);
  EXPECT_EQ(full.feed(9).entry(0).finish_reason, FinishReason::LENGTH);
  EXPECT_EQ(full.h.generated.at(2).size(), 1u);
}

TEST(SchedulerFinish, AbortWaitingRunningAndUnknown) {
  SchedulerHarness h({64, 1, true, 256}, {32, 4, true});
  h.add(make_spec(1, iota_tokens(9), 10));
  h.add(make_spec(2, iota_tokens(5), 10));
  h.step();  // 1 runs (max_num_seqs = 1), 2 waits
  EXPECT_EQ(h.scheduler.num_free_blocks(), 29);
  EXPECT_TRUE(h.scheduler.abort(2));
  EXPECT_EQ(h.scheduler.num_waiting(), 0);
  EXPECT_TRUE(h.scheduler.abort(1, FinishReason::ERROR));
  EXPECT_EQ(h.scheduler.num_running(), 0);
  EXPECT_EQ(h.scheduler.num_free_blocks(), 32);
  EXPECT_FALSE(h.scheduler.abort(1));   // already gone
  EXPECT_FALSE(h.scheduler.abort(99));  // never known
  EXPECT_THROW(h.scheduler.abort(1, FinishReason::NONE), std::invalid_argument);
  h.scheduler.check_invariants();
  EXPECT_FALSE(h.scheduler.has_unfinished());
  // The id can be used again.
  h.add(make_spec(1, iota_tokens(4), 1));
  h.run_until_done();
  EXPECT_EQ(h.finished.at(1), FinishReason::LENGTH);
}

TEST(SchedulerFinish, AbortBetweenScheduleAndUpdateDropsTheToken) {
  SchedulerHarness h({64, 8, true, 256}, {32, 4, true});
  h.add(make_spec(1, iota_tokens(5), 10));
  h.add(make_spec(2, iota_tokens(6, 100), 10));
  h.scheduler.schedule(h.batch);
  ASSERT_EQ(h.batch.num_sampled, 2);
  h.model.run(h.batch);
  EXPECT_TRUE(h.scheduler.abort(1));
  EXPECT_EQ(h.scheduler.num_free_blocks(), 30);  // request 1's blocks are back at once
  h.apply({11, 12});
  ASSERT_EQ(h.outputs.size(), 1u);
  EXPECT_EQ(h.outputs.entry(0).request_id, 2);
  EXPECT_EQ(h.generated.count(1), 0u);
  EXPECT_EQ(h.generated.at(2), std::vector<TokenId>{12});
  h.run_until_done();
  EXPECT_EQ(h.scheduler.num_free_blocks(), 32);
}

TEST(SchedulerFinish, UpdateRejectsWrongBatchesAndCounts) {
  SchedulerHarness h({64, 8, true, 256}, {32, 4, true});
  h.add(make_spec(1, iota_tokens(5), 10));
  h.scheduler.schedule(h.batch);
  StepOutputs out;
  const std::vector<TokenId> two = {1, 2};
  EXPECT_THROW(h.scheduler.update(h.batch, two.data(), two.size(), out), std::invalid_argument);
  const TokenId negative = -5;
  EXPECT_THROW(h.scheduler.update(h.batch, &negative, 1, out), std::invalid_argument);
  Scheduler other({64, 8, true, 256}, {32, 4, true});
  EXPECT_THROW(other.update(h.batch, two.data(), 1, out), std::invalid_argument);
  // None of that changed anything: the right call still works, once.
  h.apply({7});
  EXPECT_EQ(h.generated.at(1), std::vector<TokenId>{7});
  EXPECT_THROW(h.scheduler.update(h.batch, two.data(), 1, out), std::invalid_argument);
}

}  // namespace
}  // namespace rtpllm::testing

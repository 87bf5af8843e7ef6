// Preemption by recompute when the KV pool runs out, and resuming afterwards.
#include <gtest/gtest.h>

#include <vector>

#include "scheduler_harness.h"

namespace rtpllm::testing {
namespace {

// Outputs of each request run alone with plenty of blocks: the reference for constrained runs.
std::map<RequestId, std::vector<TokenId>> run_unconstrained(const std::vector<RequestSpec>& specs) {
  std::map<RequestId, std::vector<TokenId>> outputs;
  for (const RequestSpec& spec : specs) {
    SchedulerHarness h({256, 8, true, 256}, {64, 4, true});
    h.add(spec);
    h.run_until_done();
    outputs[spec.request_id] = h.generated.at(spec.request_id);
  }
  return outputs;
}

TEST(SchedulerPreemption, LatestArrivalIsPreemptedAndResumesWithItsOutputs) {
  // 6 blocks of 4 tokens; two requests of 8 prompt + 12 new tokens need 5 blocks each at the end.
  const std::vector<RequestSpec> specs = {make_spec(1, iota_tokens(8, 10), 12), make_spec(2, iota_tokens(8, 60), 12)};
  SchedulerHarness h({64, 8, true, 256}, {6, 4, true});
  for (const auto& s : specs) h.add(s);

  bool saw_preemption = false;
  while (h.scheduler.has_unfinished()) {
    h.step();
    const Request* r2 = h.scheduler.find(2);
    if (r2 != nullptr && r2->status == RequestStatus::PREEMPTED) {
      saw_preemption = true;
      EXPECT_TRUE(r2->block_table.empty());
      EXPECT_EQ(r2->num_computed_tokens, 0);
      EXPECT_EQ(r2->num_output_tokens(), static_cast<int32_t>(h.generated.at(2).size()));  // outputs kept
      const Request* r1 = h.scheduler.find(1);
      EXPECT_TRUE(r1 == nullptr || r1->num_preemptions == 0) << "the earlier arrival was preempted";
    }
  }
  EXPECT_TRUE(saw_preemption);
  EXPECT_GE(h.scheduler.stats().num_preempted_total, 1u);
  EXPECT_EQ(h.generated, run_unconstrained(specs));
  EXPECT_EQ(h.scheduler.num_free_blocks(), 6);
}

TEST(SchedulerPreemption, LowerPriorityIsPreemptedFirst) {
  const std::vector<RequestSpec> specs = [] {
    RequestSpec unimportant = make_spec(1, iota_tokens(8, 10), 12);  // arrives first, but priority 1
    unimportant.priority = 1;
    return std::vector<RequestSpec>{unimportant, make_spec(2, iota_tokens(8, 60), 12)};
  }();
  SchedulerHarness h({64, 8, true, 256}, {6, 4, true});
  for (const auto& s : specs) h.add(s);
  while (h.scheduler.has_unfinished()) {
    h.step();
    const Request* r2 = h.scheduler.find(2);
    ASSERT_TRUE(r2 == nullptr || r2->num_preemptions == 0) << "the more important request was preempted";
  }
  EXPECT_GE(h.scheduler.stats().num_preempted_total, 1u);
  EXPECT_EQ(h.generated, run_unconstrained(specs));
}

TEST(SchedulerPreemption, ResumeRecomputesPromptAndOutputs) {
  SchedulerHarness h({64, 8, true, 256}, {6, 4, false});  // no prefix cache: the whole context recomputes
  h.add(make_spec(1, iota_tokens(8, 10), 12));
  h.add(make_spec(2, iota_tokens(8, 60), 12));
  while (h.scheduler.has_unfinished()) {
    const Request* r2 = h.scheduler.find(2);
    const bool resuming = r2 != nullptr && r2->status == RequestStatus::PREEMPTED;
    const std::vector<TokenId> context = resuming ? r2->token_ids : std::vector<TokenId>{};
    const ScheduledBatch& b = h.step();
    if (!resuming) continue;
    for (int32_t i = 0; i < b.num_seqs; ++i) {
      if (b.request_ids[i] != 2) continue;
      EXPECT_EQ(b.num_computed[i], 0);
      EXPECT_EQ(b.seq_lens[i], static_cast<int32_t>(context.size()));  // prompt + generated, one piece
      EXPECT_EQ(std::vector<TokenId>(b.input_token_ids.begin() + b.query_start_loc[i],
                                     b.input_token_ids.begin() + b.query_start_loc[i + 1]),
                context);
    }
  }
  EXPECT_EQ(h.finished.size(), 2u);
}

TEST(SchedulerPreemption, ALoneRequestFinishesAtPoolCapacity) {
  // The pool holds 12 tokens; max_model_len is larger. The context limit is the pool, so the
  // request ends with LENGTH instead of preempting itself forever.
  SchedulerHarness h({64, 8, true, 1000}, {3, 4, true});
  EXPECT_EQ(h.scheduler.max_context_len(), 12);
  h.add(make_spec(1, iota_tokens(5), 100));
  h.run_until_done(100);
  EXPECT_FALSE(h.scheduler.has_unfinished());
  EXPECT_EQ(h.finished.at(1), FinishReason::LENGTH);
  EXPECT_EQ(h.generated.at(1).size(), 7u);  // 5 + 7 = 12 tokens
}

TEST(SchedulerPreemption, EvictionListenerHearsReusedCachedBlocks) {
  struct Counting : BlockEvictionListener {
    int evicted = 0;
    void on_block_evicted(BlockId, BlockHash) override { ++evicted; }
  } listener;
  SchedulerHarness h({64, 8, true, 256}, {4, 4, true});
  h.scheduler.set_eviction_listener(&listener);
  h.add(make_spec(1, iota_tokens(9, 10), 1));  // leaves 2 cached full blocks behind
  h.run_until_done();
  EXPECT_EQ(h.scheduler.stats().num_cached_blocks, 2);
  h.add(make_spec(2, iota_tokens(15, 500), 1));  // needs all 4 blocks
  h.run_until_done();
  EXPECT_EQ(listener.evicted, 2);
  EXPECT_EQ(h.scheduler.stats().num_evicted_blocks, 2u);
}

}  // namespace
}  // namespace rtpllm::testing

// Continuous batching: step layout, decode-first, chunked prefill, limits, prefix hits.
#include <gtest/gtest.h>

#include <vector>

#include "scheduler_harness.h"

namespace rtpllm::testing {
namespace {

template <typename T>
std::vector<T> row(const std::vector<T>& v, size_t begin, size_t end) {
  return std::vector<T>(v.begin() + begin, v.begin() + end);
}

TEST(SchedulerBatching, PrefillThenDecodeLayout) {
  SchedulerHarness h({64, 8, true, 128}, {16, 4, true});
  h.add(make_spec(7, iota_tokens(10, 100), 3));

  const ScheduledBatch& prefill = h.step();
  ASSERT_EQ(prefill.num_seqs, 1);
  EXPECT_EQ(prefill.num_tokens, 10);
  EXPECT_EQ(prefill.input_token_ids, iota_tokens(10, 100));
  EXPECT_EQ(prefill.positions, iota_tokens(10, 0));
  EXPECT_EQ(prefill.query_start_loc, (std::vector<int32_t>{0, 10}));
  EXPECT_EQ(prefill.num_computed, std::vector<int32_t>{0});
  EXPECT_EQ(prefill.seq_lens, std::vector<int32_t>{10});
  EXPECT_EQ(prefill.block_tables, (std::vector<int32_t>{0, 1, 2}));
  EXPECT_EQ(prefill.slot_mapping[0], 0);
  EXPECT_EQ(prefill.slot_mapping[9], 2 * 4 + 1);
  EXPECT_EQ(prefill.logits_indices, std::vector<int32_t>{9});
  EXPECT_EQ(prefill.sampled_request_ids, std::vector<int64_t>{7});
  EXPECT_EQ(prefill.max_query_len, 10);
  EXPECT_EQ(prefill.max_seq_len, 10);
  const TokenId t0 = h.generated.at(7).at(0);

  // The sampled token is computed by the next step, at position P, and the context becomes P + 1.
  const ScheduledBatch& decode = h.step();
  ASSERT_EQ(decode.num_seqs, 1);
  EXPECT_EQ(decode.input_token_ids, std::vector<int32_t>{t0});
  EXPECT_EQ(decode.positions, std::vector<int32_t>{10});
  EXPECT_EQ(decode.num_computed, std::vector<int32_t>{10});
  EXPECT_EQ(decode.seq_lens, std::vector<int32_t>{11});
  EXPECT_EQ(decode.slot_mapping, std::vector<int64_t>{2 * 4 + 2});
  EXPECT_EQ(decode.logits_indices, std::vector<int32_t>{0});

  h.run_until_done();
  EXPECT_EQ(h.generated.at(7).size(), 3u);
  EXPECT_EQ(h.finished.at(7), FinishReason::LENGTH);
  EXPECT_EQ(h.scheduler.num_free_blocks(), 16);
}

TEST(SchedulerBatching, EmptyWhenNothingToRun) {
  SchedulerHarness h({64, 8, true, 128}, {16, 4, true});
  const ScheduledBatch& b = h.step();
  EXPECT_TRUE(b.empty());
  EXPECT_EQ(b.query_start_loc, std::vector<int32_t>{0});
  EXPECT_FALSE(h.scheduler.has_unfinished());
}

TEST(SchedulerBatching, DecodesGoFirstAndPrefillIsChunked) {
  SchedulerHarness h({8, 8, true, 256}, {64, 4, true});
  h.add(make_spec(1, iota_tokens(5), 50));
  h.step();  // request 1 prefilled; decoding from now on
  h.add(make_spec(2, iota_tokens(20, 300), 4));

  // Each step: request 1's decode token first, then a 7-token chunk of request 2 (budget 8).
  for (int32_t chunk = 0; chunk < 3; ++chunk) {
    const ScheduledBatch& b = h.step();
    ASSERT_EQ(b.num_seqs, 2);
    EXPECT_EQ(b.request_ids, (std::vector<int64_t>{1, 2}));
    EXPECT_EQ(b.query_start_loc, (std::vector<int32_t>{0, 1, chunk < 2 ? 8 : 7}));
    EXPECT_EQ(b.num_computed[1], chunk * 7);
    // Only the final chunk reaches the end of the prompt and samples.
    EXPECT_EQ(b.sampled_request_ids, chunk < 2 ? std::vector<int64_t>{1} : (std::vector<int64_t>{1, 2}));
  }
  EXPECT_EQ(h.generated.at(2).size(), 1u);
  h.run_until_done();
  EXPECT_EQ(h.generated.at(1).size(), 50u);
  EXPECT_EQ(h.generated.at(2).size(), 4u);
}

TEST(SchedulerBatching, WithoutChunkingALongPromptWaitsForRoom) {
  SchedulerHarness h({16, 8, false, 256}, {64, 4, true});
  h.add(make_spec(1, iota_tokens(4), 3));
  h.step();
  h.add(make_spec(2, iota_tokens(16, 50), 2));  // needs the whole budget; the decode takes 1 token
  while (h.scheduler.num_running() == 2 || h.scheduler.find(1) != nullptr) {
    const ScheduledBatch& b = h.step();
    for (int32_t i = 0; i < b.num_seqs; ++i) EXPECT_NE(b.request_ids[i], 2) << "prefilled while a decode shared the step";
  }
  const ScheduledBatch& b = h.step();
  ASSERT_EQ(b.request_ids, std::vector<int64_t>{2});
  EXPECT_EQ(b.num_tokens, 16);  // in one piece
}

TEST(SchedulerBatching, RespectsMaxNumSeqs) {
  SchedulerHarness h({64, 2, true, 256}, {64, 4, true});
  for (RequestId id = 1; id <= 3; ++id) h.add(make_spec(id, iota_tokens(3), 2));
  const ScheduledBatch& b = h.step();
  EXPECT_EQ(b.request_ids, (std::vector<int64_t>{1, 2}));
  EXPECT_EQ(h.scheduler.num_waiting(), 1);
  h.run_until_done();
  EXPECT_EQ(h.finished.size(), 3u);
}

TEST(SchedulerBatching, PriorityOrdersAdmission) {
  SchedulerHarness h({64, 1, true, 256}, {64, 4, true});
  RequestSpec low = make_spec(1, iota_tokens(3), 1);
  low.priority = 5;
  RequestSpec high = make_spec(2, iota_tokens(3), 1);
  high.priority = -1;
  h.add(low);
  h.add(high);
  EXPECT_EQ(h.step().request_ids, std::vector<int64_t>{2});
  EXPECT_EQ(h.step().request_ids, std::vector<int64_t>{1});
}

TEST(SchedulerBatching, PrefixHitStartsAtTheCachedLength) {
  SchedulerHarness h({64, 8, true, 256}, {32, 4, true});
  h.add(make_spec(1, iota_tokens(11, 40), 1));
  h.run_until_done();
  h.add(make_spec(2, iota_tokens(14, 40), 1));  // shares the first 11 tokens: 2 full blocks
  const std::vector<int32_t> cached = {0, 1};   // request 1's first blocks
  const ScheduledBatch& b = h.step();
  ASSERT_EQ(b.num_seqs, 1);
  EXPECT_EQ(b.num_computed, std::vector<int32_t>{8});
  EXPECT_EQ(b.num_tokens, 6);
  EXPECT_EQ(b.positions.front(), 8);
  EXPECT_EQ(b.input_token_ids, iota_tokens(6, 48));
  EXPECT_EQ(row(b.block_tables, 0, 2), cached);
  EXPECT_EQ(b.slot_mapping.front(), b.block_tables[2] * 4);
  const SchedulerStats s = h.scheduler.stats();
  EXPECT_EQ(s.prefix_queries, 11u + 14u);
  EXPECT_EQ(s.prefix_hits, 8u);
}

TEST(SchedulerBatching, PrefixSharingBetweenRunningRequests) {
  SchedulerHarness h({64, 8, true, 256}, {32, 4, true});
  h.add(make_spec(1, iota_tokens(12), 6));
  h.step();
  h.add(make_spec(2, iota_tokens(12), 6));  // identical prompt: reuses blocks 0, 1 while 1 runs
  const ScheduledBatch& b = h.step();
  ASSERT_EQ(b.request_ids, (std::vector<int64_t>{1, 2}));
  EXPECT_EQ(b.num_computed[1], 8);
  EXPECT_EQ(row(b.block_tables, b.max_blocks_per_seq, b.max_blocks_per_seq + 2), row(b.block_tables, 0, 2));
  h.run_until_done();
  EXPECT_EQ(h.generated.at(1), h.generated.at(2));  // same context, same outputs
}

TEST(SchedulerBatching, DroppedBatchIsScheduledAgain) {
  SchedulerHarness h({64, 8, true, 256}, {32, 4, true});
  h.add(make_spec(1, iota_tokens(6), 2));
  ScheduledBatch first;
  h.scheduler.schedule(first);  // never run
  const ScheduledBatch& again = h.step();
  EXPECT_EQ(again.input_token_ids, first.input_token_ids);
  EXPECT_EQ(again.num_computed, first.num_computed);
  StepOutputs out;
  const TokenId token = 3;
  EXPECT_THROW(h.scheduler.update(first, &token, 1, out), std::invalid_argument);
  h.run_until_done();
  EXPECT_EQ(h.generated.at(1).size(), 2u);
}

}  // namespace
}  // namespace rtpllm::testing

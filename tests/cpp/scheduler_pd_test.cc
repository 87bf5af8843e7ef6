// The decode side of prefill-decode disaggregation in the scheduler: a request whose prompt KV a
// peer writes waits (WAITING_FOR_KV) with blocks for its whole prompt, then runs on exactly as a
// locally prefilled one would; aborted or failed ones keep their blocks held until released; no
// room refuses without changing anything. The fake model checks every KV read, so KV that the
// "peer" (a second scheduler) did not write where the decode side reads it fails a test.
#include <gtest/gtest.h>

#include <vector>

#include "scheduler_harness.h"

namespace rtpllm::testing {
namespace {

constexpr int32_t kBlockSize = 4;
constexpr int32_t kVocab = 97;

SchedulerHarness make_harness(int32_t num_blocks, int32_t max_num_seqs = 8) {
  return SchedulerHarness({64, max_num_seqs, true, 256}, CacheOptions{num_blocks, kBlockSize, true}, kVocab);
}

// The prefill peer: computes the prompt (one token) and returns its first token; its KV blocks
// are copied into `decode`'s blocks `dst` (the transfer engine's job).
TokenId prefill_into(const RequestSpec& spec, SchedulerHarness& decode, const std::vector<BlockId>& dst) {
  SchedulerHarness peer = make_harness(64);
  RequestSpec one = spec;
  one.max_new_tokens = 1;
  peer.add(one);
  peer.scheduler.schedule(peer.batch);
  const int64_t hold = peer.scheduler.hold_blocks(spec.request_id);  // outlives the request, as prefill's writes do
  const std::vector<BlockId> src = peer.scheduler.find(spec.request_id)->block_table;
  peer.apply(peer.model.run(peer.batch));
  EXPECT_FALSE(peer.scheduler.has_unfinished());
  EXPECT_LT(peer.scheduler.num_free_blocks(), 64) << "the hold keeps the finished request's blocks";
  for (size_t i = 0; i < dst.size(); ++i) decode.model.write_block(dst[i], peer.model.read_block(src[i]));
  EXPECT_TRUE(peer.scheduler.release_blocks(hold));
  EXPECT_EQ(peer.scheduler.num_free_blocks(), 64);
  peer.scheduler.check_invariants();
  return peer.generated.at(spec.request_id).at(0);
}

void add_remote(SchedulerHarness& h, const RequestSpec& spec) {
  ASSERT_TRUE(h.scheduler.add_remote_prefill(spec));
  h.model.add_request(spec.request_id, spec.prompt_token_ids);
  h.scheduler.check_invariants();
}

void complete(SchedulerHarness& h, RequestId id, TokenId first) {
  StepOutputs outputs;
  ASSERT_TRUE(h.scheduler.complete_remote_prefill(id, first, outputs));
  ASSERT_EQ(outputs.size(), 1u);
  h.model.append_token(id, first);
  h.generated[id].push_back(first);
  if (outputs.entry(0).finished) h.finished[id] = outputs.entry(0).finish_reason;
  h.scheduler.check_invariants();
}

TEST(SchedulerPD, RemotePrefillRunsOnExactlyAsALocalOne) {
  const RequestSpec spec = make_spec(1, iota_tokens(14, 3), 6);
  SchedulerHarness local = make_harness(32);
  local.add(spec);
  local.run_until_done();

  SchedulerHarness decode = make_harness(32);
  add_remote(decode, spec);
  const Request* r = decode.scheduler.find(1);
  EXPECT_EQ(r->status, RequestStatus::WAITING_FOR_KV);
  EXPECT_EQ(r->block_table.size(), 4u);  // 14 tokens of 4 per block: all allocated up front
  EXPECT_EQ(decode.scheduler.num_waiting_for_kv(), 1);
  EXPECT_EQ(decode.scheduler.stats().num_waiting_for_kv, 1);
  // Waiting for the peer: never scheduled, and the step loop runs on.
  EXPECT_EQ(decode.step().num_seqs, 0);
  const std::vector<BlockId> dst = r->block_table;
  complete(decode, 1, prefill_into(spec, decode, dst));
  decode.run_until_done();
  EXPECT_EQ(decode.generated.at(1), local.generated.at(1));
  EXPECT_EQ(decode.scheduler.num_free_blocks(), 32);
}

TEST(SchedulerPD, LocalPrefixHitIsCountedAndKept) {
  const RequestSpec first = make_spec(1, iota_tokens(14, 3), 2);
  SchedulerHarness decode = make_harness(32);
  add_remote(decode, first);
  complete(decode, 1, prefill_into(first, decode, decode.scheduler.find(1)->block_table));
  decode.run_until_done();

  RequestSpec second = make_spec(2, iota_tokens(14, 3), 2);
  add_remote(decode, second);
  const Request* r = decode.scheduler.find(2);
  EXPECT_EQ(r->num_computed_tokens, 12);  // 3 full cached blocks; the last token is always written
  EXPECT_EQ(r->block_table.size(), 4u);
}

TEST(SchedulerPD, FirstTokenCanFinishTheRequest) {
  SchedulerHarness decode = make_harness(16);
  add_remote(decode, make_spec(1, iota_tokens(5), 1));
  complete(decode, 1, 7);
  EXPECT_EQ(decode.finished.at(1), FinishReason::LENGTH);
  add_remote(decode, make_spec(2, iota_tokens(5), 4, {9}));
  complete(decode, 2, 9);
  EXPECT_EQ(decode.finished.at(2), FinishReason::STOP);
  EXPECT_FALSE(decode.scheduler.has_unfinished());
  EXPECT_EQ(decode.scheduler.num_free_blocks(), 16);
}

TEST(SchedulerPD, FailedRequestKeepsItsBlocksHeldUntilReleased) {
  SchedulerHarness decode = make_harness(16);
  add_remote(decode, make_spec(1, iota_tokens(10), 4));
  const int64_t hold = decode.scheduler.hold_blocks(1);
  ASSERT_GT(hold, 0);
  ASSERT_TRUE(decode.scheduler.abort(1, FinishReason::ERROR));
  decode.scheduler.check_invariants();
  EXPECT_EQ(decode.scheduler.num_waiting_for_kv(), 0);
  EXPECT_EQ(decode.scheduler.num_free_blocks(), 13);  // a late write still lands in blocks nobody uses
  EXPECT_EQ(decode.scheduler.stats().kv_transfer_held_blocks, 3);
  StepOutputs outputs;
  EXPECT_FALSE(decode.scheduler.complete_remote_prefill(1, 5, outputs));  // too late: ignored
  EXPECT_TRUE(decode.scheduler.release_blocks(hold));
  EXPECT_FALSE(decode.scheduler.release_blocks(hold));
  EXPECT_EQ(decode.scheduler.num_free_blocks(), 16);
  decode.scheduler.check_invariants();
}

TEST(SchedulerPD, NoRoomRefusesWithoutChangingAnything) {
  SchedulerHarness decode = make_harness(6, 2);
  add_remote(decode, make_spec(1, iota_tokens(13), 2));                                      // 4 blocks
  EXPECT_FALSE(decode.scheduler.add_remote_prefill(make_spec(2, iota_tokens(9, 30), 2)));  // 3 > 2 free
  EXPECT_EQ(decode.scheduler.num_free_blocks(), 2);
  EXPECT_EQ(decode.scheduler.find(2), nullptr);
  add_remote(decode, make_spec(3, iota_tokens(3, 50), 2));
  EXPECT_FALSE(decode.scheduler.add_remote_prefill(make_spec(4, iota_tokens(3, 70), 2)));  // max_num_seqs
  EXPECT_THROW(decode.scheduler.add_remote_prefill(make_spec(1, iota_tokens(3), 2)), std::invalid_argument);
  EXPECT_EQ(decode.scheduler.num_waiting_for_kv(), 2);
  decode.scheduler.check_invariants();
}

TEST(SchedulerPD, WaitingRemoteRequestDoesNotHoldUpOthers) {
  SchedulerHarness decode = make_harness(32);
  add_remote(decode, make_spec(1, iota_tokens(8), 3));
  decode.add(make_spec(2, iota_tokens(6, 40), 3));
  decode.run_until_done(20);  // request 1 waits all along; request 2 finishes beside it
  EXPECT_EQ(decode.finished.count(2), 1u);
  EXPECT_EQ(decode.scheduler.find(1)->status, RequestStatus::WAITING_FOR_KV);
  EXPECT_TRUE(decode.scheduler.abort(1));
  EXPECT_EQ(decode.scheduler.num_free_blocks(), 32);
}

}  // namespace
}  // namespace rtpllm::testing

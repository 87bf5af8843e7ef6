// Speculative decoding in the scheduler: lookahead slots, verified updates, KV rollback.
//
// The FakeKVModel writes a fingerprint of the whole context for every computed position, drafts
// included, and checks every position a step reads. So a rejected draft's KV that the scheduler
// kept (as computed, or in the prefix cache) is read back later and fails the test.
#include <gtest/gtest.h>

#include <functional>
#include <map>
#include <stdexcept>
#include <vector>

#include "scheduler_harness.h"

namespace rtpllm::testing {
namespace {

SchedulerOptions options(int32_t max_tokens = 64, int32_t max_seqs = 8, bool chunked = true) {
  SchedulerOptions o;
  o.max_num_batched_tokens = max_tokens;
  o.max_num_seqs = max_seqs;
  o.enable_chunked_prefill = chunked;
  o.max_model_len = 256;
  return o;
}

CacheOptions cache(int32_t num_blocks, int32_t block_size = 4, bool prefix = true) {
  CacheOptions c;
  c.num_blocks = num_blocks;
  c.block_size = block_size;
  c.enable_prefix_caching = prefix;
  return c;
}

// Drives speculative steps: each decoding request asks for `k(id)` lookahead slots, proposes the
// true continuation with the first `num_correct(id)` drafts right and the rest wrong, and the step
// accepts greedily (the longest prefix of drafts equal to the model's tokens, then one more).
class SpecHarness : public SchedulerHarness {
 public:
  using PerRequest = std::function<int32_t(RequestId)>;
  using SchedulerHarness::SchedulerHarness;

  const ScheduledBatch& spec_step(const PerRequest& k, const PerRequest& num_correct) {
    FakeKVModel::Drafts drafts = propose(k, num_correct);
    scheduler.schedule(batch);
    apply(accept_greedy(model.run(batch, &drafts)));
    return batch;
  }

  FakeKVModel::Drafts propose(const PerRequest& k, const PerRequest& num_correct) {
    FakeKVModel::Drafts drafts;
    for (const auto& [id, tokens] : live_) {
      (void)tokens;
      const int32_t granted = scheduler.set_lookahead(id, k(id));
      if (granted == 0) continue;
      std::vector<TokenId> d = model.continuation(id, granted);
      for (int32_t j = num_correct(id); j < granted; ++j) d[j] = (d[j] + 1 + j) % 1000;  // wrong on purpose
      drafts[id] = d;
      proposed_ += granted;
    }
    return drafts;
  }

  // Greedy verification as the runner does it, from the model's token at every verified row.
  std::vector<TokenId> accept_greedy(const std::vector<TokenId>& model_tokens) const {
    std::vector<TokenId> out(model_tokens.size(), -1);
    for (int32_t s = 0; s < batch.num_sampled; ++s) {
      const int32_t begin = batch.verify_offsets[s], end = batch.verify_offsets[s + 1];
      out[begin] = model_tokens[begin];
      for (int32_t v = begin + 1; v < end; ++v) {
        const TokenId draft = last_drafts_at(s, v - begin - 1, model_tokens);
        if (draft != model_tokens[v - 1]) break;
        out[v] = model_tokens[v];
      }
    }
    return out;
  }

  void add(const RequestSpec& spec) {
    SchedulerHarness::add(spec);
    live_[spec.request_id] = true;
  }

  int run_spec(const PerRequest& k, const PerRequest& num_correct, int max_steps = 10000) {
    int steps = 0;
    while (scheduler.has_unfinished() && steps++ < max_steps) {
      drafts_ = propose(k, num_correct);
      scheduler.schedule(batch);
      apply(accept_greedy(model.run(batch, &drafts_)));
      for (const auto& [id, reason] : finished) live_.erase(id);
    }
    return steps;
  }

  int64_t proposed_ = 0;
  FakeKVModel::Drafts drafts_;

 private:
  TokenId last_drafts_at(int32_t sampled_index, int32_t j, const std::vector<TokenId>&) const {
    return drafts_.at(batch.sampled_request_ids[sampled_index]).at(static_cast<size_t>(j));
  }

  std::map<RequestId, bool> live_;
};

std::map<RequestId, std::vector<TokenId>> plain_outputs(const std::vector<RequestSpec>& specs, int32_t num_blocks) {
  SchedulerHarness h(options(), cache(num_blocks));
  for (const auto& s : specs) h.add(s);
  h.run_until_done();
  return h.generated;
}

std::vector<RequestSpec> workload(int count, int32_t prompt_len, int32_t max_new) {
  std::vector<RequestSpec> specs;
  for (int i = 0; i < count; ++i) specs.push_back(make_spec(i + 1, iota_tokens(prompt_len + i, 10 * i + 1), max_new + i));
  return specs;
}

TEST(SchedulerSpec, GreedyOutputsMatchPlainDecodingForAnyAcceptance) {
  const auto specs = workload(5, 9, 23);
  const auto expected = plain_outputs(specs, 256);
  for (int32_t k : {1, 3, 7}) {
    for (int32_t correct : {0, 1, 2, 100}) {
      SpecHarness h(options(), cache(256));
      for (const auto& s : specs) h.add(s);
      h.run_spec([k](RequestId) { return k; }, [correct](RequestId id) { return (correct + static_cast<int32_t>(id)) % 9; });
      EXPECT_EQ(h.generated, expected) << "k=" << k << " correct=" << correct;
      EXPECT_EQ(h.scheduler.num_free_blocks(), 256) << "blocks leaked";
      h.scheduler.check_invariants();
    }
  }
}

TEST(SchedulerSpec, AllDraftsRightTakesFewerSteps) {
  const auto specs = workload(1, 5, 40);
  SchedulerHarness plain(options(), cache(64));
  plain.add(specs[0]);
  const int plain_steps = plain.run_until_done();
  SpecHarness h(options(), cache(64));
  h.add(specs[0]);
  const int spec_steps = h.run_spec([](RequestId) { return 4; }, [](RequestId) { return 100; });
  EXPECT_EQ(h.generated, plain.generated);
  // Prefill, then five tokens per step.
  EXPECT_EQ(spec_steps, 1 + (40 + 4) / 5);
  EXPECT_LT(spec_steps, plain_steps / 4);
}

TEST(SchedulerSpec, RejectedLookaheadBlocksAreFreedAtUpdate) {
  SpecHarness h(options(), cache(32, 4));
  h.add(make_spec(1, iota_tokens(6), 50));
  h.step();  // prefill: 6 tokens + the first sample -> 7 tokens
  const Request* r = h.scheduler.find(1);
  ASSERT_EQ(r->num_tokens(), 7);
  const int32_t free_before = h.scheduler.num_free_blocks();
  h.drafts_ = h.propose([](RequestId) { return 9; }, [](RequestId) { return 0; });
  h.scheduler.schedule(h.batch);
  EXPECT_EQ(h.batch.num_draft_tokens, 9);
  EXPECT_EQ(h.batch.num_tokens, 10);
  EXPECT_EQ(static_cast<int32_t>(r->block_table.size()), (6 + 10 + 3) / 4);  // positions 0..15
  h.apply(h.accept_greedy(h.model.run(h.batch, &h.drafts_)));
  // All drafts rejected: one new token, the table back to what 8 tokens need.
  EXPECT_EQ(r->num_tokens(), 8);
  EXPECT_EQ(r->num_computed_tokens, 7);
  EXPECT_EQ(r->block_table.size(), 2u);
  EXPECT_EQ(h.scheduler.num_free_blocks(), free_before);
}

TEST(SchedulerSpec, PrefixCacheNeverHoldsUnverifiedTokens) {
  // Block size 4: a step verifying 8 drafts from position 7 covers blocks 2 and 3 with drafts.
  SpecHarness h(options(), cache(64, 4));
  h.add(make_spec(1, iota_tokens(7), 30));
  h.step();
  h.drafts_ = h.propose([](RequestId) { return 8; }, [](RequestId) { return 2; });
  const std::vector<TokenId> drafts = h.drafts_.at(1);
  h.scheduler.schedule(h.batch);
  h.apply(h.accept_greedy(h.model.run(h.batch, &h.drafts_)));
  const Request* r = h.scheduler.find(1);
  ASSERT_EQ(r->num_tokens(), 8 + 3);  // 2 accepted + the correction
  EXPECT_LE(r->num_cached_blocks * 4, r->num_computed_tokens);
  // A prompt made of the request's tokens followed by the rejected drafts shares only verified blocks.
  std::vector<TokenId> prompt(r->token_ids.begin(), r->token_ids.begin() + 8);
  prompt.insert(prompt.end(), drafts.begin(), drafts.end());
  const uint64_t hits_before = h.scheduler.stats().prefix_hits;
  h.add(make_spec(2, prompt, 4));
  h.run_spec([](RequestId) { return 3; }, [](RequestId) { return 1; });  // the model checks every KV read
  EXPECT_LE(h.scheduler.stats().prefix_hits - hits_before, 8u);
  EXPECT_EQ(h.scheduler.num_free_blocks(), 64);
}

TEST(SchedulerSpec, PreemptionUnderSpeculationKeepsOutputsAndBlocks) {
  const auto specs = workload(6, 11, 30);
  const auto expected = plain_outputs(specs, 512);
  SpecHarness h(options(48, 6), cache(24, 4));  // too small for all six at once
  for (const auto& s : specs) h.add(s);
  h.run_spec([](RequestId id) { return 2 + static_cast<int32_t>(id) % 4; }, [](RequestId id) { return static_cast<int32_t>(id) % 3; });
  EXPECT_GT(h.scheduler.stats().num_preempted_total, 0u);
  EXPECT_EQ(h.generated, expected);
  EXPECT_EQ(h.scheduler.num_free_blocks(), 24);
}

TEST(SchedulerSpec, ChunkedPrefillMixesWithSpeculativeDecodes) {
  auto specs = workload(3, 5, 20);
  specs.push_back(make_spec(9, iota_tokens(70, 500), 8));  // chunked over several steps (budget 16)
  SchedulerHarness plain(options(16), cache(128));
  for (const auto& s : specs) plain.add(s);
  plain.run_until_done();
  SpecHarness h(options(16), cache(128));
  for (const auto& s : specs) h.add(s);
  h.run_spec([](RequestId) { return 3; }, [](RequestId id) { return static_cast<int32_t>(id) % 4; });
  EXPECT_EQ(h.generated, plain.generated);
  EXPECT_EQ(h.scheduler.num_free_blocks(), 128);
}

TEST(SchedulerSpec, AbortMidSpeculationFreesEverything) {
  SpecHarness h(options(), cache(32, 4));
  h.add(make_spec(1, iota_tokens(6), 50));
  h.add(make_spec(2, iota_tokens(6, 100), 50));
  h.step();
  h.drafts_ = h.propose([](RequestId) { return 6; }, [](RequestId) { return 6; });
  h.scheduler.schedule(h.batch);
  const std::vector<TokenId> verified = h.accept_greedy(h.model.run(h.batch, &h.drafts_));
  EXPECT_TRUE(h.scheduler.abort(1));
  h.apply(verified);
  EXPECT_EQ(h.generated.at(1).size(), 1u);  // only the prefill's token: the verified ones are dropped
  EXPECT_EQ(h.generated.at(2).size(), 1u + 7u);
  EXPECT_TRUE(h.scheduler.abort(2));
  EXPECT_EQ(h.scheduler.num_free_blocks(), 32);
  h.scheduler.check_invariants();
}

TEST(SchedulerSpec, DroppedSpeculativeBatchRollsBackItsLookahead) {
  SpecHarness h(options(), cache(32, 4));
  h.add(make_spec(1, iota_tokens(6), 50));
  h.step();
  const int32_t free_before = h.scheduler.num_free_blocks();
  h.propose([](RequestId) { return 8; }, [](RequestId) { return 8; });
  h.scheduler.schedule(h.batch);
  EXPECT_LT(h.scheduler.num_free_blocks(), free_before);
  h.scheduler.schedule(h.batch);  // the first batch is dropped: no lookahead asked this time
  EXPECT_EQ(h.batch.num_draft_tokens, 0);
  EXPECT_EQ(h.scheduler.num_free_blocks(), free_before);
  h.scheduler.check_invariants();
}

TEST(SchedulerSpec, LookaheadIsCappedByLimitsAndBudget) {
  SpecHarness h(options(8), cache(64, 4));
  h.add(make_spec(1, iota_tokens(5), 4));
  EXPECT_EQ(h.scheduler.set_lookahead(1, 3), 0) << "waiting requests get no lookahead";
  EXPECT_EQ(h.scheduler.set_lookahead(99, 3), 0) << "unknown ids are ignored";
  EXPECT_THROW(h.scheduler.set_lookahead(1, -1), std::invalid_argument);
  h.step();  // 1 token generated; 3 to go: at most 2 drafts (+ the bonus token)
  EXPECT_EQ(h.scheduler.set_lookahead(1, 10), 2);
  EXPECT_EQ(h.scheduler.set_lookahead(1, 0), 0);  // withdrawn
  h.add(make_spec(2, iota_tokens(5, 50), 40));
  h.step();  // request 1 now has 2 tokens to go: one draft
  EXPECT_EQ(h.scheduler.set_lookahead(1, 10), 1);
  EXPECT_EQ(h.scheduler.set_lookahead(2, 20), 20);
  h.scheduler.schedule(h.batch);
  // Budget 8: request 1 takes 2 tokens, request 2 its decode and 5 of its 20 lookahead slots.
  EXPECT_EQ(h.batch.num_tokens, 8);
  EXPECT_EQ(h.batch.num_draft_tokens, 6);
}

TEST(SchedulerSpec, StopTokenAmongAcceptedTokensTruncates) {
  SpecHarness probe(options(), cache(64));
  probe.add(make_spec(1, iota_tokens(5), 30));
  probe.run_until_done();
  const TokenId stop = probe.generated.at(1).at(3);
  SpecHarness h(options(), cache(64));
  h.add(make_spec(1, iota_tokens(5), 30, {stop}));
  h.run_spec([](RequestId) { return 6; }, [](RequestId) { return 100; });
  const std::vector<TokenId> want(probe.generated.at(1).begin(), probe.generated.at(1).begin() + 4);
  EXPECT_EQ(h.generated.at(1), want);
  EXPECT_EQ(h.finished.at(1), FinishReason::STOP);
  EXPECT_EQ(h.scheduler.num_free_blocks(), 64);
}

TEST(SchedulerSpec, CommitRefusesLookaheadAndBadRowsLeaveStateUnchanged) {
  SpecHarness h(options(), cache(32, 4));
  h.add(make_spec(1, iota_tokens(6), 50));
  h.step();
  h.drafts_ = h.propose([](RequestId) { return 3; }, [](RequestId) { return 3; });
  h.scheduler.schedule(h.batch);
  EXPECT_THROW(h.scheduler.commit(h.batch), std::invalid_argument);
  const std::vector<TokenId> tokens = h.accept_greedy(h.model.run(h.batch, &h.drafts_));
  StepOutputs out;
  const std::vector<TokenId> first_missing = {-1, -1, -1, -1};
  EXPECT_THROW(h.scheduler.update(h.batch, first_missing.data(), 4, out), std::invalid_argument);
  const std::vector<TokenId> hole = {tokens[0], -1, 5, -1};
  EXPECT_THROW(h.scheduler.update(h.batch, hole.data(), 4, out), std::invalid_argument);
  EXPECT_THROW(h.scheduler.update(h.batch, tokens.data(), 3, out), std::invalid_argument);
  h.apply(tokens);  // the batch is still the latest: the right tokens apply
  EXPECT_EQ(h.generated.at(1).size(), 5u);
}

TEST(SchedulerSpec, AsyncStepsWithoutLookaheadStillOverlap) {
  // Speculation adapted to zero leaves commit()/resolve() working as before.
  SpecHarness h(options(), cache(32, 4));
  h.add(make_spec(1, iota_tokens(6), 10));
  h.scheduler.schedule(h.batch);
  std::vector<TokenId> sampled = h.model.run(h.batch);
  h.scheduler.commit(h.batch);
  EXPECT_EQ(h.scheduler.set_lookahead(1, 4), 0) << "a pending token cannot be speculated on";
  StepOutputs out;
  h.scheduler.resolve(h.batch, sampled.data(), sampled.size(), out);
  EXPECT_EQ(out.size(), 1u);
}

}  // namespace
}  // namespace rtpllm::testing

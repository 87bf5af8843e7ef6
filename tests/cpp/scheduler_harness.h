// Drives a Scheduler through steps with the FakeKVModel, recording what every request produced.
#pragma once

#include <map>
#include <vector>

#include "fake_kv_model.h"
#include "rtpllm/sched/scheduler.h"

namespace rtpllm::testing {

class SchedulerHarness {
 public:
  SchedulerHarness(const SchedulerOptions& options, const CacheOptions& cache, int32_t vocab_size = 1000)
      : scheduler(options, cache), model(cache.num_blocks, cache.block_size, vocab_size) {}

  void add(const RequestSpec& spec) {
    scheduler.add_request(spec);
    model.add_request(spec.request_id, spec.prompt_token_ids, spec.extra_key);
  }

  // schedule() -> model -> update(); returns the batch that ran.
  const ScheduledBatch& step() {
    scheduler.schedule(batch);
    const std::vector<TokenId> sampled = model.run(batch);
    apply(sampled);
    return batch;
  }

  // update() with the given tokens for the batch from the last schedule().
  void apply(const std::vector<TokenId>& sampled) {
    scheduler.update(batch, sampled.data(), sampled.size(), outputs);
    for (size_t i = 0; i < outputs.size(); ++i) {
      const auto& e = outputs.entry(i);
      for (int32_t t = 0; t < e.token_count; ++t) {
        model.append_token(e.request_id, outputs.tokens(i)[t]);
        generated[e.request_id].push_back(outputs.tokens(i)[t]);
      }
      if (e.finished) finished[e.request_id] = e.finish_reason;
    }
    scheduler.check_invariants();
  }

  int run_until_done(int max_steps = 10000) {
    int steps = 0;
    while (scheduler.has_unfinished() && steps < max_steps) {
      step();
      ++steps;
    }
    return steps;
  }

  Scheduler scheduler;
  FakeKVModel model;
  ScheduledBatch batch;
  StepOutputs outputs;
  std::map<RequestId, std::vector<TokenId>> generated;
  std::map<RequestId, FinishReason> finished;
};

inline RequestSpec make_spec(RequestId id, std::vector<TokenId> prompt, int32_t max_new_tokens,
                             std::vector<TokenId> stop_token_ids = {}) {
  RequestSpec spec;
  spec.request_id = id;
  spec.prompt_token_ids = std::move(prompt);
  spec.max_new_tokens = max_new_tokens;
  spec.stop_token_ids = std::move(stop_token_ids);
  spec.arrival_time = static_cast<double>(id);
  return spec;
}

inline std::vector<TokenId> iota_tokens(int32_t count, TokenId first = 1) {
  std::vector<TokenId> t(static_cast<size_t>(count));
  for (int32_t i = 0; i < count; ++i) t[i] = first + i;
  return t;
}

}  // namespace rtpllm::testing

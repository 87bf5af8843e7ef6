// Scheduler::update(): applying a step's sampled tokens.
#include <algorithm>
#include <stdexcept>
#include <string>

#include "rtpllm/sched/scheduler.h"

namespace rtpllm {

void Scheduler::update(const ScheduledBatch& batch, const TokenId* sampled, size_t num_sampled, StepOutputs& outputs) {
  outputs.clear();
  if (batch.scheduler_id != id_) throw std::invalid_argument("batch: was not produced by this scheduler");
  if (batch.empty()) return;
  if (!in_flight_ || batch.step_id != step_) {
    throw std::invalid_argument("batch: step " + std::to_string(batch.step_id) +
                                " is not the latest scheduled step (update() was already called, or schedule() ran again)");
  }
  if (num_sampled != static_cast<size_t>(batch.num_sampled)) {
    throw std::invalid_argument("sampled_token_ids: expected " + std::to_string(batch.num_sampled) +
                                " tokens (one per logits index), got " + std::to_string(num_sampled));
  }
  for (size_t k = 0; k < num_sampled; ++k) {
    if (sampled[k] < 0) {
      throw std::invalid_argument("sampled_token_ids: token ids must be non-negative, got " + std::to_string(sampled[k]) +
                                  " at index " + std::to_string(k));
    }
  }

  size_t k = 0;
  for (const ScheduledEntry& e : entries_) {
    Request* r = e.request;
    const TokenId token = e.needs_sampling ? sampled[k++] : -1;
    if (r->is_finished()) continue;  // aborted after schedule(): its token is dropped
    r->num_computed_tokens += e.num_new_tokens;
    kv_.cache_computed_blocks(*r);
    if (!e.needs_sampling) continue;
    r->token_ids.push_back(token);
    const FinishReason reason = finish_reason_after(*r, token);
    outputs.add(r->id, &token, 1, reason, reason == FinishReason::STOP ? token : -1);
    if (reason != FinishReason::NONE) finish(r, reason);
  }
  in_flight_ = false;
  aborted_in_flight_.clear();
  remove_finished();
  maybe_check_invariants();
}

FinishReason Scheduler::finish_reason_after(const Request& request, TokenId token) const {
  // NOTE: stop ids count only once min_new_tokens exist, the token itself included (as in vLLM).
  if (request.num_output_tokens() >= request.min_new_tokens && request.is_stop_token(token)) return FinishReason::STOP;
  if (request.num_output_tokens() >= request.max_new_tokens) return FinishReason::LENGTH;
  if (request.num_tokens() >= max_context_len_) return FinishReason::LENGTH;
  return FinishReason::NONE;
}

void Scheduler::finish(Request* request, FinishReason reason) {
  request->status = RequestStatus::FINISHED;
  request->finish_reason = reason;
  if (reason == FinishReason::STOP) request->stop_token_id = request->token_ids.back();
  kv_.free(*request);  // its full blocks were cached above and stay findable
  finished_scratch_.push_back(request->id);
}

void Scheduler::remove_finished() {
  if (finished_scratch_.empty()) return;
  running_.erase(std::remove_if(running_.begin(), running_.end(), [](const Request* r) { return r->is_finished(); }),
                 running_.end());
  for (RequestId id : finished_scratch_) requests_.erase(id);
  finished_scratch_.clear();
}

}  // namespace rtpllm

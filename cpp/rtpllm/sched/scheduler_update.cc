// Scheduler::update() / commit() / resolve(): applying a step's sampled tokens, at once or in two
// halves (see "Asynchronous stepping" in scheduler.h).
#include <algorithm>
#include <stdexcept>
#include <string>

#include "rtpllm/sched/scheduler.h"
#include "rtpllm/sched/speculation.h"

namespace rtpllm {

namespace {

void check_sampled(const ScheduledBatch& batch, const TokenId* sampled, size_t num_sampled) {
  const size_t expected = static_cast<size_t>(batch.num_sampled) + static_cast<size_t>(batch.num_draft_tokens);
  if (num_sampled != expected) {
    throw std::invalid_argument("sampled_token_ids: expected " + std::to_string(expected) +
                                " tokens (one per verified logits index), got " + std::to_string(num_sampled));
  }
  if (batch.num_draft_tokens > 0) {
    for (int32_t s = 0; s < batch.num_sampled; ++s) {
      const int32_t begin = batch.verify_offsets[s];
      count_verified_tokens(sampled + begin, batch.verify_offsets[s + 1] - begin, static_cast<size_t>(begin));
    }
    return;
  }
  for (size_t k = 0; k < num_sampled; ++k) {
    if (sampled[k] < 0) {
      throw std::invalid_argument("sampled_token_ids: token ids must be non-negative, got " + std::to_string(sampled[k]) +
                                  " at index " + std::to_string(k));
    }
  }
}

}  // namespace

void Scheduler::check_batch(const ScheduledBatch& batch) const {
  if (batch.scheduler_id != id_) throw std::invalid_argument("batch: was not produced by this scheduler");
}

void Scheduler::update(const ScheduledBatch& batch, const TokenId* sampled, size_t num_sampled, StepOutputs& outputs) {
  outputs.clear();
  check_batch(batch);
  if (batch.empty()) return;
  if (!committed_.empty()) {
    throw std::invalid_argument("batch: update() with committed steps unresolved; resolve() them first");
  }
  check_sampled(batch, sampled, num_sampled);  // before commit() changes anything
  commit_step(batch);
  resolve(batch, sampled, num_sampled, outputs);
}

void Scheduler::commit(const ScheduledBatch& batch) {
  check_batch(batch);
  if (batch.num_draft_tokens > 0) {
    throw std::invalid_argument("batch: has lookahead slots; speculative steps apply synchronously through update()");
  }
  commit_step(batch);
}

void Scheduler::commit_step(const ScheduledBatch& batch) {
  if (batch.empty()) return;
  if (!in_flight_ || batch.step_id != step_) {
    throw std::invalid_argument("batch: step " + std::to_string(batch.step_id) +
                                " is not the latest scheduled step (already committed, or schedule() ran again)");
  }
  for (const ScheduledEntry& e : entries_) {
    Request* r = e.request;
    if (r->is_finished()) continue;  // aborted after schedule()
    r->num_computed_tokens += e.num_new_tokens - e.num_draft_tokens;  // drafts count once verified
    kv_.cache_computed_blocks(*r);
    if (!e.needs_sampling) continue;
    r->token_ids.push_back(kPendingToken);
    ++r->num_pending_tokens;
    // A length limit needs no token value: a sequence that reached one is not scheduled again.
    if (r->num_output_tokens() >= r->max_new_tokens || r->num_tokens() >= max_context_len_) r->last_token_pending = true;
  }
  committed_.push_back({step_, std::move(entries_)});
  entries_.clear();
  in_flight_ = false;
  maybe_check_invariants();
}

void Scheduler::resolve(const ScheduledBatch& batch, const TokenId* sampled, size_t num_sampled, StepOutputs& outputs) {
  outputs.clear();
  check_batch(batch);
  if (batch.empty()) return;
  if (committed_.empty() || committed_.front().step_id != batch.step_id) {
    throw std::invalid_argument("batch: step " + std::to_string(batch.step_id) + " is not the oldest committed step");
  }
  check_sampled(batch, sampled, num_sampled);

  CommittedStep step = std::move(committed_.front());
  committed_.pop_front();
  size_t k = 0;
  for (const ScheduledEntry& e : step.entries) {
    Request* r = e.request;
    if (!e.needs_sampling) continue;
    const size_t row = k;
    k += 1 + static_cast<size_t>(e.num_draft_tokens);
    if (r->is_finished()) continue;  // a finished request's tokens are dropped
    if (e.num_draft_tokens > 0) {
      resolve_speculative(r, sampled + row, 1 + e.num_draft_tokens, row, outputs);
      continue;
    }
    const TokenId token = sampled[row];
    // The oldest placeholder is this step's token; any later one belongs to a younger step.
    const int32_t pos = r->num_known_tokens();
    r->token_ids[static_cast<size_t>(pos)] = token;
    --r->num_pending_tokens;
    FinishReason reason = finish_reason_after(*r, token, pos + 1);
    if (reason != FinishReason::NONE) {
      // Steps committed after this one computed past the end: forget their placeholders.
      r->token_ids.resize(static_cast<size_t>(pos) + 1);
      r->num_pending_tokens = 0;
      r->num_computed_tokens = std::min(r->num_computed_tokens, pos + 1);
    }
    kv_.cache_computed_blocks(*r);
    outputs.add(r->id, &token, 1, reason, reason == FinishReason::STOP ? token : -1);
    if (reason != FinishReason::NONE) finish(r, reason);
  }
  release_entries(step.entries);
  remove_finished();
  maybe_check_invariants();
}

FinishReason Scheduler::finish_reason_after(const Request& request, TokenId token, int32_t num_tokens) const {
  // NOTE: stop ids count only once min_new_tokens exist, the token itself included (as in vLLM).
  const int32_t num_output = num_tokens - request.num_prompt_tokens;
  if (num_output >= request.min_new_tokens && request.is_stop_token(token)) return FinishReason::STOP;
  if (num_output >= request.max_new_tokens) return FinishReason::LENGTH;
  if (num_tokens >= max_context_len_) return FinishReason::LENGTH;
  return FinishReason::NONE;
}

void Scheduler::finish(Request* request, FinishReason reason) {
  if (request->status == RequestStatus::PREEMPTED) waiting_.remove(request);  // preempted with its token pending
  request->status = RequestStatus::FINISHED;
  request->finish_reason = reason;
  request->last_token_pending = false;
  if (reason == FinishReason::STOP) request->stop_token_id = request->token_ids.back();
  kv_.free(*request);  // its full blocks were cached above and stay findable
  finished_scratch_.push_back(request->id);
}

void Scheduler::remove_finished() {
  if (finished_scratch_.empty()) return;
  running_.erase(std::remove_if(running_.begin(), running_.end(), [](const Request* r) { return r->is_finished(); }),
                 running_.end());
  for (RequestId id : finished_scratch_) {
    const auto it = requests_.find(id);
    if (it == requests_.end()) continue;
    if (it->second->num_steps_referencing > 0) retire(std::move(it->second));
    requests_.erase(it);
  }
  finished_scratch_.clear();
}

void Scheduler::release_entries(const std::vector<ScheduledEntry>& entries) {
  bool any_retired = false;
  for (const ScheduledEntry& e : entries) {
    if (e.request == nullptr) continue;
    --e.request->num_steps_referencing;
    any_retired |= e.request->is_finished();
  }
  if (!any_retired) return;
  retired_.erase(std::remove_if(retired_.begin(), retired_.end(),
                                [](const std::unique_ptr<Request>& r) { return r->num_steps_referencing == 0; }),
                 retired_.end());
}

void Scheduler::retire(std::unique_ptr<Request> request) { retired_.push_back(std::move(request)); }

}  // namespace rtpllm

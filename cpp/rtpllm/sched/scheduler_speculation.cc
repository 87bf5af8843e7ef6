// Scheduler members for speculative decoding (see speculation.h): lookahead requests, scheduling
// a decode with its lookahead slots, applying verified tokens, rolling back a dropped step.
#include <algorithm>
#include <stdexcept>
#include <string>

#include "rtpllm/sched/scheduler.h"
#include "rtpllm/sched/speculation.h"

namespace rtpllm {

int32_t Scheduler::set_lookahead(RequestId request_id, int32_t num_tokens) {
  if (num_tokens < 0) throw std::invalid_argument("num_tokens: must be >= 0, got " + std::to_string(num_tokens));
  const auto it = requests_.find(request_id);
  if (it == requests_.end()) return 0;
  Request* r = it->second.get();
  // Only a plain decode qualifies: running, one known token left to compute, no token pending.
  // (A scheduled, uncommitted step may still name it: the next schedule() drops that step.)
  if (r->status != RequestStatus::RUNNING || r->num_pending_tokens > 0 || r->num_tokens() - r->num_computed_tokens != 1) {
    return 0;
  }
  const int32_t granted = std::min(num_tokens, max_lookahead(*r, max_context_len_));
  if (granted > 0 && r->num_lookahead_tokens == 0) lookahead_ids_.push_back(request_id);
  r->num_lookahead_tokens = granted;
  return granted;
}

void Scheduler::schedule_decode(Request* request, int32_t& budget, bool& preempted) {
  // The limits again: the request may have gained tokens since set_lookahead().
  const int32_t k = std::min({request->num_lookahead_tokens, budget - 1, max_lookahead(*request, max_context_len_)});
  request->num_lookahead_tokens = 0;
  // Lookahead slots are never worth a preemption: short of blocks, decode without them.
  if (k > 0 && kv_.allocate_slots(*request, 1 + k)) {
    request->scheduled_step = step_;
    ++request->num_steps_referencing;
    request->num_draft_slots = k;
    entries_.push_back({request, 1 + k, true, k});
    budget -= 1 + k;
    return;
  }
  schedule_running(request, 1, budget, preempted);
}

void Scheduler::clear_lookahead() {
  for (RequestId id : lookahead_ids_) {
    const auto it = requests_.find(id);
    if (it != requests_.end()) it->second->num_lookahead_tokens = 0;
  }
  lookahead_ids_.clear();
}

void Scheduler::resolve_speculative(Request* r, const TokenId* row, int32_t num_slots, size_t index,
                                    StepOutputs& outputs) {
  const int32_t num_verified = count_verified_tokens(row, num_slots, index);
  // Synchronous (commit() refuses lookahead): the one placeholder is the last token.
  r->token_ids.pop_back();
  --r->num_pending_tokens;
  r->num_draft_slots = 0;
  FinishReason reason = FinishReason::NONE;
  int32_t appended = 0;
  while (appended < num_verified && reason == FinishReason::NONE) {
    // Token j > 0 follows an accepted draft, whose KV was computed from that very token.
    if (appended > 0) ++r->num_computed_tokens;
    r->token_ids.push_back(row[appended++]);
    reason = finish_reason_after(*r, r->token_ids.back(), r->num_tokens());
  }
  kv_.truncate(*r, r->num_tokens());  // rejected positions' blocks
  kv_.cache_computed_blocks(*r);
  outputs.add(r->id, row, appended, reason, reason == FinishReason::STOP ? r->token_ids.back() : -1);
  if (reason != FinishReason::NONE) finish(r, reason);
}

void Scheduler::roll_back_lookahead(const std::vector<ScheduledEntry>& entries) {
  for (const ScheduledEntry& e : entries) {
    Request* r = e.request;
    if (r == nullptr || e.num_draft_tokens == 0 || r->is_finished() || r->num_draft_slots == 0) continue;
    r->num_draft_slots = 0;
    kv_.truncate(*r, r->num_tokens());
  }
}

}  // namespace rtpllm

#include "rtpllm/sched/scheduler.h"

#include <algorithm>
#include <atomic>
#include <stdexcept>
#include <string>
#include <tuple>

namespace rtpllm {
namespace {

const SchedulerOptions& validated(const SchedulerOptions& options) {
  options.validate();
  return options;
}

uint64_t next_scheduler_id() {
  static std::atomic<uint64_t> counter{1};
  return counter.fetch_add(1);
}

}  // namespace

Scheduler::Scheduler(const SchedulerOptions& options, const CacheOptions& cache_options)
    : options_(validated(options)),
      kv_(cache_options),
      max_context_len_(std::min(options.max_model_len, cache_options.num_blocks * cache_options.block_size)),
      id_(next_scheduler_id()) {
  running_.reserve(static_cast<size_t>(options.max_num_seqs));
  entries_.reserve(static_cast<size_t>(options.max_num_seqs));
}

void Scheduler::add_request(const RequestSpec& spec) {
  if (requests_.count(spec.request_id) != 0) {
    throw std::invalid_argument("request_id: " + std::to_string(spec.request_id) + " is already in the scheduler");
  }
  auto request = std::make_unique<Request>(spec);  // validates the spec itself
  const int32_t n = request->num_tokens();
  if (n > options_.max_model_len) {
    throw std::invalid_argument("prompt_token_ids: " + std::to_string(n) + " tokens exceed max_model_len=" +
                                std::to_string(options_.max_model_len));
  }
  if (n > max_context_len_) {
    throw std::invalid_argument("prompt_token_ids: " + std::to_string(n) + " tokens need more KV blocks than the pool has (" +
                                std::to_string(kv_.num_blocks()) + " blocks of " + std::to_string(kv_.block_size()) + ")");
  }
  if (!options_.enable_chunked_prefill && n > options_.max_num_batched_tokens) {
    throw std::invalid_argument("prompt_token_ids: " + std::to_string(n) + " tokens exceed max_num_batched_tokens=" +
                                std::to_string(options_.max_num_batched_tokens) + " and chunked prefill is disabled");
  }
  request->admission_order = next_admission_order_++;
  waiting_.push_new(request.get());
  requests_.emplace(spec.request_id, std::move(request));
  maybe_check_invariants();
}

ScheduledBatch Scheduler::schedule() {
  ScheduledBatch batch;
  schedule(batch);
  return batch;
}

void Scheduler::schedule(ScheduledBatch& batch) {
  // A batch still in flight (never committed) is dropped: its tokens were never marked computed,
  // so they simply get scheduled again.
  if (in_flight_) {
    roll_back_lookahead(entries_);
    release_entries(entries_);
  }
  entries_.clear();
  if (transfers_) poll_kv_transfers();  // first: no block may be allocated before saves hold theirs
  ++step_;
  int32_t budget = options_.max_num_batched_tokens;
  bool preempted = false;

  // Decode-first: one token per running sequence that has exactly one left.
  for (size_t i = 0; i < running_.size() && budget > 0; ++i) {
    Request* r = running_[i];
    if (r->status == RequestStatus::RUNNING && !r->last_token_pending && r->num_tokens() - r->num_computed_tokens == 1) {
      schedule_decode(r, budget, preempted);
    }
  }
  // Then the next chunk of running prefills (or of a preempted request's recompute).
  for (size_t i = 0; i < running_.size() && budget > 0; ++i) {
    Request* r = running_[i];
    if (r->status != RequestStatus::RUNNING || r->scheduled_step == step_ || r->last_token_pending) continue;
    const int32_t chunk = chunk_size(r->num_tokens() - r->num_computed_tokens, budget);
    if (chunk > 0) schedule_running(r, chunk, budget, preempted);
  }
  if (preempted) {
    running_.erase(std::remove_if(running_.begin(), running_.end(),
                                  [](const Request* r) { return r->status != RequestStatus::RUNNING; }),
                   running_.end());
  } else {
    admit_waiting(budget);
  }
  clear_lookahead();

  // Drop the slots of entries whose request was preempted after being scheduled.
  entries_.erase(std::remove_if(entries_.begin(), entries_.end(), [](const ScheduledEntry& e) { return e.request == nullptr; }),
                 entries_.end());
  build_scheduled_batch(entries_, kv_.block_size(), batch);
  batch.scheduler_id = id_;
  batch.step_id = step_;
  in_flight_ = !entries_.empty();
  if (transfers_) transfers_->observe_step(batch.num_tokens);  // what recomputing costs, against slow tiers
  maybe_check_invariants();
}

int32_t Scheduler::chunk_size(int32_t remaining, int32_t budget) const {
  if (remaining <= budget) return remaining;
  // Without chunked prefill a prompt waits for a step with room for all of it, unless it is
  // longer than any step (a preempted request's prompt + outputs can be): then it must chunk.
  if (options_.enable_chunked_prefill || remaining > options_.max_num_batched_tokens) return budget;
  return 0;
}

void Scheduler::schedule_running(Request* request, int32_t num_new_tokens, int32_t& budget, bool& preempted) {
  // Out of blocks: preempt the least important running request until this one fits, or it is
  // itself the least important. Since the context limit is capped at the pool's capacity, a
  // request left alone always fits, so this terminates.
  while (!kv_.allocate_slots(*request, num_new_tokens)) {
    Request* victim = pick_victim();
    preempt(victim, budget);
    preempted = true;
    if (victim == request) return;
  }
  request->scheduled_step = step_;
  ++request->num_steps_referencing;
  entries_.push_back({request, num_new_tokens, request->num_computed_tokens + num_new_tokens == request->num_tokens()});
  budget -= num_new_tokens;
}

Request* Scheduler::pick_victim() const {
  Request* victim = nullptr;
  for (Request* r : running_) {
    if (r->status != RequestStatus::RUNNING) continue;
    if (victim == nullptr || std::make_tuple(r->priority, r->arrival_time, r->admission_order) >
                                 std::make_tuple(victim->priority, victim->arrival_time, victim->admission_order)) {
      victim = r;
    }
  }
  if (victim == nullptr) throw std::logic_error("Scheduler: out of KV blocks with no running request to preempt");
  return victim;
}

void Scheduler::preempt(Request* victim, int32_t& budget) {
  if (victim->scheduled_step == step_) {
    // Already scheduled this step: give its tokens back to the budget and drop its entry.
    for (ScheduledEntry& e : entries_) {
      if (e.request != victim) continue;
      budget += e.num_new_tokens;
      e.request = nullptr;
      --victim->num_steps_referencing;
    }
    victim->scheduled_step = -1;
  }
  kv_.free(*victim);
  victim->num_computed_tokens = 0;
  victim->num_draft_slots = 0;
  victim->status = RequestStatus::PREEMPTED;
  ++victim->num_preemptions;
  ++num_preempted_total_;
  waiting_.push_preempted(victim);
}

void Scheduler::admit_waiting(int32_t& budget) {
  while (!waiting_.empty() && budget > 0 &&
         running_.size() + static_cast<size_t>(num_waiting_for_kv()) < static_cast<size_t>(options_.max_num_seqs)) {
    Request* r = waiting_.front();
    if (r->num_pending_tokens > 0) break;  // preempted before its last token was resolved: next step
    const PrefixHit hit = kv_.find_cached_prefix(*r);
    if (transfers_) {
      const TierAdmission tier = admit_from_tiers(r, hit);
      if (tier == TierAdmission::NO_ROOM) break;
      if (tier == TierAdmission::WAITING_FOR_KV) continue;  // costs no budget: the next one may come in
    }
    const int32_t chunk = chunk_size(r->num_tokens() - hit.num_tokens, budget);
    if (chunk == 0 || !kv_.allocate_slots(*r, chunk, &hit)) break;  // the head waits; nobody overtakes it
    waiting_.pop_front();
    r->status = RequestStatus::RUNNING;
    r->scheduled_step = step_;
    ++r->num_steps_referencing;
    running_.push_back(r);
    entries_.push_back({r, chunk, r->num_computed_tokens + chunk == r->num_tokens()});
    budget -= chunk;
  }
}

bool Scheduler::abort(RequestId request_id, FinishReason reason) {
  if (reason == FinishReason::NONE) throw std::invalid_argument("reason: must be a finish reason, not NONE");
  const auto it = requests_.find(request_id);
  if (it == requests_.end()) return false;
  Request* r = it->second.get();
  if (r->status == RequestStatus::RUNNING) {
    running_.erase(std::find(running_.begin(), running_.end(), r));
    kv_.free(*r);
  } else if (r->status == RequestStatus::WAITING_FOR_KV) {
    const auto remote = std::find(remote_waiting_.begin(), remote_waiting_.end(), r);
    if (remote != remote_waiting_.end()) {
      remote_waiting_.erase(remote);  // the caller holds the blocks (hold_blocks) while the peer may write
    } else {
      transfers_->detach(*r);  // the load keeps its own hold on the blocks until it ends
    }
    kv_.free(*r);
  } else {
    waiting_.remove(r);
  }
  r->status = RequestStatus::FINISHED;
  r->finish_reason = reason;
  if (r->num_steps_referencing > 0) retire(std::move(it->second));
  requests_.erase(it);
  maybe_check_invariants();
  return true;
}

const Request* Scheduler::find(RequestId request_id) const {
  const auto it = requests_.find(request_id);
  return it == requests_.end() ? nullptr : it->second.get();
}

SchedulerStats Scheduler::stats() const {
  SchedulerStats s;
  s.num_running = num_running();
  s.num_waiting = num_waiting();
  s.num_preempted_total = num_preempted_total_;
  s.blocks_total = kv_.num_blocks();
  s.num_free_blocks = kv_.num_free_blocks();
  s.blocks_used = s.blocks_total - s.num_free_blocks;
  s.num_cached_blocks = kv_.pool().num_cached_blocks();
  s.num_evicted_blocks = kv_.pool().num_evictions();
  s.prefix_queries = kv_.num_prefix_query_tokens();
  s.prefix_hits = kv_.num_prefix_hit_tokens();
  s.kv_usage = kv_.usage();
  s.num_steps = static_cast<uint64_t>(step_);
  if (transfers_) add_kv_stats(s);
  s.num_waiting_for_kv += num_waiting_for_remote_kv();
  s.kv_transfer_held_blocks += num_held_blocks();
  return s;
}

void Scheduler::maybe_check_invariants() const {
#ifdef RTPLLM_CHECK_INVARIANTS
  check_invariants();
#endif
}

}  // namespace rtpllm

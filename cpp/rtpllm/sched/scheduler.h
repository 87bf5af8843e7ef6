// Continuous-batching scheduler with chunked prefill, prefix caching and preemption by recompute.
//
// One step:  schedule() -> ScheduledBatch -> (model forward + sampling) -> update(batch, sampled).
//
// schedule() spends a token budget (max_num_batched_tokens) in this order:
//   1. decode-first: every running sequence with one token left to compute gets it;
//   2. running sequences in the middle of a (chunked) prefill get their next chunk;
//   3. waiting requests are admitted from the head of the queue (prefix hit first, then a chunk
//      or, with chunked prefill off, the whole remaining prompt) while sequences, budget and
//      blocks last. Skipped in a step that had to preempt, which would only churn.
// When a running sequence needs a block and none is free, the least important running request
// (largest priority value, then latest arrival) is preempted by recompute: its blocks are freed
// (full blocks stay in the prefix cache), its generated tokens are kept, and it goes back to the
// head of the waiting queue to recompute prompt + generated tokens later.
//
// KV positions: a step computes tokens [num_computed, num_computed + n) of a sequence. The token a
// step samples is computed by the next step: after a prefill of P tokens samples t0, the next
// step's input is t0 at position P, and seq_len becomes P + 1. num_computed_tokens advances in
// update(), so a batch dropped without update() (schedule() called again) counts as not run.
//
// Finishing: a sampled token in stop_token_ids (once min_new_tokens exist) -> STOP; max_new_tokens
// generated -> LENGTH; context reaching the limit -> LENGTH. The context limit is max_model_len,
// capped at the pool's capacity (num_blocks * block_size) so that a lone sequence always fits
// and preemption can never loop.
//
// Asynchronous stepping (the engine overlaps its host work with the device): after launching a
// batch, commit() marks its tokens computed and gives every sampling sequence a placeholder for
// the token still on the device, so schedule() can plan the next step at once (the runner takes
// those input tokens from the device). resolve() later fills the placeholders, oldest committed
// batch first, and only then are stop tokens seen: a sequence that stopped has been scheduled
// once more for nothing, and that step's result for it is dropped. Length limits need no token
// value, so a sequence at its limit is not scheduled again. update() is commit() + resolve().
//
// Tiers below the GPU pool (set_kv_connector; host memory, disk, ...): admission looks a
// request's prefix up there after the GPU prefix cache. When the tiers hold more, the request
// gets its GPU blocks and waits (WAITING_FOR_KV) while they load, without holding up the step
// loop or the queue behind it; once loaded, only the rest of its prompt is computed. A failed or
// timed-out load means recomputing those tokens. Blocks newly registered in the prefix cache are
// saved to the tiers. (scheduler_kv.cc, kv_transfers.h)
//
// Prefill-decode disaggregation (scheduler_pd.cc): on a decode instance, add_remote_prefill()
// admits a request whose whole prompt's KV a prefill peer writes: blocks for the whole prompt at
// once (a local prefix hit counts), status WAITING_FOR_KV, never scheduled; complete_remote_prefill()
// then makes it a running request with its prompt computed and the peer's first token appended.
// Block holds (hold_blocks/release_blocks) keep a request's blocks out of the free list past its
// end, while a transfer engine may still read (prefill) or write (decode) them.
//
// Not thread-safe: the engine calls it from its step loop (from Python the GIL serializes calls).
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <unordered_map>
#include <vector>

#include "rtpllm/cache/kv_cache_manager.h"
#include "rtpllm/core/request.h"
#include "rtpllm/core/step_output.h"
#include "rtpllm/kvstore/kv_connector.h"
#include "rtpllm/sched/kv_transfers.h"
#include "rtpllm/sched/scheduled_batch.h"
#include "rtpllm/sched/scheduler_options.h"
#include "rtpllm/sched/scheduler_stats.h"
#include "rtpllm/sched/waiting_queue.h"

namespace rtpllm {

class Scheduler {
 public:
  // Throws std::invalid_argument naming the bad option.
  Scheduler(const SchedulerOptions& options, const CacheOptions& cache_options);

  // Queues a request. Throws std::invalid_argument naming the bad field (empty prompt, a prompt
  // longer than the context limit, a duplicate id, ...), leaving the scheduler unchanged.
  void add_request(const RequestSpec& spec);

  // Plans the next step into `batch`, reusing its buffers. An empty batch means nothing can run.
  void schedule(ScheduledBatch& batch);
  ScheduledBatch schedule();

  // Applies the step's results. `sampled` holds one token per entry of batch.logits_indices, in
  // order. Appends them, checks stops, frees the blocks of finished requests (caching their full
  // blocks) and reports every request that gained a token or finished into `outputs`.
  // Requests aborted since schedule() are skipped (their sampled token is dropped).
  // Throws std::invalid_argument for a batch that is not this scheduler's latest, or a wrong count.
  void update(const ScheduledBatch& batch, const TokenId* sampled, size_t num_sampled, StepOutputs& outputs);

  // Speculative decoding (speculation.h): `sampled` then holds one token per verified row
  // (batch.verify_offsets): per sequence its accepted drafts and one more token, then -1s.

  // Marks the latest scheduled batch as run, its sampled tokens still unknown (see above).
  // Throws std::invalid_argument for a batch that is not the latest scheduled one, or one with
  // lookahead slots (speculative steps apply synchronously, through update()).
  void commit(const ScheduledBatch& batch);
  // Fills the placeholders of the oldest committed batch with its sampled tokens; then as update().
  // Throws std::invalid_argument when `batch` is not the oldest committed one, or a wrong count.
  void resolve(const ScheduledBatch& batch, const TokenId* sampled, size_t num_sampled, StepOutputs& outputs);
  int32_t num_committed_unresolved() const { return static_cast<int32_t>(committed_.size()); }

  // Asks for up to `num_tokens` lookahead slots in the request's next step (speculation.h);
  // returns how many it gets: 0 unless it is running with one known token left to compute and
  // no token pending, capped so that accepting all stays within max_new_tokens and the context
  // limit. The next schedule() may grant fewer (token budget, free blocks) and forgets the rest.
  int32_t set_lookahead(RequestId request_id, int32_t num_tokens);

  // Finishes a request now, whatever its state (also between schedule() and update()), and frees
  // its blocks. No StepOutput follows: the caller already knows. `reason` must not be NONE.
  // Returns false for an unknown or already finished id, so a repeated abort is harmless.
  bool abort(RequestId request_id, FinishReason reason = FinishReason::ABORT);

  int32_t num_running() const { return static_cast<int32_t>(running_.size()); }
  int32_t num_waiting() const { return static_cast<int32_t>(waiting_.size()); }
  bool has_unfinished() const { return !requests_.empty(); }
  int32_t num_free_blocks() const { return kv_.num_free_blocks(); }
  int32_t max_context_len() const { return max_context_len_; }
  SchedulerStats stats() const;
  const Request* find(RequestId request_id) const;  // nullptr when unknown or finished
  const SchedulerOptions& options() const { return options_; }
  const CacheOptions& cache_options() const { return kv_.options(); }

  // Forwarded to the block pool (see BlockEvictionListener).
  void set_eviction_listener(BlockEvictionListener* listener) { kv_.set_eviction_listener(listener); }
  // Forwarded to the block pool and the KV connector's tiers (see KVEventLog): stored and evicted
  // block hashes per tier, for the router.
  void set_kv_event_log(KVEventLog* log);
  std::vector<BlockHash> cached_block_hashes() const { return kv_.pool().cached_hashes(); }
  // The blocks the KV connector's tiers hold now, as kStored events (empty without a connector).
  std::vector<KVEvent> tier_held_blocks();

  // Attaches the tiers below the GPU pool (nullptr detaches). A load pending longer than
  // load_timeout_s is given up and its tokens recomputed. Throws std::logic_error while requests
  // or transfers are unfinished.
  void set_kv_connector(std::shared_ptr<KVConnector> connector, double load_timeout_s = 30.0);
  // Submits the saves of newly cached blocks and polls every transfer (schedule() starts with
  // this); for callers that wait for transfers with no step to run.
  void poll_kv_transfers();
  int32_t num_waiting_for_kv() const {
    return (transfers_ ? transfers_->num_waiting_requests() : 0) + num_waiting_for_remote_kv();
  }
  // Loads or saves under way (they hold GPU blocks), or blocks cached since the last schedule()
  // and not yet submitted for saving: schedule() submits and polls them, also with no request.
  bool has_pending_kv_transfers() const { return transfers_ && (transfers_->has_pending() || kv_.has_newly_cached()); }

  // Prefill-decode disaggregation (see above). add_remote_prefill: false, changing nothing, when
  // the pool or the batch has no room now; std::invalid_argument as add_request for a bad spec.
  bool add_remote_prefill(const RequestSpec& spec);
  // The peer wrote every layer and sampled `first_token`: the request runs on (or finishes: a stop
  // token, max_new_tokens 1), reported into `outputs` as a step would. False for an id that is not
  // waiting for a peer (aborted meanwhile).
  bool complete_remote_prefill(RequestId request_id, TokenId first_token, StepOutputs& outputs);
  int32_t num_waiting_for_remote_kv() const { return static_cast<int32_t>(remote_waiting_.size()); }
  // One extra reference on each block of the request's block table now; returns the hold's id
  // (> 0), or 0 for an unknown request. release_blocks: false for an unknown hold.
  int64_t hold_blocks(RequestId request_id);
  bool release_blocks(int64_t hold_id);
  int32_t num_held_blocks() const;

  // Verifies block ownership and request bookkeeping; throws std::logic_error on a violation.
  // Also runs after every call that changes state in builds with RTPLLM_CHECK_INVARIANTS.
  void check_invariants() const;

 private:
  int32_t chunk_size(int32_t remaining, int32_t budget) const;
  void schedule_running(Request* request, int32_t num_new_tokens, int32_t& budget, bool& preempted);
  void admit_waiting(int32_t& budget);
  Request* pick_victim() const;
  void preempt(Request* victim, int32_t& budget);
  // As if the request's token list ended after its first num_tokens tokens, the last one `token`.
  FinishReason finish_reason_after(const Request& request, TokenId token, int32_t num_tokens) const;
  void finish(Request* request, FinishReason reason);
  void remove_finished();
  void release_entries(const std::vector<ScheduledEntry>& entries);
  void commit_step(const ScheduledBatch& batch);
  // Speculation (scheduler_speculation.cc).
  void schedule_decode(Request* request, int32_t& budget, bool& preempted);
  void clear_lookahead();
  void resolve_speculative(Request* request, const TokenId* row, int32_t num_slots, size_t index, StepOutputs& outputs);
  void roll_back_lookahead(const std::vector<ScheduledEntry>& entries);
  void retire(std::unique_ptr<Request> request);
  void check_batch(const ScheduledBatch& batch) const;
  // scheduler_kv.cc
  enum class TierAdmission : uint8_t { NOT_FROM_TIERS, WAITING_FOR_KV, NO_ROOM };
  TierAdmission admit_from_tiers(Request* request, const PrefixHit& hit);
  void check_kv_invariants(std::vector<int32_t>& holders) const;
  void add_kv_stats(SchedulerStats& stats) const;
  void maybe_check_invariants() const;
  // scheduler_pd.cc
  void check_pd_invariants(std::vector<int32_t>& holders) const;

  SchedulerOptions options_;
  KVCacheManager kv_;
  int32_t max_context_len_;
  uint64_t id_;  // tells this scheduler's batches apart from another's

  std::unordered_map<RequestId, std::unique_ptr<Request>> requests_;  // every unfinished request
  std::vector<Request*> running_;  // admission order
  WaitingQueue waiting_;
  // Finished (or aborted) requests that a scheduled or committed step still names: kept until the
  // last of those steps is resolved or dropped.
  std::vector<std::unique_ptr<Request>> retired_;

  struct CommittedStep {
    int64_t step_id;
    std::vector<ScheduledEntry> entries;
  };
  std::deque<CommittedStep> committed_;  // committed, not yet resolved, oldest first

  std::vector<ScheduledEntry> entries_;  // the step in flight (scheduled, not committed), in batch order
  int64_t step_ = 0;
  bool in_flight_ = false;
  uint64_t next_admission_order_ = 0;
  uint64_t num_preempted_total_ = 0;
  std::vector<RequestId> finished_scratch_;
  std::vector<RequestId> lookahead_ids_;  // requests given lookahead slots since the last schedule()
  KVEventLog* kv_event_log_ = nullptr;
  std::unique_ptr<KVTransfers> transfers_;  // null without a KV connector
  std::vector<KVTransfers::EndedLoad> ended_loads_;  // scratch
  std::vector<Request*> remote_waiting_;  // WAITING_FOR_KV from a prefill peer, admission order
  std::unordered_map<int64_t, std::vector<BlockId>> block_holds_;
  int64_t next_hold_id_ = 1;
};

}  // namespace rtpllm

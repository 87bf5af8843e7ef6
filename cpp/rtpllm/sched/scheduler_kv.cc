// The Scheduler's use of the tiers below the GPU pool (see "Tiers below the GPU pool" in
// scheduler.h): admission through a load, polling loads and saves, their invariants and stats.
// The bookkeeping of transfers themselves lives in KVTransfers.
#include <algorithm>
#include <stdexcept>
#include <string>

#include "rtpllm/sched/scheduler.h"

namespace rtpllm {

void Scheduler::set_kv_connector(std::shared_ptr<KVConnector> connector, double load_timeout_s) {
  if (has_unfinished() || has_pending_kv_transfers() || !retired_.empty()) {
    throw std::logic_error("set_kv_connector: requests or transfers are still unfinished");
  }
  std::vector<std::pair<BlockHash, BlockId>> cached_before;
  kv_.take_newly_cached(cached_before);  // blocks cached before these tiers existed are not saved
  if (!connector) {
    transfers_.reset();
    kv_.set_record_cached_blocks(false);
    return;
  }
  transfers_ = std::make_unique<KVTransfers>(std::move(connector), kv_, load_timeout_s);
  if (kv_event_log_ != nullptr) transfers_->set_event_log(kv_event_log_);
  kv_.set_record_cached_blocks(kv_.options().enable_prefix_caching);
}

std::vector<KVEvent> Scheduler::tier_held_blocks() {
  std::vector<KVEvent> out;
  if (transfers_) transfers_->connector().held_blocks(out);
  return out;
}

void Scheduler::set_kv_event_log(KVEventLog* log) {
  kv_event_log_ = log;
  kv_.set_event_log(log);
  if (transfers_) transfers_->set_event_log(log);
}

Scheduler::TierAdmission Scheduler::admit_from_tiers(Request* r, const PrefixHit& hit) {
  if (r->skip_kv_tiers || !kv_.options().enable_prefix_caching) return TierAdmission::NOT_FROM_TIERS;
  const int32_t bs = kv_.block_size();
  // As with the GPU prefix cache, the last token is never covered: it must be computed for logits.
  const int32_t max_blocks = (r->num_tokens() - 1) / bs;
  const auto first = static_cast<int32_t>(hit.blocks.size());
  if (first >= max_blocks) return TierAdmission::NOT_FROM_TIERS;
  const std::vector<BlockHash>& hashes = kv_.hash_full_blocks(*r, max_blocks);
  int32_t count = transfers_->match(std::vector<BlockHash>(hashes.begin() + first, hashes.end()));
  if (count == 0) return TierAdmission::NOT_FROM_TIERS;
  // Blocks for the hit and the loaded part; the rest of the prompt gets its blocks once it runs.
  // A pool too full for the whole part loads what fits rather than wait: the rest is computed.
  int32_t revived = 0;  // hit blocks nobody holds cost free blocks too
  for (BlockId b : hit.blocks) revived += kv_.pool().ref_count(b) == 0 ? 1 : 0;
  count = std::min(count, kv_.num_free_blocks() - revived);
  if (count <= 0 || !kv_.allocate_slots(*r, count * bs, &hit)) return TierAdmission::NO_ROOM;
  if (!transfers_->start_load(*r, first, count)) {
    kv_.free(*r);  // the connector refused: admit it the ordinary way
    r->num_computed_tokens = 0;
    r->skip_kv_tiers = true;
    return TierAdmission::NOT_FROM_TIERS;
  }
  waiting_.pop_front();
  r->status = RequestStatus::WAITING_FOR_KV;
  return TierAdmission::WAITING_FOR_KV;
}

void Scheduler::poll_kv_transfers() {
  if (!transfers_) return;
  transfers_->save_newly_cached(/*now=*/running_.empty());
  ended_loads_.clear();
  transfers_->poll(ended_loads_);
  for (const KVTransfers::EndedLoad& e : ended_loads_) {
    Request* r = e.request;
    if (e.end == KVTransfers::LoadEnd::DONE) {
      r->num_computed_tokens += e.num_blocks * kv_.block_size();
      // Findable on the GPU now, and recorded for saving: the first tier skips what it holds, so
      // only blocks that came from a lower tier (the disk) are copied up into it (promotion: the
      // next time they leave the GPU, they come back from host memory).
      kv_.cache_computed_blocks(*r, /*record=*/true);
      r->status = RequestStatus::RUNNING;
      running_.push_back(r);
      continue;
    }
    // Failed or timed out: recompute from scratch, without asking the tiers again. The blocks go
    // back now; the transfer's own hold keeps the loaded ones out of reach until it ends.
    kv_.free(*r);
    r->num_computed_tokens = 0;
    r->skip_kv_tiers = true;
    r->status = r->num_preemptions > 0 ? RequestStatus::PREEMPTED : RequestStatus::WAITING;
    waiting_.push_preempted(r);
  }
  maybe_check_invariants();
}

void Scheduler::check_kv_invariants(std::vector<int32_t>& holders) const {
  if (!transfers_) return;
  auto fail = [](const std::string& what) { throw std::logic_error("Scheduler invariant violated: " + what); };
  const int32_t bs = kv_.block_size();
  transfers_->for_each_waiting([&](const Request& r, int32_t num_loading) {
    const std::string name = "request " + std::to_string(r.id);
    const auto it = requests_.find(r.id);
    if (it == requests_.end() || it->second.get() != &r) fail(name + " waits for KV but is not registered");
    if (r.status != RequestStatus::WAITING_FOR_KV) fail(name + " waits for KV with status " + to_string(r.status));
    if (r.num_computed_tokens % bs != 0) fail(name + " waits for KV with a partial block computed");
    const int32_t expected = r.num_computed_tokens / bs + num_loading;
    if (static_cast<int32_t>(r.block_table.size()) != expected) fail(name + " waits for KV holding the wrong number of blocks");
    if (expected * bs >= r.num_tokens()) fail(name + " loads its last token");
    for (BlockId b : r.block_table) ++holders.at(static_cast<size_t>(b));
  });
  transfers_->count_held_blocks(holders);
}

void Scheduler::add_kv_stats(SchedulerStats& s) const {
  s.num_waiting_for_kv = transfers_->num_waiting_requests();
  s.kv_tier_hit_blocks = transfers_->num_loaded_blocks();
  s.kv_tier_failed_loads = transfers_->num_failed_loads() + transfers_->num_timed_out_loads();
  s.kv_tier_saved_blocks = transfers_->num_saved_blocks();
  s.kv_transfer_held_blocks = transfers_->num_held_blocks();
}

}  // namespace rtpllm

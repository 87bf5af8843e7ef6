// Scheduler::check_invariants(): block ownership and request bookkeeping, checked from scratch.
#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "rtpllm/cache/block_hash.h"
#include "rtpllm/sched/scheduler.h"

namespace rtpllm {
namespace {

[[noreturn]] void fail(const std::string& what) { throw std::logic_error("Scheduler invariant violated: " + what); }

std::string name(const Request& r) { return "request " + std::to_string(r.id); }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

void Scheduler::check_invariants() const {
  kv_.pool().check_invariants();
  const int32_t bs = kv_.block_size();
  const int32_t num_blocks = kv_.num_blocks();

  const auto num_loading = static_cast<size_t>(num_waiting_for_kv());
  if (running_.size() + waiting_.size() + num_loading != requests_.size()) {
    fail(std::to_string(requests_.size()) + " requests, but " + std::to_string(running_.size()) + " running + " +
         std::to_string(waiting_.size()) + " waiting + " + std::to_string(num_loading) + " waiting for KV");
  }
  if (running_.size() + num_loading > static_cast<size_t>(options_.max_num_seqs)) {
    fail("more running (or loading) sequences than max_num_seqs");
  }

  // With the counts equal, every queued request registered and none queued twice, the queues
  // hold exactly the registered requests.
  std::vector<const Request*> seen;
  seen.reserve(requests_.size());
  auto check_known = [&](const Request* r) {
    const auto it = requests_.find(r->id);
    if (it == requests_.end() || it->second.get() != r) fail(name(*r) + " is queued but not registered");
    seen.push_back(r);
    if (r->num_output_tokens() > r->max_new_tokens) fail(name(*r) + " generated more than max_new_tokens");
    // A sequence whose last token is pending may hold it one past the limit (never computed).
    if (r->num_tokens() - (r->last_token_pending ? 1 : 0) > max_context_len_) fail(name(*r) + " exceeds the context limit");
    if (r->num_pending_tokens < 0 || r->num_pending_tokens > r->num_tokens() - r->num_prompt_tokens) {
      fail(name(*r) + " has " + std::to_string(r->num_pending_tokens) + " pending tokens");
    }
  };

  // Every block is held by exactly as many block tables as its ref count says.
  std::vector<int32_t> holders(static_cast<size_t>(num_blocks), 0);
  for (const Request* r : running_) {
    check_known(r);
    if (r->status != RequestStatus::RUNNING) fail(name(*r) + " is in the running set with status " + to_string(r->status));
    if (r->num_computed_tokens >= r->num_tokens()) fail(name(*r) + " has no token left to compute");
    const auto table_size = static_cast<int64_t>(r->block_table.size());
    if (table_size < ceil_div(r->num_computed_tokens, bs)) fail(name(*r) + " lacks blocks for its computed tokens");
    // Lookahead slots of the step in flight hold blocks past the known tokens until it is applied.
    if (table_size > ceil_div(r->num_tokens() + r->num_draft_slots, bs)) fail(name(*r) + " holds more blocks than its tokens need");
    if (r->num_draft_slots > 0 && r->num_steps_referencing == 0) fail(name(*r) + " holds lookahead slots outside a scheduled step");
    if (r->num_cached_blocks > table_size || static_cast<int64_t>(r->num_cached_blocks) * bs > r->num_computed_tokens) {
      fail(name(*r) + " registered blocks that are not computed");
    }
    for (size_t i = 0; i < r->block_table.size(); ++i) {
      const BlockId b = r->block_table[i];
      if (b < 0 || b >= num_blocks) fail(name(*r) + " holds invalid block " + std::to_string(b));
      ++holders[b];
      // A cached block must hold exactly this request's prefix at that index.
      const auto hash = kv_.pool().hash_of(b);
      if (hash && (i >= r->block_hashes.size() || r->block_hashes[i] != *hash)) {
        fail(name(*r) + " block " + std::to_string(i) + " is cached under another prefix's hash");
      }
    }
  }
  for (const Request* r : waiting_) {
    check_known(r);
    if (r->status != RequestStatus::WAITING && r->status != RequestStatus::PREEMPTED) {
      fail(name(*r) + " is waiting with status " + to_string(r->status));
    }
    if (!r->block_table.empty() || r->num_computed_tokens != 0) fail(name(*r) + " is waiting but holds KV blocks");
  }
  std::sort(seen.begin(), seen.end());
  if (std::adjacent_find(seen.begin(), seen.end()) != seen.end()) fail("a request is queued twice");

  check_kv_invariants(holders);  // requests waiting for KV, and transfers' holds
  check_pd_invariants(holders);  // requests waiting for a prefill peer, and block holds
  for (BlockId b = 0; b < num_blocks; ++b) {
    const int32_t refs = kv_.pool().ref_count(b);
    if (refs != holders[b]) {
      fail("block " + std::to_string(b) + " has ref count " + std::to_string(refs) + " but " + std::to_string(holders[b]) +
           " block tables and transfers hold it" + (refs > holders[b] ? " (leaked)" : " (double free)"));
    }
  }

  // Cached block hashes chain correctly (spot-checks the lazy hashing).
  for (const Request* r : running_) {
    for (size_t i = 0; i < r->block_hashes.size(); ++i) {
      const BlockHash parent = i == 0 ? kv_.options().root_hash : r->block_hashes[i - 1];
      if (hash_block_tokens(parent, r->token_ids.data() + i * bs, static_cast<size_t>(bs), r->extra_key) != r->block_hashes[i]) {
        fail(name(*r) + " has a stale hash for block " + std::to_string(i));
      }
    }
  }

  for (const CommittedStep& step : committed_) {
    for (const ScheduledEntry& e : step.entries) {
      if (e.request->num_steps_referencing <= 0) fail(name(*e.request) + " is in a committed step but unreferenced");
      if (!e.request->is_finished() && !std::binary_search(seen.begin(), seen.end(), e.request)) {
        fail(name(*e.request) + " is in a committed step but unknown");
      }
    }
  }
  if (in_flight_) {
    for (const ScheduledEntry& e : entries_) {
      if (e.request == nullptr) fail("the batch in flight references a dropped entry");
      if (!e.request->is_finished() && !std::binary_search(seen.begin(), seen.end(), e.request)) fail(name(*e.request) + " is in flight but unknown");
    }
  }
}

}  // namespace rtpllm

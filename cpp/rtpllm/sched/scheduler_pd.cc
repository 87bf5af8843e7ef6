// The Scheduler's side of prefill-decode disaggregation (see "Prefill-decode disaggregation" in
// scheduler.h): a decode instance's requests whose prompt KV a prefill peer writes, and block
// holds that outlive a request while a transfer engine may still touch its blocks.
//
// Who decides what: the engine (python/rtpllm/pd/) watches the transfer engine's notices and the
// deadlines; it calls complete_remote_prefill() once every layer and the first token arrived, or
// hold_blocks() + abort(ERROR) on a timeout or a failed peer, and release_blocks() once no write
// can land any more. The scheduler only keeps the books straight.
#include <algorithm>
#include <stdexcept>
#include <string>

#include "rtpllm/sched/scheduler.h"

namespace rtpllm {

bool Scheduler::add_remote_prefill(const RequestSpec& spec) {
  add_request(spec);  // validates; queued at the tail of the waiting queue
  Request* r = requests_.at(spec.request_id).get();
  const bool seq_room =
      running_.size() + static_cast<size_t>(num_waiting_for_kv()) < static_cast<size_t>(options_.max_num_seqs);
  // Blocks for every prompt token now: the peer writes them all (a local prefix hit it skips).
  const PrefixHit hit = seq_room ? kv_.find_cached_prefix(*r) : PrefixHit{};
  if (!seq_room || !kv_.allocate_slots(*r, r->num_tokens() - hit.num_tokens, &hit)) {
    waiting_.remove(r);
    requests_.erase(spec.request_id);
    maybe_check_invariants();
    return false;
  }
  waiting_.remove(r);
  r->status = RequestStatus::WAITING_FOR_KV;
  remote_waiting_.push_back(r);
  maybe_check_invariants();
  return true;
}

bool Scheduler::complete_remote_prefill(RequestId request_id, TokenId first_token, StepOutputs& outputs) {
  outputs.clear();
  const auto it = std::find_if(remote_waiting_.begin(), remote_waiting_.end(),
                               [&](const Request* r) { return r->id == request_id; });
  if (it == remote_waiting_.end()) return false;
  Request* r = *it;
  remote_waiting_.erase(it);
  // As if a local prefill had computed the prompt and sampled the peer's token.
  r->num_computed_tokens = r->num_tokens();
  kv_.cache_computed_blocks(*r);  // the prompt's full blocks are findable (and saved to tiers) now
  r->token_ids.push_back(first_token);
  r->status = RequestStatus::RUNNING;
  running_.push_back(r);
  const FinishReason reason = finish_reason_after(*r, first_token, r->num_tokens());
  outputs.add(r->id, &first_token, 1, reason, reason == FinishReason::STOP ? first_token : -1);
  if (reason != FinishReason::NONE) {
    finish(r, reason);
    remove_finished();
  }
  maybe_check_invariants();
  return true;
}

int64_t Scheduler::hold_blocks(RequestId request_id) {
  const auto it = requests_.find(request_id);
  if (it == requests_.end()) return 0;
  const std::vector<BlockId>& blocks = it->second->block_table;
  kv_.hold(blocks);
  const int64_t id = next_hold_id_++;
  block_holds_.emplace(id, blocks);
  return id;
}

bool Scheduler::release_blocks(int64_t hold_id) {
  const auto it = block_holds_.find(hold_id);
  if (it == block_holds_.end()) return false;
  kv_.release(it->second);
  block_holds_.erase(it);
  maybe_check_invariants();
  return true;
}

int32_t Scheduler::num_held_blocks() const {
  size_t n = 0;
  for (const auto& [id, blocks] : block_holds_) n += blocks.size();
  return static_cast<int32_t>(n);
}

void Scheduler::check_pd_invariants(std::vector<int32_t>& holders) const {
  auto fail = [](const std::string& what) { throw std::logic_error("Scheduler invariant violated: " + what); };
  const int32_t bs = kv_.block_size();
  for (const Request* r : remote_waiting_) {
    const std::string name = "request " + std::to_string(r->id);
    const auto it = requests_.find(r->id);
    if (it == requests_.end() || it->second.get() != r) fail(name + " waits for a prefill peer but is not registered");
    if (r->status != RequestStatus::WAITING_FOR_KV) fail(name + " waits for a prefill peer with status " + to_string(r->status));
    if (r->num_tokens() != r->num_prompt_tokens) fail(name + " waits for a prefill peer with output tokens");
    if (static_cast<int64_t>(r->block_table.size()) != (r->num_tokens() + bs - 1) / bs) {
      fail(name + " waits for a prefill peer without blocks for exactly its prompt");
    }
    if (r->num_computed_tokens % bs != 0 || r->num_computed_tokens >= r->num_tokens()) {
      fail(name + " waits for a prefill peer with a bad prefix hit");
    }
    for (BlockId b : r->block_table) ++holders.at(static_cast<size_t>(b));
  }
  for (const auto& [id, blocks] : block_holds_) {
    for (BlockId b : blocks) ++holders.at(static_cast<size_t>(b));
  }
}

}  // namespace rtpllm

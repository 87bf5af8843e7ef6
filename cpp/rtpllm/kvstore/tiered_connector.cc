#include "rtpllm/kvstore/tiered_connector.h"

#include <algorithm>
#include <stdexcept>
#include <utility>

namespace rtpllm {

TieredKVConnector::TieredKVConnector(std::vector<std::shared_ptr<KVStoreTier>> tiers, double load_timeout_s)
    : tiers_(std::move(tiers)),
      load_timeout_(std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::duration<double>(load_timeout_s))),
      counters_(tiers_.size()) {
  if (tiers_.empty()) throw std::invalid_argument("TieredKVConnector: needs at least one tier");
  for (const auto& tier : tiers_) {
    if (!tier) throw std::invalid_argument("TieredKVConnector: null tier");
  }
  if (!(load_timeout_s > 0)) throw std::invalid_argument("TieredKVConnector: load_timeout_s must be positive");
}

size_t TieredKVConnector::find_tier(BlockHash hash) {
  for (size_t t = 0; t < tiers_.size(); ++t) {
    if (tiers_[t]->contains(hash)) return t;
  }
  return tiers_.size();
}

int32_t TieredKVConnector::match(const std::vector<BlockHash>& hashes) {
  std::vector<uint64_t> asked(tiers_.size(), 0);
  match_tiers_.clear();
  for (BlockHash hash : hashes) {
    size_t t = 0;
    for (; t < tiers_.size(); ++t) {
      ++asked[t];
      if (tiers_[t]->contains(hash)) break;
    }
    if (t == tiers_.size()) break;
    match_tiers_.push_back(t);
  }
  for (size_t t = 0; t < tiers_.size(); ++t) {
    ++counters_[t].queries;
    counters_[t].query_blocks += asked[t];
  }
  size_t hits = match_tiers_.size();
  if (recompute_seconds_per_block_ > 0 && hits > 0) {
    // Each tier's share loads in parallel with the others': a tier is too slow when its share
    // would take longer than recomputing it. The run then ends at that tier's first block.
    std::vector<int32_t> share(tiers_.size(), 0);
    for (size_t t : match_tiers_) ++share[t];
    for (size_t t = 0; t < tiers_.size(); ++t) {
      if (share[t] == 0 || tiers_[t]->expected_load_seconds(share[t]) <= share[t] * recompute_seconds_per_block_) continue;
      hits = std::min(hits, static_cast<size_t>(std::find(match_tiers_.begin(), match_tiers_.end(), t) - match_tiers_.begin()));
    }
    for (size_t i = hits; i < match_tiers_.size(); ++i) ++counters_[match_tiers_[i]].skipped_blocks;
  }
  for (size_t i = 0; i < hits; ++i) ++counters_[match_tiers_[i]].hit_blocks;
  return static_cast<int32_t>(hits);
}

TransferHandle TieredKVConnector::load(const std::vector<BlockHash>& hashes, const std::vector<BlockId>& gpu_blocks) {
  if (hashes.size() != gpu_blocks.size()) {
    throw std::invalid_argument("TieredKVConnector: " + std::to_string(hashes.size()) + " hashes but " +
                                std::to_string(gpu_blocks.size()) + " gpu_blocks");
  }
  std::vector<std::vector<BlockHash>> tier_hashes(tiers_.size());
  std::vector<std::vector<BlockId>> tier_blocks(tiers_.size());
  bool all_found = true;
  for (size_t i = 0; i < hashes.size() && all_found; ++i) {
    const size_t t = find_tier(hashes[i]);
    all_found = t < tiers_.size();
    if (!all_found) break;
    tier_hashes[t].push_back(hashes[i]);
    tier_blocks[t].push_back(gpu_blocks[i]);
  }
  Transfer transfer;
  transfer.is_load = true;
  auto timeout = load_timeout_;
  if (recompute_seconds_per_block_ > 0) {
    const double budget = kMinLoadBudgetSeconds + kLoadBudgetFactor * recompute_seconds_per_block_ * static_cast<double>(hashes.size());
    timeout = std::min(timeout, std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::duration<double>(budget)));
  }
  transfer.deadline = std::chrono::steady_clock::now() + timeout;
  if (!all_found) {
    ++counters_[0].failed_loads;  // evicted since match(): the caller recomputes
    transfer.parts.push_back(Part{0, 0, TransferState::FAILED});
  } else {
    for (size_t t = 0; t < tiers_.size(); ++t) {
      if (!tier_hashes[t].empty()) transfer.parts.push_back(Part{t, tiers_[t]->load(tier_hashes[t], tier_blocks[t])});
    }
  }
  const TransferHandle handle = next_handle_++;
  transfers_.emplace(handle, std::move(transfer));
  return handle;
}

TransferHandle TieredKVConnector::save(const std::vector<BlockHash>& hashes, const std::vector<BlockId>& gpu_blocks) {
  Transfer transfer;
  transfer.parts.push_back(Part{0, tiers_[0]->save(hashes, gpu_blocks)});
  for (size_t t = 1; t < tiers_.size(); ++t) {
    if (tiers_[t]->saves_from_pool()) transfer.parts.push_back(Part{t, tiers_[t]->save(hashes, gpu_blocks)});
  }
  const TransferHandle handle = next_handle_++;
  transfers_.emplace(handle, std::move(transfer));
  return handle;
}

TransferState TieredKVConnector::poll(TransferHandle handle) {
  auto it = transfers_.find(handle);
  if (it == transfers_.end()) throw std::invalid_argument("TieredKVConnector: unknown transfer handle " + std::to_string(handle));
  Transfer& transfer = it->second;
  bool pending = false;
  for (Part& part : transfer.parts) {
    if (part.state == TransferState::PENDING) part.state = tiers_[part.tier]->poll(part.handle);
    pending = pending || part.state == TransferState::PENDING;
  }
  if (pending && transfer.is_load && !transfer.timed_out && std::chrono::steady_clock::now() >= transfer.deadline) {
    transfer.timed_out = true;
    for (const Part& part : transfer.parts) {
      if (part.state != TransferState::PENDING) continue;
      tiers_[part.tier]->cancel(part.handle);
      ++counters_[part.tier].timed_out_loads;
    }
  }
  if (pending) return TransferState::PENDING;
  TransferState state = transfer.timed_out ? TransferState::FAILED : TransferState::DONE;
  for (const Part& part : transfer.parts) {
    if (part.state == TransferState::FAILED) state = TransferState::FAILED;
  }
  transfers_.erase(it);
  return state;
}

void TieredKVConnector::set_event_log(KVEventLog* log) {
  for (const auto& tier : tiers_) tier->set_event_log(log);
}

void TieredKVConnector::held_blocks(std::vector<KVEvent>& out) {
  for (const auto& tier : tiers_) tier->held_blocks(out);
}

std::vector<KVTierStats> TieredKVConnector::stats() {
  std::vector<KVTierStats> all;
  for (size_t t = 0; t < tiers_.size(); ++t) {
    for (KVTierStats stats : tiers_[t]->stats()) {
      stats.queries += counters_[t].queries;
      stats.query_blocks += counters_[t].query_blocks;
      stats.hit_blocks += counters_[t].hit_blocks;
      stats.failed_loads += counters_[t].failed_loads;
      stats.timed_out_loads += counters_[t].timed_out_loads;
      stats.skipped_blocks += counters_[t].skipped_blocks;
      all.push_back(std::move(stats));
    }
  }
  return all;
}

}  // namespace rtpllm

#include "rtpllm/sched/kv_transfers.h"

#include <algorithm>
#include <cstdio>
#include <exception>
#include <stdexcept>
#include <string>

namespace rtpllm {

KVTransfers::KVTransfers(std::shared_ptr<KVConnector> connector, KVCacheManager& kv, double load_timeout_s)
    : connector_(std::move(connector)),
      kv_(kv),
      load_timeout_(std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(load_timeout_s))) {
  if (!connector_) throw std::invalid_argument("connector: must not be null");
  if (!(load_timeout_s > 0)) throw std::invalid_argument("load_timeout_s: must be positive, got " + std::to_string(load_timeout_s));
}

KVTransfers::~KVTransfers() { connector_->set_event_log(nullptr); }

void KVTransfers::set_event_log(KVEventLog* log) {
  connector_->set_event_log(log);
  if (log == nullptr) return;
  std::vector<KVEvent> held;
  connector_->held_blocks(held);
  // A block stored between the two calls is recorded twice: harmless for a reader's set.
  for (const KVEvent& e : held) log->record(e.kind, e.tier, e.hash);
}

int32_t KVTransfers::match(const std::vector<BlockHash>& hashes) {
  if (hashes.empty()) return 0;
  int32_t n = 0;
  try {
    n = connector_->match(hashes);
  } catch (const std::exception& e) {
    // A tier that cannot answer holds nothing we can use: compute instead.
    std::fprintf(stderr, "rtpllm: KV connector match() failed: %s\n", e.what());
    return 0;
  }
  return std::clamp(n, 0, static_cast<int32_t>(hashes.size()));
}

bool KVTransfers::start_load(Request& request, int32_t first_block, int32_t count) {
  const auto first = request.block_table.begin() + first_block;
  std::vector<BlockId> blocks(first, first + count);
  std::vector<BlockHash> hashes(request.block_hashes.begin() + first_block, request.block_hashes.begin() + first_block + count);
  TransferHandle handle = 0;
  try {
    handle = connector_->load(hashes, blocks);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rtpllm: KV connector load() failed: %s\n", e.what());
  }
  if (handle == 0) {
    ++failed_loads_;
    return false;
  }
  kv_.hold(blocks);
  loads_.push_back({handle, &request, std::move(blocks), Clock::now()});
  ++num_waiting_;
  return true;
}

void KVTransfers::detach(const Request& request) {
  for (Load& l : loads_) {
    if (l.request == &request) {
      l.request = nullptr;
      --num_waiting_;
    }
  }
}

void KVTransfers::save_newly_cached(bool now) {
  const uint64_t evictions = kv_.pool().num_evictions();
  const bool evicting = evictions != evictions_seen_;
  evictions_seen_ = evictions;
  if (!kv_.has_newly_cached()) return;
  if (!now && !evicting && kv_.num_newly_cached() < kSaveBatchBlocks && ++save_wait_polls_ < kMaxSaveWaitPolls) return;
  save_wait_polls_ = 0;
  to_save_.clear();
  kv_.take_newly_cached(to_save_);
  if (to_save_.empty()) return;
  std::vector<BlockHash> hashes;
  std::vector<BlockId> blocks;
  hashes.reserve(to_save_.size());
  blocks.reserve(to_save_.size());
  for (const auto& [hash, block] : to_save_) {
    if (kv_.pool().hash_of(block) != hash) continue;  // evicted since it was cached: nothing to save
    hashes.push_back(hash);
    blocks.push_back(block);
  }
  if (blocks.empty()) return;
  TransferHandle handle = 0;
  try {
    handle = connector_->save(hashes, blocks);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rtpllm: KV connector save() failed: %s\n", e.what());
  }
  if (handle == 0) {
    ++failed_saves_;
    return;
  }
  kv_.hold(blocks);
  saved_blocks_ += blocks.size();
  saves_.push_back({handle, std::move(blocks)});
}

void KVTransfers::observe_step(int32_t num_tokens) {
  // Steps of fewer tokens are mostly decode, whose time says little about prefill; a longer gap
  // than kMaxStepSeconds was idle time, not a step.
  constexpr int32_t kMinTokensToMeasure = 256;
  constexpr double kMaxStepSeconds = 5.0;
  constexpr double kNewestWeight = 0.2;
  const Clock::time_point now = Clock::now();
  if (last_step_tokens_ >= kMinTokensToMeasure && last_step_at_ != Clock::time_point{}) {
    const double seconds = std::chrono::duration<double>(now - last_step_at_).count();
    if (seconds > 0 && seconds < kMaxStepSeconds) {
      const double per_token = seconds / last_step_tokens_;
      seconds_per_token_ = seconds_per_token_ == 0 ? per_token : (1 - kNewestWeight) * seconds_per_token_ + kNewestWeight * per_token;
      connector_->set_recompute_seconds_per_block(seconds_per_token_ * kv_.block_size());
    }
  }
  last_step_at_ = now;
  last_step_tokens_ = num_tokens;
}

TransferState KVTransfers::poll_handle(TransferHandle handle) {
  try {
    return connector_->poll(handle);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rtpllm: KV connector poll() failed: %s\n", e.what());
    return TransferState::FAILED;
  }
}

void KVTransfers::poll(std::vector<EndedLoad>& ended) {
  const Clock::time_point now = Clock::now();
  size_t kept = 0;
  for (size_t i = 0; i < loads_.size(); ++i) {
    Load& l = loads_[i];
    const TransferState state = poll_handle(l.handle);
    if (state == TransferState::PENDING) {
      if (l.request != nullptr && now - l.started > load_timeout_) {
        // Give up waiting; the transfer keeps its blocks until the connector says it ended.
        ended.push_back({l.request, static_cast<int32_t>(l.blocks.size()), LoadEnd::TIMED_OUT});
        ++timed_out_loads_;
        l.request = nullptr;
        --num_waiting_;
      }
      if (kept != i) loads_[kept] = std::move(l);
      ++kept;
      continue;
    }
    if (l.request != nullptr) {
      const bool done = state == TransferState::DONE;
      ended.push_back({l.request, static_cast<int32_t>(l.blocks.size()), done ? LoadEnd::DONE : LoadEnd::FAILED});
      --num_waiting_;
      if (done) loaded_blocks_ += l.blocks.size();
      if (!done) ++failed_loads_;
    }
    kv_.release(l.blocks);
  }
  loads_.resize(kept);

  kept = 0;
  for (size_t i = 0; i < saves_.size(); ++i) {
    Save& s = saves_[i];
    const TransferState state = poll_handle(s.handle);
    if (state == TransferState::PENDING) {
      if (kept != i) saves_[kept] = std::move(s);
      ++kept;
      continue;
    }
    if (state == TransferState::FAILED) ++failed_saves_;
    kv_.release(s.blocks);
  }
  saves_.resize(kept);
}

void KVTransfers::count_held_blocks(std::vector<int32_t>& holders) const {
  for (const Load& l : loads_) {
    for (BlockId b : l.blocks) ++holders.at(static_cast<size_t>(b));
  }
  for (const Save& s : saves_) {
    for (BlockId b : s.blocks) ++holders.at(static_cast<size_t>(b));
  }
}

int32_t KVTransfers::num_held_blocks() const {
  size_t n = 0;
  for (const Load& l : loads_) n += l.blocks.size();
  for (const Save& s : saves_) n += s.blocks.size();
  return static_cast<int32_t>(n);
}

}  // namespace rtpllm

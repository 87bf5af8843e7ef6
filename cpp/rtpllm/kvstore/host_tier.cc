#include "rtpllm/kvstore/host_tier.h"

#include <optional>
#include <stdexcept>
#include <utility>

namespace rtpllm {
namespace {

constexpr size_t kMaxPendingLatencies = 4096;  // latencies kept between two stats() calls

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

struct HostTier::State {
  enum class SlotKind : uint8_t { FREE, FILLING, READY };
  struct Slot {
    SlotKind kind = SlotKind::FREE;
    BlockHash hash = 0;
    int32_t pins = 0;  // loads reading it + next-tier offers not yet released
    bool in_lru = false;
    std::list<int32_t>::iterator lru_pos;
  };

  std::mutex mutex;  // guards everything below
  HostBuffer buffer;
  int64_t bytes_per_block = 0;
  std::vector<Slot> slots;
  std::vector<int32_t> free_slots;
  std::unordered_map<BlockHash, int32_t> index;  // FILLING and READY slots
  std::list<int32_t> lru;                        // READY, unpinned slots; front = least recently used
  KVTierStats stats;
  KVEventLog* events = nullptr;  // READY blocks stored and evicted, for the router

  uint8_t* data(int32_t slot) const { return buffer.data() + static_cast<int64_t>(slot) * bytes_per_block; }

  void pin(int32_t id) {
    Slot& slot = slots[static_cast<size_t>(id)];
    if (slot.in_lru) {
      lru.erase(slot.lru_pos);
      slot.in_lru = false;
    }
    ++slot.pins;
  }

  void unpin(int32_t id) {
    Slot& slot = slots[static_cast<size_t>(id)];
    if (--slot.pins == 0 && slot.kind == SlotKind::READY) make_evictable(id);
  }

  void make_evictable(int32_t id) {
    Slot& slot = slots[static_cast<size_t>(id)];
    slot.lru_pos = lru.insert(lru.end(), id);
    slot.in_lru = true;
  }

  void free_slot(int32_t id) {
    Slot& slot = slots[static_cast<size_t>(id)];
    if (slot.in_lru) lru.erase(slot.lru_pos);
    index.erase(slot.hash);
    slot = Slot{};
    free_slots.push_back(id);
  }

  // A free slot, evicting the least recently used block if needed; nullopt if every slot is busy.
  std::optional<int32_t> take_slot() {
    if (free_slots.empty()) {
      if (lru.empty()) return std::nullopt;
      if (events != nullptr) events->record(KVEventKind::kRemoved, KVTier::kHost, slots[lru.front()].hash);
      free_slot(lru.front());
      ++stats.evicted_blocks;
    }
    const int32_t id = free_slots.back();
    free_slots.pop_back();
    return id;
  }

  bool ready(BlockHash hash) const {
    auto it = index.find(hash);
    return it != index.end() && slots[static_cast<size_t>(it->second)].kind == SlotKind::READY;
  }
};

HostTier::HostTier(std::shared_ptr<KVCopyEngine> engine, int64_t capacity_bytes, std::shared_ptr<KVBlockSink> next_tier)
    : engine_(std::move(engine)), next_tier_(std::move(next_tier)), bytes_per_block_(engine_ ? engine_->layout().bytes_per_block() : 0) {
  if (!engine_) throw std::invalid_argument("HostTier: null copy engine");
  const int64_t num_slots = capacity_bytes / bytes_per_block_;
  if (num_slots < 1) {
    throw std::invalid_argument("HostTier: capacity_bytes (" + std::to_string(capacity_bytes) + ") is less than one block (" +
                                std::to_string(bytes_per_block_) + " bytes)");
  }
  if (num_slots > INT32_MAX) throw std::invalid_argument("HostTier: capacity_bytes is too large");
  state_ = std::make_shared<State>();
  state_->bytes_per_block = bytes_per_block_;
  state_->buffer = HostBuffer(engine_->host_allocator(), static_cast<size_t>(num_slots * bytes_per_block_));
  state_->slots.resize(static_cast<size_t>(num_slots));
  for (int32_t id = static_cast<int32_t>(num_slots) - 1; id >= 0; --id) state_->free_slots.push_back(id);
  state_->stats.name = name();
  state_->stats.capacity_blocks = static_cast<uint64_t>(num_slots);
}

HostTier::~HostTier() {
  // The engine may still be copying into or out of our buffers: let it finish first.
  for (auto& [handle, transfer] : transfers_) {
    if (transfer.ticket != 0) engine_->wait(transfer.ticket);
  }
}

int32_t HostTier::capacity_blocks() const { return static_cast<int32_t>(state_->slots.size()); }

void HostTier::check_request(const std::vector<BlockHash>& hashes, const std::vector<BlockId>& gpu_blocks) const {
  if (hashes.size() != gpu_blocks.size()) {
    throw std::invalid_argument("HostTier: " + std::to_string(hashes.size()) + " hashes but " +
                                std::to_string(gpu_blocks.size()) + " gpu_blocks");
  }
  check_pool_blocks(engine_->layout(), gpu_blocks);
}

int32_t HostTier::match(const std::vector<BlockHash>& hashes) {
  std::lock_guard<std::mutex> lock(state_->mutex);
  int32_t hits = 0;
  while (hits < static_cast<int32_t>(hashes.size()) && state_->ready(hashes[static_cast<size_t>(hits)])) ++hits;
  ++state_->stats.queries;
  state_->stats.query_blocks += hashes.size();
  state_->stats.hit_blocks += static_cast<uint64_t>(hits);
  return hits;
}

bool HostTier::contains(BlockHash hash) {
  std::lock_guard<std::mutex> lock(state_->mutex);
  return state_->ready(hash);
}

TransferHandle HostTier::load(const std::vector<BlockHash>& hashes, const std::vector<BlockId>& gpu_blocks) {
  check_request(hashes, gpu_blocks);
  Transfer transfer;
  transfer.is_load = true;
  transfer.start = std::chrono::steady_clock::now();
  std::vector<BlockCopy> copies;
  {
    std::lock_guard<std::mutex> lock(state_->mutex);
    bool all_present = true;
    for (BlockHash hash : hashes) all_present = all_present && state_->ready(hash);
    if (all_present) {
      for (size_t i = 0; i < hashes.size(); ++i) {
        const int32_t slot = state_->index.at(hashes[i]);
        state_->pin(slot);
        transfer.slots.push_back(slot);
        copies.push_back(BlockCopy{gpu_blocks[i], state_->data(slot)});
      }
    } else {
      transfer.final_state = TransferState::FAILED;  // evicted since match(): the caller recomputes
    }
  }
  if (transfer.final_state == TransferState::PENDING) transfer.ticket = engine_->submit(CopyDirection::HOST_TO_POOL, copies);
  const TransferHandle handle = next_handle_++;
  transfers_.emplace(handle, std::move(transfer));
  return handle;
}

TransferHandle HostTier::save(const std::vector<BlockHash>& hashes, const std::vector<BlockId>& gpu_blocks) {
  check_request(hashes, gpu_blocks);
  Transfer transfer;
  transfer.start = std::chrono::steady_clock::now();
  std::vector<BlockCopy> copies;
  {
    std::lock_guard<std::mutex> lock(state_->mutex);
    for (size_t i = 0; i < hashes.size(); ++i) {
      if (state_->index.count(hashes[i]) != 0) continue;  // held, or being saved
      const std::optional<int32_t> slot = state_->take_slot();
      if (!slot) break;  // every buffer is busy: saving is best effort
      State::Slot& entry = state_->slots[static_cast<size_t>(*slot)];
      entry.kind = State::SlotKind::FILLING;
      entry.hash = hashes[i];
      state_->index.emplace(hashes[i], *slot);
      transfer.slots.push_back(*slot);
      copies.push_back(BlockCopy{gpu_blocks[i], state_->data(*slot)});
    }
  }
  if (copies.empty()) {
    transfer.final_state = TransferState::DONE;
  } else {
    transfer.ticket = engine_->submit(CopyDirection::POOL_TO_HOST, copies);
  }
  const TransferHandle handle = next_handle_++;
  transfers_.emplace(handle, std::move(transfer));
  return handle;
}

TransferState HostTier::poll(TransferHandle handle) {
  auto it = transfers_.find(handle);
  if (it == transfers_.end()) throw std::invalid_argument("HostTier: unknown transfer handle " + std::to_string(handle));
  Transfer& transfer = it->second;
  TransferState state = transfer.final_state;
  if (transfer.ticket != 0) {
    state = engine_->query(transfer.ticket);
    if (state == TransferState::PENDING) return state;
    const bool ok = state == TransferState::DONE;
    if (transfer.is_load) {
      finish_load(transfer, ok);
    } else {
      finish_save(transfer, ok);
    }
  } else if (transfer.is_load) {
    finish_load(transfer, state == TransferState::DONE);
  }
  transfers_.erase(it);
  return state;
}

void HostTier::finish_save(Transfer& transfer, bool ok) {
  {
    std::lock_guard<std::mutex> lock(state_->mutex);
    for (int32_t id : transfer.slots) {
      if (!ok) {
        state_->free_slot(id);
        continue;
      }
      State::Slot& slot = state_->slots[static_cast<size_t>(id)];
      slot.kind = State::SlotKind::READY;
      state_->make_evictable(id);
      if (state_->events != nullptr) state_->events->record(KVEventKind::kStored, KVTier::kHost, slot.hash);
    }
    if (ok) {
      state_->stats.saved_blocks += transfer.slots.size();
      state_->stats.save_bytes += transfer.slots.size() * static_cast<uint64_t>(bytes_per_block_);
    }
  }
  if (ok && next_tier_) offer_to_next_tier(transfer.slots);
}

void HostTier::set_event_log(KVEventLog* log) {
  std::lock_guard<std::mutex> lock(state_->mutex);
  state_->events = log;
}

void HostTier::held_blocks(std::vector<KVEvent>& out) {
  std::lock_guard<std::mutex> lock(state_->mutex);
  for (const State::Slot& slot : state_->slots) {
    if (slot.kind == State::SlotKind::READY) out.push_back(KVEvent{slot.hash, KVEventKind::kStored, KVTier::kHost});
  }
}

void HostTier::finish_load(Transfer& transfer, bool ok) {
  std::lock_guard<std::mutex> lock(state_->mutex);
  for (int32_t id : transfer.slots) state_->unpin(id);  // back to the LRU list as most recently used
  KVTierStats& stats = state_->stats;
  if (!ok) {
    ++stats.failed_loads;
    return;
  }
  stats.loaded_blocks += transfer.slots.size();
  stats.load_bytes += transfer.slots.size() * static_cast<uint64_t>(bytes_per_block_);
  if (stats.load_latency_s.size() < kMaxPendingLatencies) stats.load_latency_s.push_back(seconds_since(transfer.start));
}

void HostTier::offer_to_next_tier(const std::vector<int32_t>& slots) {
  std::vector<std::pair<int32_t, BlockHash>> offered;
  {
    std::lock_guard<std::mutex> lock(state_->mutex);
    for (int32_t id : slots) {
      state_->pin(id);
      offered.emplace_back(id, state_->slots[static_cast<size_t>(id)].hash);
    }
  }
  // Without the lock: the sink may call release() before offer() returns.
  for (const auto& [id, hash] : offered) {
    std::shared_ptr<State> state = state_;
    auto release = [state, id = id] {
      std::lock_guard<std::mutex> lock(state->mutex);
      state->unpin(id);
    };
    if (!next_tier_->offer(hash, state_->data(id), release)) release();
  }
}

std::vector<KVTierStats> HostTier::stats() {
  std::lock_guard<std::mutex> lock(state_->mutex);
  KVTierStats stats = state_->stats;
  stats.used_blocks = state_->slots.size() - state_->free_slots.size();
  state_->stats.load_latency_s.clear();
  return {stats};
}

void HostTier::check_invariants() {
  std::lock_guard<std::mutex> lock(state_->mutex);
  size_t used = 0;
  size_t evictable = 0;
  for (size_t id = 0; id < state_->slots.size(); ++id) {
    const State::Slot& slot = state_->slots[id];
    if (slot.pins < 0) throw std::logic_error("HostTier: negative pin count on slot " + std::to_string(id));
    if (slot.kind == State::SlotKind::FREE) {
      if (slot.pins != 0 || slot.in_lru) throw std::logic_error("HostTier: free slot " + std::to_string(id) + " is in use");
      continue;
    }
    ++used;
    auto it = state_->index.find(slot.hash);
    if (it == state_->index.end() || it->second != static_cast<int32_t>(id)) {
      throw std::logic_error("HostTier: slot " + std::to_string(id) + " is missing from the index");
    }
    const bool should_be_in_lru = slot.kind == State::SlotKind::READY && slot.pins == 0;
    if (slot.in_lru != should_be_in_lru) throw std::logic_error("HostTier: slot " + std::to_string(id) + " LRU membership is wrong");
    if (slot.in_lru) ++evictable;
  }
  if (used != state_->index.size() || used + state_->free_slots.size() != state_->slots.size() ||
      evictable != state_->lru.size()) {
    throw std::logic_error("HostTier: slot counts disagree with the index, free list or LRU list");
  }
}

}  // namespace rtpllm

#include "rtpllm/kvstore/remote/store_index.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace rtpllm {

StoreIndex::StoreIndex(int32_t num_slots) {
  if (num_slots <= 0) throw std::invalid_argument("StoreIndex: num_slots must be positive, got " + std::to_string(num_slots));
  slots_.resize(static_cast<size_t>(num_slots));
  free_.reserve(static_cast<size_t>(num_slots));
  for (int32_t s = num_slots - 1; s >= 0; --s) free_.push_back(s);  // slot 0 first
}

int32_t StoreIndex::find(BlockHash hash) const {
  auto it = by_hash_.find(hash);
  return it == by_hash_.end() ? -1 : it->second;
}

StoreIndex::Slot& StoreIndex::held_slot(int32_t slot, const char* what) {
  if (slot < 0 || slot >= num_slots() || slots_[static_cast<size_t>(slot)].state != SlotState::HELD) {
    throw std::logic_error(std::string("StoreIndex::") + what + ": slot " + std::to_string(slot) + " holds no block");
  }
  return slots_[static_cast<size_t>(slot)];
}

BlockHash StoreIndex::hash_of(int32_t slot) const {
  return const_cast<StoreIndex*>(this)->held_slot(slot, "hash_of").hash;
}

int32_t StoreIndex::pin(BlockHash hash) {
  const int32_t slot = find(hash);
  if (slot >= 0) pin_slot(slot);
  return slot;
}

void StoreIndex::pin_slot(int32_t slot) {
  Slot& s = held_slot(slot, "pin_slot");
  if (s.pins++ == 0) {
    lru_.erase(s.lru_pos);
    ++pinned_;
  }
}

void StoreIndex::unpin(int32_t slot) {
  Slot& s = held_slot(slot, "unpin");
  if (s.pins <= 0) throw std::logic_error("StoreIndex::unpin: slot " + std::to_string(slot) + " is not pinned");
  if (--s.pins == 0) {
    s.lru_pos = lru_.insert(lru_.end(), slot);
    --pinned_;
  }
}

void StoreIndex::unpin_at(int32_t slot, Clock::time_point when) {
  held_slot(slot, "unpin_at");
  deferred_.push_back(Deferred{when, slot, false});
}

int32_t StoreIndex::reserve(std::vector<BlockHash>* evicted) {
  int32_t slot = -1;
  if (!free_.empty()) {
    slot = free_.back();
    free_.pop_back();
  } else if (!lru_.empty()) {
    slot = lru_.front();
    lru_.pop_front();
    Slot& s = slots_[static_cast<size_t>(slot)];
    if (evicted) evicted->push_back(s.hash);
    drop_hash(slot);
    ++evictions_;
  } else {
    return -1;
  }
  Slot& s = slots_[static_cast<size_t>(slot)];
  s.state = SlotState::RESERVED;
  s.hash = 0;
  s.pins = 0;
  return slot;
}

void StoreIndex::drop_hash(int32_t slot) {
  Slot& s = slots_[static_cast<size_t>(slot)];
  by_hash_.erase(s.hash);
  removed_.push_back(s.hash);
}

bool StoreIndex::commit(int32_t slot, BlockHash hash) {
  if (slot < 0 || slot >= num_slots() || slots_[static_cast<size_t>(slot)].state != SlotState::RESERVED) {
    throw std::logic_error("StoreIndex::commit: slot " + std::to_string(slot) + " is not reserved");
  }
  if (contains(hash)) {
    abandon(slot);
    return false;
  }
  Slot& s = slots_[static_cast<size_t>(slot)];
  s.state = SlotState::HELD;
  s.hash = hash;
  s.pins = 0;
  s.lru_pos = lru_.insert(lru_.end(), slot);
  by_hash_.emplace(hash, slot);
  added_.push_back(hash);
  return true;
}

void StoreIndex::abandon(int32_t slot) {
  if (slot < 0 || slot >= num_slots() || slots_[static_cast<size_t>(slot)].state != SlotState::RESERVED) {
    throw std::logic_error("StoreIndex::abandon: slot " + std::to_string(slot) + " is not reserved");
  }
  slots_[static_cast<size_t>(slot)].state = SlotState::FREE;
  free_.push_back(slot);
}

void StoreIndex::abandon_at(int32_t slot, Clock::time_point when) {
  if (slot < 0 || slot >= num_slots() || slots_[static_cast<size_t>(slot)].state != SlotState::RESERVED) {
    throw std::logic_error("StoreIndex::abandon_at: slot " + std::to_string(slot) + " is not reserved");
  }
  deferred_.push_back(Deferred{when, slot, true});
}

void StoreIndex::expire(Clock::time_point now) {
  auto due = std::stable_partition(deferred_.begin(), deferred_.end(), [now](const Deferred& d) { return d.when > now; });
  std::vector<Deferred> run(due, deferred_.end());
  deferred_.erase(due, deferred_.end());
  for (const Deferred& d : run) {
    if (d.abandon) {
      abandon(d.slot);
    } else {
      unpin(d.slot);
    }
  }
}

void StoreIndex::take_changes(std::vector<BlockHash>* added, std::vector<BlockHash>* removed) {
  added->swap(added_);
  removed->swap(removed_);
  added_.clear();
  removed_.clear();
}

std::vector<BlockHash> StoreIndex::held_hashes() const {
  std::vector<BlockHash> hashes;
  hashes.reserve(by_hash_.size());
  for (const auto& [hash, slot] : by_hash_) hashes.push_back(hash);
  return hashes;
}

void StoreIndex::check_invariants() const {
  size_t free = 0, held = 0, unpinned = 0;
  int32_t pinned = 0;
  for (size_t i = 0; i < slots_.size(); ++i) {
    const Slot& s = slots_[i];
    if (s.state == SlotState::FREE) ++free;
    if (s.state != SlotState::HELD) continue;
    ++held;
    auto it = by_hash_.find(s.hash);
    if (it == by_hash_.end() || it->second != static_cast<int32_t>(i)) {
      throw std::logic_error("StoreIndex: slot " + std::to_string(i) + " is not indexed under its hash");
    }
    if (s.pins < 0) throw std::logic_error("StoreIndex: negative pin count");
    if (s.pins == 0) ++unpinned;
    if (s.pins > 0) ++pinned;
  }
  if (free != free_.size()) throw std::logic_error("StoreIndex: free list disagrees with slot states");
  if (held != by_hash_.size()) throw std::logic_error("StoreIndex: index disagrees with slot states");
  if (unpinned != lru_.size()) throw std::logic_error("StoreIndex: LRU list disagrees with pin counts");
  if (pinned != pinned_) throw std::logic_error("StoreIndex: pinned count disagrees with pin counts");
}

}  // namespace rtpllm

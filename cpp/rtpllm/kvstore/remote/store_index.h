// The shared KV store's bookkeeping of its block slots: which slot holds which block hash, which
// slots are pinned (being read by a client, or by the disk tier), reserved (a client is writing
// into them) or free, and the least-recently-used order in which unpinned blocks are evicted.
//
// A slot is FREE, RESERVED (handed to a save, content not yet valid), or HELD (indexed by hash;
// pinned while its pin count is positive, and only then never evicted). Pins and reservations of
// a client that went away are not dropped at once but at a deadline (unpin_at, abandon_at): its
// one-sided transfers may still be on the wire until its transfer timeout has passed, and a slot
// must not be handed to someone else while a late write could land in it or a read still expects
// its old bytes.
//
// Changes to the set of held hashes are recorded for take_changes(), which the store sends to its
// clients as index updates. Not thread safe: the store's thread owns it.
#pragma once

#include <chrono>
#include <cstdint>
#include <list>
#include <unordered_map>
#include <vector>

#include "rtpllm/core/types.h"

namespace rtpllm {

class StoreIndex {
 public:
  using Clock = std::chrono::steady_clock;

  // num_slots > 0 (std::invalid_argument otherwise).
  explicit StoreIndex(int32_t num_slots);

  int32_t num_slots() const { return static_cast<int32_t>(slots_.size()); }
  int32_t num_held() const { return static_cast<int32_t>(by_hash_.size()); }
  int32_t num_free() const { return static_cast<int32_t>(free_.size()); }
  int32_t num_pinned() const { return pinned_; }
  bool contains(BlockHash hash) const { return by_hash_.count(hash) > 0; }
  // The slot holding hash, or -1. Does not change the LRU order.
  int32_t find(BlockHash hash) const;
  BlockHash hash_of(int32_t slot) const;  // of a HELD slot

  // Pins the slot holding hash and returns it (-1 when not held). A pinned block is never evicted.
  int32_t pin(BlockHash hash);
  // Pins a HELD slot once more (it is known to hold its block).
  void pin_slot(int32_t slot);
  // Drops one pin; the block becomes the most recently used once no pin is left.
  void unpin(int32_t slot);
  void unpin_at(int32_t slot, Clock::time_point when);

  // A slot to write a new block into: a free one, else the least recently used unpinned block's
  // (its hash is dropped and appended to *evicted). -1 when every slot is pinned or reserved.
  int32_t reserve(std::vector<BlockHash>* evicted);
  // The reserved slot now holds hash (unpinned, most recently used). Returns false (and frees the
  // slot) when hash is held already, by another slot.
  bool commit(int32_t slot, BlockHash hash);
  // The reserved slot goes back to free, now or at a deadline (its content is garbage).
  void abandon(int32_t slot);
  void abandon_at(int32_t slot, Clock::time_point when);

  // Runs the deferred unpins and abandons that are due.
  void expire(Clock::time_point now);
  bool has_deferred() const { return !deferred_.empty(); }

  // Hashes that became held / stopped being held since the last call.
  void take_changes(std::vector<BlockHash>* added, std::vector<BlockHash>* removed);
  // Every held hash.
  std::vector<BlockHash> held_hashes() const;

  uint64_t evictions() const { return evictions_; }

  // Slots, index, LRU list and pin counts agree; throws std::logic_error otherwise. For tests.
  void check_invariants() const;

 private:
  enum class SlotState : uint8_t { FREE, RESERVED, HELD };
  struct Slot {
    SlotState state = SlotState::FREE;
    BlockHash hash = 0;
    int32_t pins = 0;
    std::list<int32_t>::iterator lru_pos;  // valid while HELD and unpinned
  };
  struct Deferred {
    Clock::time_point when;
    int32_t slot = 0;
    bool abandon = false;  // else unpin
  };

  Slot& held_slot(int32_t slot, const char* what);
  void drop_hash(int32_t slot);

  std::vector<Slot> slots_;
  std::vector<int32_t> free_;
  std::list<int32_t> lru_;  // HELD, unpinned slots; front = least recently used
  std::unordered_map<BlockHash, int32_t> by_hash_;
  std::vector<Deferred> deferred_;
  std::vector<BlockHash> added_;
  std::vector<BlockHash> removed_;
  int32_t pinned_ = 0;  // HELD slots with pins > 0
  uint64_t evictions_ = 0;
};

}  // namespace rtpllm

// Fixed pool of KV blocks: ids, reference counts, and the free blocks in allocation order.
//
// A block is in use (ref count > 0, held by that many block tables) or free (ref count 0). A
// full block whose KV was computed can be registered under its prefix hash; it keeps the hash
// after it is freed, so a later request with the same prefix can take it back
// (`lookup` + `touch`) until the block is reused for other tokens (evicted).
//
// Free blocks live in two places:
//   - blocks without a hash, which hold nothing worth keeping, as runs of consecutive ids
//     (FreeBlockRuns): allocations take these first, as few runs as possible, so that a block
//     table is consecutive memory in long stretches (one KV transfer write or copy per stretch
//     instead of per block; see free_block_runs.h);
//   - cached blocks, from least to most recently freed (LRU): evicted only when the uncached ones
//     are too few, and then chosen among the least recently freed so that, with the uncached
//     ones, they form few runs (RunAwareEviction).
#pragma once

#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "rtpllm/cache/block_hash_index.h"
#include "rtpllm/cache/eviction_listener.h"
#include "rtpllm/cache/free_block_runs.h"
#include "rtpllm/cache/kv_event_log.h"
#include "rtpllm/cache/run_aware_eviction.h"
#include "rtpllm/core/types.h"

namespace rtpllm {

class BlockPool {
 public:
  explicit BlockPool(int32_t num_blocks);

  int32_t num_blocks() const { return num_blocks_; }
  // Includes cached blocks that can be evicted.
  int32_t num_free_blocks() const { return free_runs_.size() + num_cached_free_; }
  int32_t num_used_blocks() const { return num_blocks_ - num_free_blocks(); }
  // The free uncached blocks, as runs (first block, length) in id order. O(num_blocks): for tests.
  std::vector<std::pair<BlockId, int32_t>> free_uncached_runs() const { return free_runs_.runs(); }
  int32_t num_cached_blocks() const { return static_cast<int32_t>(cached_.size()); }
  uint64_t num_evictions() const { return num_evictions_; }

  // Appends `count` free blocks to `out` with ref count 1: uncached blocks first, then cached
  // ones evicted (the listener hears of each), as few runs of consecutive ids as the free blocks
  // allow, ascending within a run, starting with out.back() + 1 when that block is free and
  // uncached (a growing block table stays consecutive).
  // Throws std::logic_error if fewer than `count` blocks are free (callers check first).
  void allocate(int32_t count, std::vector<BlockId>& out);

  // Adds a reference to a block (found by lookup(), or held already), taking it out of the free
  // blocks if it was unused.
  void touch(BlockId block_id);

  // Drops one reference from each block of a block table. Blocks are released tail first, so
  // that when they become free a sequence's last cached blocks (the least likely to be shared)
  // are evicted before its first ones. Throws std::logic_error on a block that is already free.
  void release(const std::vector<BlockId>& block_table);

  // The block registered under `hash`, in use or free.
  std::optional<BlockId> lookup(BlockHash hash) const;

  // Registers a full, computed block under its prefix hash. If another block already holds the
  // hash (two sequences computed the same prefix at once), the first stays the cached copy and
  // this block remains unregistered; returns whether this block was registered.
  bool cache(BlockId block_id, BlockHash hash);

  int32_t ref_count(BlockId block_id) const { return blocks_.at(checked(block_id)).ref_count; }
  std::optional<BlockHash> hash_of(BlockId block_id) const;

  // Not owned; nullptr to detach. See BlockEvictionListener for the contract.
  void set_eviction_listener(BlockEvictionListener* listener) { listener_ = listener; }
  // Not owned; nullptr to detach. Hears of every hash registered (cache) and evicted.
  void set_event_log(KVEventLog* log) { event_log_ = log; }
  // Every hash registered now, in block id order (the snapshot a KVEventLog reader resyncs from).
  std::vector<BlockHash> cached_hashes() const;

  // Free lists, counters and hash index agree with each other; throws std::logic_error otherwise.
  void check_invariants() const;

 private:
  struct Block {
    int32_t ref_count = 0;
    int32_t prev = -1;  // LRU neighbours while free and cached; the sentinel is index num_blocks_
    int32_t next = -1;
    bool in_lru = false;
    bool has_hash = false;
    BlockHash hash = 0;
  };

  size_t checked(BlockId block_id) const;
  void lru_unlink(BlockId block_id);
  void lru_append(BlockId block_id);  // as the most recently freed
  void evict(BlockId block_id);
  // Evicts `count` cached free blocks (RunAwareEviction's choice) into free_runs_.
  void evict_for_allocation(int32_t count);

  int32_t num_blocks_;
  int32_t sentinel_;
  int32_t num_cached_free_ = 0;
  uint64_t num_evictions_ = 0;
  std::vector<Block> blocks_;  // num_blocks_ blocks + the LRU sentinel
  FreeBlockRuns free_runs_;
  RunAwareEviction eviction_;
  std::vector<BlockId> eviction_window_;   // reused by evict_for_allocation
  std::vector<uint8_t> eviction_chosen_;
  BlockHashIndex cached_;
  BlockEvictionListener* listener_ = nullptr;
  KVEventLog* event_log_ = nullptr;
};

}  // namespace rtpllm

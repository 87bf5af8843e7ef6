#include "rtpllm/cache/block_pool.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace rtpllm {

namespace {

int32_t validated_num_blocks(int32_t num_blocks) {
  if (num_blocks <= 0) throw std::invalid_argument("num_blocks: must be positive, got " + std::to_string(num_blocks));
  return num_blocks;
}

}  // namespace

BlockPool::BlockPool(int32_t num_blocks)
    : num_blocks_(validated_num_blocks(num_blocks)),
      sentinel_(num_blocks),
      free_runs_(num_blocks),
      eviction_(num_blocks),
      cached_(num_blocks) {
  blocks_.resize(static_cast<size_t>(num_blocks) + 1);
  blocks_[sentinel_].prev = blocks_[sentinel_].next = sentinel_;
  for (BlockId id = 0; id < num_blocks; ++id) free_runs_.insert(id);  // one run: 0, 1, 2, ... go first
}

size_t BlockPool::checked(BlockId block_id) const {
  if (block_id < 0 || block_id >= num_blocks_) {
    throw std::out_of_range("block id " + std::to_string(block_id) + " outside [0, " + std::to_string(num_blocks_) + ")");
  }
  return static_cast<size_t>(block_id);
}

void BlockPool::lru_unlink(BlockId block_id) {
  Block& b = blocks_[block_id];
  blocks_[b.prev].next = b.next;
  blocks_[b.next].prev = b.prev;
  b.prev = b.next = -1;
  b.in_lru = false;
  --num_cached_free_;
}

void BlockPool::lru_append(BlockId block_id) {
  Block& b = blocks_[block_id];
  b.next = sentinel_;
  b.prev = blocks_[sentinel_].prev;
  blocks_[b.prev].next = block_id;
  blocks_[sentinel_].prev = block_id;
  b.in_lru = true;
  ++num_cached_free_;
}

void BlockPool::evict(BlockId block_id) {
  Block& b = blocks_[block_id];
  if (listener_ != nullptr) listener_->on_block_evicted(block_id, b.hash);
  if (event_log_ != nullptr) event_log_->record(KVEventKind::kRemoved, KVTier::kDevice, b.hash);
  cached_.erase(b.hash);
  b.has_hash = false;
  b.hash = 0;
  ++num_evictions_;
}

void BlockPool::evict_for_allocation(int32_t count) {
  const int64_t window = RunAwareEviction::window_size(count, num_cached_free_);
  eviction_window_.clear();
  for (int32_t id = blocks_[sentinel_].next; static_cast<int64_t>(eviction_window_.size()) < window;
       id = blocks_[id].next) {
    eviction_window_.push_back(id);
  }
  const auto is_cached_free = [this](BlockId id) {
    return id >= 0 && id < num_blocks_ && blocks_[static_cast<size_t>(id)].in_lru;
  };
  eviction_.choose(eviction_window_, count, free_runs_, is_cached_free, eviction_chosen_);
  // Evicted least recently freed first, as the listener's contract orders them.
  for (size_t i = 0; i < eviction_window_.size(); ++i) {
    if (!eviction_chosen_[i]) continue;
    const BlockId id = eviction_window_[i];
    lru_unlink(id);
    evict(id);
    free_runs_.insert(id);
  }
}

void BlockPool::allocate(int32_t count, std::vector<BlockId>& out) {
  if (count < 0 || count > num_free_blocks()) {
    throw std::logic_error("BlockPool::allocate: asked for " + std::to_string(count) + " blocks, " +
                           std::to_string(num_free_blocks()) + " free");
  }
  if (count > free_runs_.size()) evict_for_allocation(count - free_runs_.size());
  const size_t first = out.size();
  free_runs_.take(count, out.empty() ? -1 : out.back() + 1, out);
  for (size_t i = first; i < out.size(); ++i) blocks_[out[i]].ref_count = 1;
}

void BlockPool::touch(BlockId block_id) {
  Block& b = blocks_[checked(block_id)];
  if (b.ref_count == 0) {
    if (b.in_lru) {
      lru_unlink(block_id);
    } else {
      free_runs_.erase(block_id);
    }
  }
  ++b.ref_count;
}

void BlockPool::release(const std::vector<BlockId>& block_table) {
  for (auto it = block_table.rbegin(); it != block_table.rend(); ++it) {
    Block& b = blocks_[checked(*it)];
    if (b.ref_count <= 0) throw std::logic_error("BlockPool::release: block " + std::to_string(*it) + " is already free");
    if (--b.ref_count > 0) continue;
    // Uncached blocks are reused first: reusing them loses nothing, so cached prefixes live longer.
    if (b.has_hash) {
      lru_append(*it);
    } else {
      free_runs_.insert(*it);
    }
  }
}

std::optional<BlockId> BlockPool::lookup(BlockHash hash) const {
  return cached_.find(hash);
}

bool BlockPool::cache(BlockId block_id, BlockHash hash) {
  Block& b = blocks_[checked(block_id)];
  if (b.has_hash) return b.hash == hash;
  if (!cached_.insert(hash, block_id)) return false;
  b.has_hash = true;
  b.hash = hash;
  if (b.ref_count == 0) {  // registered while free: it now holds something worth keeping
    free_runs_.erase(block_id);
    lru_append(block_id);
  }
  if (event_log_ != nullptr) event_log_->record(KVEventKind::kStored, KVTier::kDevice, hash);
  return true;
}

std::vector<BlockHash> BlockPool::cached_hashes() const {
  std::vector<BlockHash> hashes;
  hashes.reserve(cached_.size());
  for (BlockId id = 0; id < num_blocks_; ++id) {
    if (blocks_[id].has_hash) hashes.push_back(blocks_[id].hash);
  }
  return hashes;
}

std::optional<BlockHash> BlockPool::hash_of(BlockId block_id) const {
  const Block& b = blocks_[checked(block_id)];
  if (!b.has_hash) return std::nullopt;
  return b.hash;
}

void BlockPool::check_invariants() const {
  auto fail = [](const std::string& what) { throw std::logic_error("BlockPool invariant violated: " + what); };
  free_runs_.check_invariants();
  int32_t walked = 0;
  int32_t prev = sentinel_;
  for (int32_t id = blocks_[sentinel_].next; id != sentinel_; id = blocks_[id].next) {
    if (id < 0 || id >= num_blocks_) fail("LRU list holds invalid id " + std::to_string(id));
    if (++walked > num_blocks_) fail("LRU list has a cycle");
    const Block& b = blocks_[id];
    if (!b.in_lru) fail("block " + std::to_string(id) + " is linked but not marked as in the LRU list");
    if (b.prev != prev) fail("LRU list back link broken at block " + std::to_string(id));
    prev = id;
  }
  if (walked != num_cached_free_) {
    fail("LRU list has " + std::to_string(walked) + " blocks, counter says " + std::to_string(num_cached_free_));
  }
  size_t hashed = 0;
  for (BlockId id = 0; id < num_blocks_; ++id) {
    const Block& b = blocks_[id];
    const std::string name = "block " + std::to_string(id);
    if (b.ref_count < 0) fail(name + " has negative ref count");
    const bool in_runs = free_runs_.contains(id);
    if (b.in_lru && in_runs) fail(name + " is both in the LRU list and in the free runs");
    if ((b.ref_count == 0) != (b.in_lru || in_runs)) fail(name + " free-list membership disagrees with its ref count");
    // Free blocks are filed by what they hold: cached ones in the LRU list, the rest in the runs.
    if (b.ref_count == 0 && b.has_hash != b.in_lru) fail(name + " is free and filed in the wrong free list");
    if (b.has_hash) {
      ++hashed;
      if (cached_.find(b.hash) != id) fail(name + " has a hash missing from the index");
    }
  }
  if (hashed != cached_.size()) fail("hash index has entries for blocks without a hash");
}

}  // namespace rtpllm

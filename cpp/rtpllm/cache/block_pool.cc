#include "rtpllm/cache/block_pool.h"

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
    : num_blocks_(validated_num_blocks(num_blocks)), sentinel_(num_blocks), num_free_(0), cached_(num_blocks) {
  blocks_.resize(static_cast<size_t>(num_blocks) + 1);
  blocks_[sentinel_].prev = blocks_[sentinel_].next = sentinel_;
  for (BlockId id = 0; id < num_blocks; ++id) link_before(id, sentinel_);  // id order: 0 is reused first
}

size_t BlockPool::checked(BlockId block_id) const {
  if (block_id < 0 || block_id >= num_blocks_) {
    throw std::out_of_range("block id " + std::to_string(block_id) + " outside [0, " + std::to_string(num_blocks_) + ")");
  }
  return static_cast<size_t>(block_id);
}

void BlockPool::unlink(BlockId block_id) {
  Block& b = blocks_[block_id];
  blocks_[b.prev].next = b.next;
  blocks_[b.next].prev = b.prev;
  b.prev = b.next = -1;
  b.in_free_list = false;
  --num_free_;
}

void BlockPool::link_before(BlockId block_id, int32_t position) {
  Block& b = blocks_[block_id];
  b.next = position;
  b.prev = blocks_[position].prev;
  blocks_[b.prev].next = block_id;
  blocks_[position].prev = block_id;
  b.in_free_list = true;
  ++num_free_;
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

void BlockPool::allocate(int32_t count, std::vector<BlockId>& out) {
  if (count < 0 || count > num_free_) {
    throw std::logic_error("BlockPool::allocate: asked for " + std::to_string(count) + " blocks, " +
                           std::to_string(num_free_) + " free");
  }
  for (int32_t i = 0; i < count; ++i) {
    const BlockId id = blocks_[sentinel_].next;
    unlink(id);
    if (blocks_[id].has_hash) evict(id);
    blocks_[id].ref_count = 1;
    out.push_back(id);
  }
}

void BlockPool::touch(BlockId block_id) {
  Block& b = blocks_[checked(block_id)];
  if (b.ref_count == 0) unlink(block_id);
  ++b.ref_count;
}

void BlockPool::release(const std::vector<BlockId>& block_table) {
  for (auto it = block_table.rbegin(); it != block_table.rend(); ++it) {
    Block& b = blocks_[checked(*it)];
    if (b.ref_count <= 0) throw std::logic_error("BlockPool::release: block " + std::to_string(*it) + " is already free");
    if (--b.ref_count > 0) continue;
    // Uncached blocks go to the head: reusing them loses nothing, so cached prefixes live longer.
    link_before(*it, b.has_hash ? sentinel_ : blocks_[sentinel_].next);
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
  int32_t walked = 0;
  int32_t prev = sentinel_;
  for (int32_t id = blocks_[sentinel_].next; id != sentinel_; id = blocks_[id].next) {
    if (id < 0 || id >= num_blocks_) fail("free list holds invalid id " + std::to_string(id));
    if (++walked > num_blocks_) fail("free list has a cycle");
    const Block& b = blocks_[id];
    if (!b.in_free_list) fail("block " + std::to_string(id) + " is linked but not marked free");
    if (b.ref_count != 0) fail("free block " + std::to_string(id) + " has ref count " + std::to_string(b.ref_count));
    if (b.prev != prev) fail("free list back link broken at block " + std::to_string(id));
    prev = id;
  }
  if (walked != num_free_) fail("free list has " + std::to_string(walked) + " blocks, counter says " + std::to_string(num_free_));
  size_t hashed = 0;
  for (BlockId id = 0; id < num_blocks_; ++id) {
    const Block& b = blocks_[id];
    if (b.ref_count < 0) fail("block " + std::to_string(id) + " has negative ref count");
    if ((b.ref_count == 0) != b.in_free_list) fail("block " + std::to_string(id) + " free-list membership disagrees with its ref count");
    if (b.has_hash) {
      ++hashed;
      if (cached_.find(b.hash) != id) fail("block " + std::to_string(id) + " has a hash missing from the index");
    }
  }
  if (hashed != cached_.size()) fail("hash index has entries for blocks without a hash");
}

}  // namespace rtpllm

#include "rtpllm/cache/block_hash_index.h"

#include <stdexcept>

namespace rtpllm {

BlockHashIndex::BlockHashIndex(int32_t max_entries) : max_entries_(static_cast<size_t>(max_entries)) {
  // Load factor at most 2/3 keeps probe runs short.
  size_t capacity = 8;
  while (capacity < max_entries_ + max_entries_ / 2) capacity *= 2;
  slots_.resize(capacity);
  mask_ = capacity - 1;
}

size_t BlockHashIndex::find_slot(BlockHash hash) const {
  size_t i = home(hash);
  while (slots_[i].block_id >= 0 && slots_[i].hash != hash) i = (i + 1) & mask_;
  return i;
}

std::optional<BlockId> BlockHashIndex::find(BlockHash hash) const {
  const Slot& slot = slots_[find_slot(hash)];
  if (slot.block_id < 0) return std::nullopt;
  return slot.block_id;
}

bool BlockHashIndex::insert(BlockHash hash, BlockId block_id) {
  const size_t i = find_slot(hash);
  if (slots_[i].block_id >= 0) return false;
  if (size_ == max_entries_) throw std::logic_error("BlockHashIndex: more entries than blocks");
  slots_[i] = Slot{hash, block_id};
  ++size_;
  return true;
}

bool BlockHashIndex::erase(BlockHash hash) {
  size_t hole = find_slot(hash);
  if (slots_[hole].block_id < 0) return false;
  // Backward-shift deletion: pull later entries of the probe run into the hole when their home
  // slot allows it, so lookups never need tombstones.
  for (size_t next = (hole + 1) & mask_; slots_[next].block_id >= 0; next = (next + 1) & mask_) {
    const size_t from_home = (next - home(slots_[next].hash)) & mask_;
    const size_t from_hole = (next - hole) & mask_;
    if (from_home >= from_hole) {
      slots_[hole] = slots_[next];
      hole = next;
    }
  }
  slots_[hole] = Slot{};
  --size_;
  return true;
}

}  // namespace rtpllm

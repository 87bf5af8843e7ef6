// Index of the prefix cache: block hash -> the block holding that prefix's KV.
//
// Open addressing with linear probing in a table sized once for the pool (a pool never holds
// more hashes than blocks), so lookups, inserts and erases never allocate on the step path.
// Keys are already well-mixed 64-bit hashes, so their low bits pick the home slot directly.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <vector>

#include "rtpllm/core/types.h"

namespace rtpllm {

class BlockHashIndex {
 public:
  explicit BlockHashIndex(int32_t max_entries);

  std::optional<BlockId> find(BlockHash hash) const;
  // Returns false (and changes nothing) if the hash is already present.
  bool insert(BlockHash hash, BlockId block_id);
  // Returns whether the hash was present.
  bool erase(BlockHash hash);
  size_t size() const { return size_; }

 private:
  struct Slot {
    BlockHash hash = 0;
    BlockId block_id = -1;  // -1: empty
  };
  size_t home(BlockHash hash) const { return static_cast<size_t>(hash) & mask_; }
  size_t find_slot(BlockHash hash) const;  // the slot holding `hash`, or the empty slot ending its probe

  std::vector<Slot> slots_;
  size_t mask_;
  size_t size_ = 0;
  size_t max_entries_;
};

}  // namespace rtpllm

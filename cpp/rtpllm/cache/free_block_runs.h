// The free blocks that hold nothing worth keeping, as runs of consecutive ids, handed out as few
// runs as possible.
//
// Why runs: a block table whose blocks are consecutive ids is consecutive memory in every layer's
// K and V plane, so a KV transfer (prefill -> decode), a tier copy or a kernel gather moves it in
// one piece per plane instead of one per block. A plain LIFO free list scatters a long-running
// pool's tables: writing a 4k-token prompt into 256 scattered decode blocks is 256 writes per
// layer and plane (16,384 over 32 layers) instead of one.
//
// Structure: the runs are maximal (two runs never touch; insert merges), each known at its first
// block (length) and its last block (first block), and filed in a list per length. A bitmap of
// the lengths that have runs finds the smallest run of at least n blocks (best fit) or the
// largest run in a few word scans. insert, and taking blocks from the front of a run, are O(1)
// plus that scan; nothing allocates after construction.
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "rtpllm/core/types.h"

namespace rtpllm {

class FreeBlockRuns {
 public:
  explicit FreeBlockRuns(int32_t num_blocks);  // empty: no block is free yet

  int32_t size() const { return size_; }  // free blocks held
  int32_t num_runs() const { return num_runs_; }
  // Whether the block is held here; false for any id outside the pool.
  bool contains(BlockId block_id) const {
    return block_id >= 0 && block_id < num_blocks_ && in_set_[static_cast<size_t>(block_id)] != 0;
  }

  // Adds a block (not already held), merging it with the runs on either side.
  void insert(BlockId block_id);

  // Removes one held block from wherever it sits, splitting its run. O(position in its run): for
  // the rare caller that revives a particular free block; allocation goes through take().
  void erase(BlockId block_id);

  // Moves `count` blocks (at most size()) to the end of `out`, ascending within each run, in as
  // few runs as the free runs allow: first the run that starts at `continue_at` (the block after
  // the caller's last one, so that its table stays consecutive; -1 for none), then whole runs,
  // largest first, while none left is long enough, and the rest from the front of the shortest
  // run that is (best fit: long runs stay long for the next large request).
  void take(int32_t count, BlockId continue_at, std::vector<BlockId>& out);

  // The runs as (first block, length), in id order. For tests and invariant checks: O(num_blocks).
  std::vector<std::pair<BlockId, int32_t>> runs() const;

  // Runs, per-length lists, bitmap and counters agree; throws std::logic_error otherwise.
  void check_invariants() const;

 private:
  void add_run(BlockId first, int32_t length);
  void remove_run(BlockId first);
  // Takes `count` blocks from the front of the run starting at `first`.
  void take_front(BlockId first, int32_t count, std::vector<BlockId>& out);

  // The length bitmap: bit L of level 0 is set when some run has length L; bit w of level 1 when
  // word w of level 0 is non-zero.
  void set_length_bit(int32_t length);
  void clear_length_bit(int32_t length);
  int32_t shortest_length_at_least(int32_t length) const;  // 0: none
  int32_t longest_length() const;                         // 0: no runs

  int32_t num_blocks_;
  int32_t size_ = 0;
  int32_t num_runs_ = 0;
  std::vector<uint8_t> in_set_;         // per block: held here
  std::vector<int32_t> run_length_;     // per block: the length of the run it starts, else 0
  std::vector<int32_t> run_first_;      // per block that ends a run: that run's first block
  std::vector<int32_t> next_same_, prev_same_;  // per run start: neighbours in its length's list
  std::vector<int32_t> list_head_;      // per length 1..num_blocks: a run start, or -1
  std::vector<uint64_t> level0_, level1_;
};

}  // namespace rtpllm

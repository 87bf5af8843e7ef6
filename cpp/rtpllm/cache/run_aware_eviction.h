// Which cached free blocks to evict for an allocation, so that with the free uncached blocks they
// form few runs of consecutive ids (see free_block_runs.h for why runs matter).
//
// The pool evicts only when its uncached free blocks are too few, and then exactly as many cached
// blocks as are missing (k). Strict LRU would take the k least recently freed; here the choice
// is among the 2k least recently freed (the window), so a cached block never outlives more than
// k blocks freed after it, and among those it prefers, in order:
//   1. pieces (maximal runs of window blocks) that close the gap between two free runs, shortest
//      first: each joins two runs into one;
//   2. blocks that extend a free run (a piece touching one, or one too long to close its gap,
//      taken from the touching end), oldest pieces first: no new run;
//   3. pieces on their own, longest first (ties: oldest first), the last one cut to size: each is
//      one more run.
// With no run to join (everything isolated), it degenerates to the oldest k: plain LRU.
//
// Cost: O(w log w) for a window of w <= 2k blocks; the buffers are reused, so after warm-up
// nothing allocates.
#pragma once

#include <cstdint>
#include <vector>

#include "rtpllm/cache/free_block_runs.h"
#include "rtpllm/core/types.h"

namespace rtpllm {

class RunAwareEviction {
 public:
  // The window holds at most window_factor * count blocks.
  static constexpr int32_t kWindowFactor = 2;

  // `window`: cached free blocks, least recently freed first (at least `count` of them, each not
  // in `free_runs`). Sets chosen[i] to 1 for the `count` window positions to evict, 0 for others.
  void choose(const std::vector<BlockId>& window, int32_t count, const FreeBlockRuns& free_runs,
              std::vector<uint8_t>& chosen);

 private:
  struct Piece {
    int32_t begin = 0;   // index into sorted_ of its lowest id
    int32_t length = 0;
    int32_t oldest = 0;  // smallest window position (LRU rank) among its blocks
    bool joins_left = false;   // the block before it is free (uncached)
    bool joins_right = false;  // the block after it is free (uncached)
  };
  // Marks `n` blocks of `piece`, from its low end or its high end.
  void take(const Piece& piece, int32_t n, bool from_high_end, std::vector<uint8_t>& chosen);

  std::vector<std::pair<BlockId, int32_t>> sorted_;  // (block id, window position), by id
  std::vector<Piece> pieces_;
  std::vector<int32_t> order_;
};

}  // namespace rtpllm

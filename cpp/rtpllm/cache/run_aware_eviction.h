// Which cached free blocks to evict for an allocation, so that with the free uncached blocks they
// form few runs of consecutive ids (see free_block_runs.h for why runs matter).
//
// The pool evicts only when its uncached free blocks are too few, and then exactly as many cached
// blocks as are missing (k). Strict LRU would take the k least recently freed; here the choice is
// among the 4k least recently freed, but never among the more recently freed half of the cached
// free blocks (the window; at least k): a cached block is never evicted while more than 3k blocks
// freed before it stay cached, and a small cache stays close to LRU. Within the window, cut into
// pieces (maximal runs of consecutive window blocks), it takes in order:
//   1. pieces that close the gap between two free uncached runs, shortest first: each joins two
//      runs into one;
//   2. blocks that extend a free uncached run (a piece touching one, or a gap too long to close),
//      from the touching end, oldest pieces first: no new run;
//   3. pieces on their own: the longest whole while none is long enough for the rest, then the
//      shortest that is (best fit, so long stretches stay whole for the next large request), cut
//      from the end that keeps the rest joined to cached blocks beyond the window (else the older
//      end). Each is one more run.
// Ties go to the least recently freed. With nothing to join and only single blocks, it takes the
// k oldest: plain LRU.
//
// Why a window of 4k: after churn the oldest cached blocks are what finished requests left, long
// stretches (their prompts) among single blocks (their decode steps, interleaved with other
// requests'). Strict LRU (and the old free list, which also handed a freed table back tail first:
// every block a run of its own) scatters a 256-block reservation over ~250 runs; a window of 2k,
// 4k, 8k brings it to ~15, ~4, ~2 in a decode-instance churn with room to spare
// (tests/cpp/block_pool_runs_test.cc), and 4k keeps eviction close to LRU. In a pool that runs
// full, the half-of-the-cache bound leaves less choice (~40 to 60 runs: pd_block_runs_test.cc).
//
// Cost: O(w + p log p) for a window of w <= 4k blocks in p pieces; the buffers are reused, so
// after warm-up nothing allocates.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

#include "rtpllm/cache/free_block_runs.h"
#include "rtpllm/core/types.h"

namespace rtpllm {

class RunAwareEviction {
 public:
  explicit RunAwareEviction(int32_t num_blocks);  // block ids are in [0, num_blocks)

  // How many of the least recently freed cached blocks to choose `count` victims among: up to
  // kWindowFactor * count, but no more than a kWindowShare-th of the cached free blocks (and at
  // least `count`), so that a small cache stays (close to) LRU.
  static constexpr int32_t kWindowFactor = 4;
  static constexpr int32_t kWindowShare = 2;
  static int64_t window_size(int32_t count, int32_t num_cached_free) {
    const int64_t cap = std::max<int64_t>(count, num_cached_free / kWindowShare);
    return std::min<int64_t>(std::min<int64_t>(int64_t{kWindowFactor} * count, cap), num_cached_free);
  }

  // `window`: cached free blocks, least recently freed first (at least `count` of them, each not
  // in `free_runs`); `is_cached_free`: whether a block (any id, even outside the pool) is a cached
  // free block. Sets chosen[i] to 1 for the `count` window positions to evict, 0 for the others.
  void choose(const std::vector<BlockId>& window, int32_t count, const FreeBlockRuns& free_runs,
              const std::function<bool(BlockId)>& is_cached_free, std::vector<uint8_t>& chosen);

 private:
  struct Piece {
    BlockId first = 0;  // its lowest block
    int32_t length = 0;
    int32_t oldest = 0;  // smallest window position (LRU rank) among its blocks
    bool joins_left = false;    // the block before it is free and uncached
    bool joins_right = false;   // the block after it is free and uncached
    bool cached_below = false;  // the block before it is free and cached (outside the window)
    bool cached_above = false;  // the block after it is free and cached
    bool high_is_older = false; // its highest block was freed before its lowest
  };
  bool in_window(BlockId block_id) const;
  // Marks `n` blocks of `piece`, from its low end or its high end.
  void take(const Piece& piece, int32_t n, bool from_high_end, std::vector<uint8_t>& chosen) const;

  std::vector<int32_t> rank_;  // per block: its window position during choose(), else -1
  std::vector<Piece> pieces_;
  std::vector<int32_t> order_;
};

}  // namespace rtpllm

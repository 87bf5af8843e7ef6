#include "rtpllm/cache/run_aware_eviction.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace rtpllm {

RunAwareEviction::RunAwareEviction(int32_t num_blocks) {
  if (num_blocks <= 0) throw std::invalid_argument("num_blocks: must be positive, got " + std::to_string(num_blocks));
  rank_.assign(static_cast<size_t>(num_blocks), -1);
}

bool RunAwareEviction::in_window(BlockId block_id) const {
  return block_id >= 0 && static_cast<size_t>(block_id) < rank_.size() && rank_[static_cast<size_t>(block_id)] >= 0;
}

void RunAwareEviction::take(const Piece& piece, int32_t n, bool from_high_end, std::vector<uint8_t>& chosen) const {
  const BlockId first = from_high_end ? piece.first + piece.length - n : piece.first;
  for (BlockId id = first; id < first + n; ++id) chosen[static_cast<size_t>(rank_[static_cast<size_t>(id)])] = 1;
}

void RunAwareEviction::choose(const std::vector<BlockId>& window, int32_t count, const FreeBlockRuns& free_runs,
                              const std::function<bool(BlockId)>& is_cached_free, std::vector<uint8_t>& chosen) {
  if (count < 0 || static_cast<size_t>(count) > window.size()) {
    throw std::logic_error("RunAwareEviction::choose: " + std::to_string(count) + " victims from a window of " +
                           std::to_string(window.size()));
  }
  chosen.assign(window.size(), 0);
  if (count == 0) return;
  if (static_cast<size_t>(count) == window.size()) {
    std::fill(chosen.begin(), chosen.end(), 1);
    return;
  }

  // Cut the window into pieces of consecutive ids: O(window), no sort (this runs on every step
  // that evicts). rank_ says where each window block sits in LRU order.
  for (size_t i = 0; i < window.size(); ++i) rank_[static_cast<size_t>(window[i])] = static_cast<int32_t>(i);
  pieces_.clear();
  for (BlockId low : window) {
    if (in_window(low - 1)) continue;  // not the lowest block of its piece
    Piece p;
    p.first = low;
    p.oldest = rank_[static_cast<size_t>(low)];
    for (BlockId id = low; in_window(id); ++id) {
      ++p.length;
      p.oldest = std::min(p.oldest, rank_[static_cast<size_t>(id)]);
    }
    const BlockId high = low + p.length - 1;
    p.joins_left = free_runs.contains(low - 1);
    p.joins_right = free_runs.contains(high + 1);
    p.cached_below = is_cached_free(low - 1);
    p.cached_above = is_cached_free(high + 1);
    p.high_is_older = rank_[static_cast<size_t>(high)] < rank_[static_cast<size_t>(low)];
    pieces_.push_back(p);
  }

  int32_t remaining = count;
  // The pieces passing `keep`, ordered by `less`, into order_.
  auto select = [&](auto&& keep, auto&& less) {
    order_.clear();
    for (int32_t i = 0; i < static_cast<int32_t>(pieces_.size()); ++i) {
      if (pieces_[i].length > 0 && keep(pieces_[i])) order_.push_back(i);
    }
    std::sort(order_.begin(), order_.end(), [&](int32_t a, int32_t b) { return less(pieces_[a], pieces_[b]); });
  };
  auto use_up = [&](Piece& p, int32_t n, bool from_high_end) {
    take(p, n, from_high_end, chosen);
    remaining -= n;
    p.length = 0;  // later steps skip it
  };

  // 1. Gap closers, shortest first: whole pieces only (a part only extends, step 2).
  select([](const Piece& p) { return p.joins_left && p.joins_right; },
         [](const Piece& a, const Piece& b) { return a.length != b.length ? a.length < b.length : a.oldest < b.oldest; });
  for (int32_t i : order_) {
    if (pieces_[i].length <= remaining) use_up(pieces_[i], pieces_[i].length, false);
  }
  // 2. Extensions of a free run, oldest pieces first, from the end that touches it.
  select([](const Piece& p) { return p.joins_left || p.joins_right; },
         [](const Piece& a, const Piece& b) { return a.oldest < b.oldest; });
  for (int32_t i : order_) {
    if (remaining == 0) break;
    Piece& p = pieces_[i];
    use_up(p, std::min(p.length, remaining), /*from_high_end=*/!p.joins_left);
  }
  // 3. Pieces on their own. While one is long enough for the rest, the shortest such (best fit:
  // long stretches stay whole for the next large allocation); before that, the longest whole.
  // Ordered by length, and within a length the least recently freed last: the longest whole
  // pieces are taken from the back, oldest first, and a best fit is the last of its length group.
  select([](const Piece&) { return true; }, [](const Piece& a, const Piece& b) {
    return a.length != b.length ? a.length < b.length : a.oldest > b.oldest;
  });
  const auto shorter = [&](int32_t i, int32_t n) { return pieces_[i].length < n; };
  const auto longer = [&](int32_t n, int32_t i) { return n < pieces_[i].length; };
  auto end = order_.end();  // [order_.begin(), end): not taken yet
  while (remaining > 0 && end != order_.begin()) {
    const auto fit = std::lower_bound(order_.begin(), end, remaining, shorter);
    if (fit != end) {
      Piece& p = pieces_[*(std::upper_bound(fit, end, pieces_[*fit].length, longer) - 1)];
      // Cut from the end that leaves the rest of the piece joined to the cached blocks beyond
      // the window, if only one end does; otherwise from the older end.
      use_up(p, remaining, p.cached_below != p.cached_above ? p.cached_below : p.high_is_older);
      break;
    }
    --end;
    use_up(pieces_[*end], pieces_[*end].length, false);
  }

  for (BlockId id : window) rank_[static_cast<size_t>(id)] = -1;
  if (remaining != 0) throw std::logic_error("RunAwareEviction::choose: the window ran out of blocks");
}

}  // namespace rtpllm

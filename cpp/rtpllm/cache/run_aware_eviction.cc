#include "rtpllm/cache/run_aware_eviction.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace rtpllm {

void RunAwareEviction::take(const Piece& piece, int32_t n, bool from_high_end, std::vector<uint8_t>& chosen) {
  const int32_t first = from_high_end ? piece.begin + piece.length - n : piece.begin;
  for (int32_t i = first; i < first + n; ++i) chosen[static_cast<size_t>(sorted_[i].second)] = 1;
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

  // The window's blocks in id order, cut into pieces of consecutive ids.
  sorted_.clear();
  for (size_t i = 0; i < window.size(); ++i) sorted_.emplace_back(window[i], static_cast<int32_t>(i));
  std::sort(sorted_.begin(), sorted_.end());
  pieces_.clear();
  for (int32_t i = 0; i < static_cast<int32_t>(sorted_.size()); ++i) {
    if (i == 0 || sorted_[i].first != sorted_[i - 1].first + 1) pieces_.push_back(Piece{i, 0, sorted_[i].second});
    Piece& p = pieces_.back();
    ++p.length;
    p.oldest = std::min(p.oldest, sorted_[i].second);
  }
  for (Piece& p : pieces_) {
    const BlockId low = sorted_[p.begin].first, high = sorted_[p.begin + p.length - 1].first;
    p.joins_left = free_runs.contains(low - 1);
    p.joins_right = free_runs.contains(high + 1);
    p.cached_below = is_cached_free(low - 1);
    p.cached_above = is_cached_free(high + 1);
    p.high_is_older = sorted_[p.begin + p.length - 1].second < sorted_[p.begin].second;
  }

  int32_t remaining = count;
  auto sort_order = [&](auto&& less) {
    order_.resize(pieces_.size());
    for (size_t i = 0; i < order_.size(); ++i) order_[i] = static_cast<int32_t>(i);
    std::sort(order_.begin(), order_.end(), [&](int32_t a, int32_t b) { return less(pieces_[a], pieces_[b]); });
  };
  // 1. Gap closers, shortest first: whole pieces only (a part only extends, step 2).
  sort_order([](const Piece& a, const Piece& b) {
    return a.length != b.length ? a.length < b.length : a.oldest < b.oldest;
  });
  for (int32_t i : order_) {
    Piece& p = pieces_[i];
    if (!(p.joins_left && p.joins_right) || p.length > remaining) continue;
    take(p, p.length, false, chosen);
    remaining -= p.length;
    p.length = 0;  // used up: later steps skip it
  }
  // 2. Extensions of a free run, oldest pieces first, from the end that touches it.
  sort_order([](const Piece& a, const Piece& b) { return a.oldest < b.oldest; });
  for (int32_t i : order_) {
    if (remaining == 0) return;
    Piece& p = pieces_[i];
    if (p.length == 0 || !(p.joins_left || p.joins_right)) continue;
    const int32_t n = std::min(p.length, remaining);
    take(p, n, /*from_high_end=*/!p.joins_left, chosen);
    remaining -= n;
    p.length = 0;
  }
  // 3. Pieces on their own. While one is long enough for the rest, the shortest such (best fit:
  // long stretches stay whole for the next large allocation); before that, the longest whole.
  order_.clear();
  for (int32_t i = 0; i < static_cast<int32_t>(pieces_.size()); ++i) {
    if (pieces_[i].length > 0) order_.push_back(i);
  }
  // By length, and within a length the least recently freed last: the longest whole pieces are
  // taken from the back, oldest first, and a best fit is the last of its length group.
  std::sort(order_.begin(), order_.end(), [&](int32_t a, int32_t b) {
    const Piece &pa = pieces_[a], &pb = pieces_[b];
    return pa.length != pb.length ? pa.length < pb.length : pa.oldest > pb.oldest;
  });
  const auto shorter = [&](int32_t i, int32_t n) { return pieces_[i].length < n; };
  const auto longer = [&](int32_t n, int32_t i) { return n < pieces_[i].length; };
  auto end = order_.end();  // [order_.begin(), end): not taken yet
  while (remaining > 0 && end != order_.begin()) {
    const auto fit = std::lower_bound(order_.begin(), end, remaining, shorter);
    if (fit != end) {
      const Piece& p = pieces_[*(std::upper_bound(fit, end, pieces_[*fit].length, longer) - 1)];
      // Cut from the end that leaves the rest of the piece joined to the cached blocks beyond
      // the window, if only one end does; otherwise from the older end.
      const bool from_high = p.cached_below != p.cached_above ? p.cached_below : p.high_is_older;
      take(p, remaining, from_high, chosen);
      remaining = 0;
      break;
    }
    --end;
    take(pieces_[*end], pieces_[*end].length, false, chosen);
    remaining -= pieces_[*end].length;
  }
  if (remaining != 0) throw std::logic_error("RunAwareEviction::choose: the window ran out of blocks");
}

}  // namespace rtpllm

#include "rtpllm/cache/free_block_runs.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace rtpllm {
namespace {

constexpr int kWordBits = 64;

size_t words_for(size_t bits) { return (bits + kWordBits - 1) / kWordBits; }

}  // namespace

FreeBlockRuns::FreeBlockRuns(int32_t num_blocks) : num_blocks_(num_blocks) {
  if (num_blocks <= 0) throw std::invalid_argument("num_blocks: must be positive, got " + std::to_string(num_blocks));
  const auto n = static_cast<size_t>(num_blocks);
  in_set_.assign(n, 0);
  run_length_.assign(n, 0);
  run_first_.assign(n, -1);
  next_same_.assign(n, -1);
  prev_same_.assign(n, -1);
  list_head_.assign(n + 1, -1);  // lengths 1..num_blocks
  level0_.assign(words_for(n + 1), 0);
  level1_.assign(words_for(level0_.size()), 0);
}

void FreeBlockRuns::set_length_bit(int32_t length) {
  const auto word = static_cast<size_t>(length) / kWordBits;
  level0_[word] |= uint64_t{1} << (length % kWordBits);
  level1_[word / kWordBits] |= uint64_t{1} << (word % kWordBits);
}

void FreeBlockRuns::clear_length_bit(int32_t length) {
  const auto word = static_cast<size_t>(length) / kWordBits;
  level0_[word] &= ~(uint64_t{1} << (length % kWordBits));
  if (level0_[word] == 0) level1_[word / kWordBits] &= ~(uint64_t{1} << (word % kWordBits));
}

int32_t FreeBlockRuns::shortest_length_at_least(int32_t length) const {
  if (length > num_blocks_) return 0;
  size_t word = static_cast<size_t>(length) / kWordBits;
  // The rest of the word `length` falls in, then the next non-empty word found through level 1.
  const uint64_t here = level0_[word] & (~uint64_t{0} << (length % kWordBits));
  if (here != 0) return static_cast<int32_t>(word * kWordBits + __builtin_ctzll(here));
  ++word;
  size_t summary = word / kWordBits;
  if (summary >= level1_.size()) return 0;
  uint64_t bits = (word % kWordBits == 0) ? level1_[summary] : level1_[summary] & (~uint64_t{0} << (word % kWordBits));
  while (bits == 0) {
    if (++summary >= level1_.size()) return 0;
    bits = level1_[summary];
  }
  word = summary * kWordBits + __builtin_ctzll(bits);
  return static_cast<int32_t>(word * kWordBits + __builtin_ctzll(level0_[word]));
}

int32_t FreeBlockRuns::longest_length() const {
  for (size_t summary = level1_.size(); summary-- > 0;) {
    if (level1_[summary] == 0) continue;
    const size_t word = summary * kWordBits + (kWordBits - 1 - __builtin_clzll(level1_[summary]));
    return static_cast<int32_t>(word * kWordBits + (kWordBits - 1 - __builtin_clzll(level0_[word])));
  }
  return 0;
}

void FreeBlockRuns::add_run(BlockId first, int32_t length) {
  run_length_[first] = length;
  run_first_[first + length - 1] = first;
  const int32_t head = list_head_[length];
  prev_same_[first] = -1;
  next_same_[first] = head;
  if (head >= 0) prev_same_[head] = first;
  list_head_[length] = first;
  if (head < 0) set_length_bit(length);
  ++num_runs_;
}

void FreeBlockRuns::remove_run(BlockId first) {
  const int32_t length = run_length_[first];
  const int32_t prev = prev_same_[first], next = next_same_[first];
  if (prev >= 0) {
    next_same_[prev] = next;
  } else {
    list_head_[length] = next;
    if (next < 0) clear_length_bit(length);
  }
  if (next >= 0) prev_same_[next] = prev;
  run_length_[first] = 0;
  run_first_[first + length - 1] = -1;
  prev_same_[first] = next_same_[first] = -1;
  --num_runs_;
}

void FreeBlockRuns::insert(BlockId block_id) {
  if (block_id < 0 || block_id >= num_blocks_ || contains(block_id)) {
    throw std::logic_error("FreeBlockRuns::insert: block " + std::to_string(block_id) + " is invalid or already free");
  }
  BlockId first = block_id;
  int32_t length = 1;
  if (contains(block_id - 1)) {  // block_id - 1 ends a run: join it
    first = run_first_[block_id - 1];
    length += run_length_[first];
    remove_run(first);
  }
  if (contains(block_id + 1)) {  // block_id + 1 starts a run
    length += run_length_[block_id + 1];
    remove_run(block_id + 1);
  }
  in_set_[block_id] = 1;
  add_run(first, length);
  ++size_;
}

void FreeBlockRuns::erase(BlockId block_id) {
  if (!contains(block_id)) {
    throw std::logic_error("FreeBlockRuns::erase: block " + std::to_string(block_id) + " is not free");
  }
  BlockId first = block_id;
  while (run_length_[first] == 0) --first;  // every held block lies in a run; its start is held too
  const int32_t length = run_length_[first];
  remove_run(first);
  if (block_id > first) add_run(first, block_id - first);
  if (block_id < first + length - 1) add_run(block_id + 1, first + length - 1 - block_id);
  in_set_[block_id] = 0;
  --size_;
}

void FreeBlockRuns::take_front(BlockId first, int32_t count, std::vector<BlockId>& out) {
  const int32_t length = run_length_[first];
  remove_run(first);
  if (count < length) add_run(first + count, length - count);
  for (BlockId id = first; id < first + count; ++id) {
    in_set_[id] = 0;
    out.push_back(id);
  }
  size_ -= count;
}

void FreeBlockRuns::take(int32_t count, BlockId continue_at, std::vector<BlockId>& out) {
  if (count < 0 || count > size_) {
    throw std::logic_error("FreeBlockRuns::take: asked for " + std::to_string(count) + " blocks, " +
                           std::to_string(size_) + " free");
  }
  int32_t remaining = count;
  if (remaining > 0 && continue_at >= 0 && continue_at < num_blocks_ && run_length_[continue_at] > 0) {
    const int32_t n = std::min(remaining, run_length_[continue_at]);
    take_front(continue_at, n, out);
    remaining -= n;
  }
  while (remaining > 0) {
    const int32_t fit = shortest_length_at_least(remaining);
    if (fit > 0) {
      take_front(list_head_[fit], remaining, out);
      return;
    }
    const int32_t longest = longest_length();
    take_front(list_head_[longest], longest, out);
    remaining -= longest;
  }
}

std::vector<std::pair<BlockId, int32_t>> FreeBlockRuns::runs() const {
  std::vector<std::pair<BlockId, int32_t>> result;
  for (BlockId id = 0; id < num_blocks_; ++id) {
    if (run_length_[id] > 0) result.emplace_back(id, run_length_[id]);
  }
  return result;
}

void FreeBlockRuns::check_invariants() const {
  auto fail = [](const std::string& what) { throw std::logic_error("FreeBlockRuns invariant violated: " + what); };
  int32_t held = 0, runs_seen = 0;
  for (BlockId id = 0; id < num_blocks_;) {
    if (!contains(id)) {
      if (run_length_[id] != 0) fail("block " + std::to_string(id) + " starts a run but is not free");
      ++id;
      continue;
    }
    const int32_t length = run_length_[id];
    if (length <= 0 || id + length > num_blocks_) fail("free block " + std::to_string(id) + " does not start a run");
    for (BlockId b = id + 1; b < id + length; ++b) {
      if (!contains(b) || run_length_[b] != 0) fail("run at " + std::to_string(id) + " is broken at " + std::to_string(b));
    }
    if (run_first_[id + length - 1] != id) fail("run at " + std::to_string(id) + " has a wrong end link");
    if (contains(id + length)) fail("runs at " + std::to_string(id) + " and after touch");
    held += length;
    ++runs_seen;
    id += length;
  }
  if (held != size_ || runs_seen != num_runs_) fail("counters disagree with the runs");
  int32_t listed = 0;
  for (int32_t length = 1; length <= num_blocks_; ++length) {
    const bool bit = (level0_[length / kWordBits] >> (length % kWordBits)) & 1;
    if (bit != (list_head_[length] >= 0)) fail("length bitmap disagrees at length " + std::to_string(length));
    int32_t prev = -1;
    for (int32_t first = list_head_[length]; first >= 0; first = next_same_[first]) {
      if (run_length_[first] != length) fail("run at " + std::to_string(first) + " is in the wrong length list");
      if (prev_same_[first] != prev) fail("length list back link broken at " + std::to_string(first));
      prev = first;
      if (++listed > num_runs_) fail("length lists have a cycle");
    }
  }
  if (listed != num_runs_) fail("length lists miss runs");
  for (size_t word = 0; word < level0_.size(); ++word) {
    const bool bit = (level1_[word / kWordBits] >> (word % kWordBits)) & 1;
    if (bit != (level0_[word] != 0)) fail("length summary bitmap disagrees at word " + std::to_string(word));
  }
}

}  // namespace rtpllm

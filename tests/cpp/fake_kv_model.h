// Test double for the model runner that checks the scheduler's KV bookkeeping end to end.
//
// The "KV" of a token is a fingerprint of the whole context up to it: fp(p) = mix(fp(p - 1), token p),
// where fp(p - 1) is READ FROM THE PAGED CACHE through the batch's block table, as attention would.
// A wrong block table, slot mapping, prefix-cache hit or a block reused while still held makes a
// read-back fingerprint differ from the one computed from the request's true tokens. The sampled
// token is derived from the fingerprint, so outputs are a pure function of the token context:
// preemption, chunking and prefix sharing must not change them.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "rtpllm/sched/scheduled_batch.h"

namespace rtpllm::testing {

class FakeKVModel {
 public:
  FakeKVModel(int32_t num_blocks, int32_t block_size, int32_t vocab_size)
      : block_size_(block_size), vocab_size_(vocab_size), cache_(static_cast<size_t>(num_blocks) * block_size, kEmpty) {}

  void add_request(RequestId id, const std::vector<TokenId>& prompt, uint64_t extra_key = 0) {
    Known& k = known_[id];
    k.tokens = prompt;
    k.fingerprints.clear();
    k.seed = mix(extra_key, 0x5bd1e995ULL);
  }
  void append_token(RequestId id, TokenId token) { known_.at(id).tokens.push_back(token); }
  void forget(RequestId id) { known_.erase(id); }
  const std::vector<TokenId>& tokens(RequestId id) const { return known_.at(id).tokens; }

  // Proposed tokens for the lookahead slots of a speculative batch, per request, in order.
  using Drafts = std::unordered_map<RequestId, std::vector<TokenId>>;

  // Runs one step: checks the batch against the requests' true tokens and the cache contents,
  // writes the new tokens' fingerprints, and returns the model's token at every verified row
  // (one per logits index without speculation). Lookahead slots take their tokens from `drafts`;
  // their fingerprints are written like any other, so KV of a rejected draft that the scheduler
  // wrongly kept would be read back later and fail the check.
  std::vector<TokenId> run(const ScheduledBatch& batch, const Drafts* drafts = nullptr) {
    check_layout(batch);
    std::vector<TokenId> sampled;
    int32_t next_sampled = 0;
    int32_t next_draft = 0;
    for (int32_t i = 0; i < batch.num_seqs; ++i) {
      const RequestId id = batch.request_ids[i];
      Known& k = known_.at(id);
      const auto known_size = static_cast<int32_t>(k.tokens.size());
      const int32_t start = batch.num_computed[i];
      const int32_t end = batch.seq_lens[i];
      const int32_t* row = batch.block_tables.data() + static_cast<size_t>(i) * batch.max_blocks_per_seq;
      // Attention reads the whole cached context.
      for (int32_t pos = 0; pos < start; ++pos) {
        if (cache_[slot(row, pos)] != reference(k, pos)) {
          fail("request " + std::to_string(id) + " reads wrong KV at position " + std::to_string(pos));
        }
      }
      uint64_t fp = start == 0 ? k.seed : cache_[slot(row, start - 1)];
      for (int32_t t = batch.query_start_loc[i]; t < batch.query_start_loc[i + 1]; ++t) {
        const int32_t pos = batch.positions[t];
        if (pos != start + (t - batch.query_start_loc[i])) fail("positions are not contiguous");
        TokenId token = batch.input_token_ids[t];
        if (pos >= known_size) {
          if (token != kDraftToken || drafts == nullptr || batch.draft_token_indices[next_draft++] != t) {
            fail("computes a token that does not exist yet");
          }
          token = drafts->at(id).at(static_cast<size_t>(pos - known_size));
        } else if (token != k.tokens[pos]) {
          fail("request " + std::to_string(id) + " has the wrong input token at position " + std::to_string(pos));
        }
        if (batch.slot_mapping[t] != slot(row, pos)) fail("slot mapping disagrees with the block table");
        fp = mix(fp, static_cast<uint64_t>(token));
        cache_[batch.slot_mapping[t]] = fp;
      }
      const int32_t num_drafts = std::max(0, end - known_size);
      if (end - num_drafts == known_size) {
        if (next_sampled >= batch.num_sampled || batch.sampled_request_ids[next_sampled] != id ||
            batch.logits_indices[next_sampled] != batch.query_start_loc[i + 1] - 1 - num_drafts ||
            batch.draft_counts[next_sampled] != num_drafts) {
          fail("request " + std::to_string(id) + " reached its last token but is not sampled at it");
        }
        // The model's token at each verified position: the last known one, then each draft.
        for (int32_t v = batch.verify_offsets[next_sampled]; v < batch.verify_offsets[next_sampled + 1]; ++v) {
          const int32_t pos = batch.positions[batch.verify_logits_indices[v]];
          sampled.push_back(static_cast<TokenId>(cache_[slot(row, pos)] % static_cast<uint64_t>(vocab_size_)));
        }
        ++next_sampled;
      }
    }
    if (next_sampled != batch.num_sampled) fail("samples a sequence that has not reached its last token");
    if (next_draft != batch.num_draft_tokens) fail("lookahead slots outside the sampled sequences' tails");
    return sampled;
  }

  // The next n tokens a request produces from its current context (what a perfect proposer guesses).
  std::vector<TokenId> continuation(RequestId id, int32_t n) {
    Known k = known_.at(id);
    std::vector<TokenId> out;
    for (int32_t i = 0; i < n; ++i) {
      out.push_back(static_cast<TokenId>(reference(k, static_cast<int32_t>(k.tokens.size()) - 1) % static_cast<uint64_t>(vocab_size_)));
      k.tokens.push_back(out.back());
    }
    return out;
  }

  // A block's KV (one fingerprint per slot), as a tier's copy engine reads and writes it.
  std::vector<uint64_t> read_block(BlockId block) const {
    const auto first = cache_.begin() + static_cast<std::ptrdiff_t>(block) * block_size_;
    return std::vector<uint64_t>(first, first + block_size_);
  }
  void write_block(BlockId block, const std::vector<uint64_t>& kv) {
    std::copy(kv.begin(), kv.end(), cache_.begin() + static_cast<std::ptrdiff_t>(block) * block_size_);
  }

  // The output a request must produce for a context, whatever the scheduler did.
  TokenId expected_next_token(RequestId id) {
    Known& k = known_.at(id);
    return static_cast<TokenId>(reference(k, static_cast<int32_t>(k.tokens.size()) - 1) % static_cast<uint64_t>(vocab_size_));
  }

 private:
  struct Known {
    std::vector<TokenId> tokens;
    std::vector<uint64_t> fingerprints;  // reference fp per position, filled lazily
    uint64_t seed = 0;
  };
  static constexpr uint64_t kEmpty = 0xdeadbeefdeadbeefULL;

  static uint64_t mix(uint64_t a, uint64_t b) {
    uint64_t x = a * 0x9e3779b97f4a7c15ULL ^ (b + 0x632be59bd9b4e019ULL + (a << 6) + (a >> 2));
    x ^= x >> 31;
    x *= 0xbf58476d1ce4e5b9ULL;
    return x ^ (x >> 29);
  }
  static void fail(const std::string& what) { throw std::runtime_error("FakeKVModel: " + what); }

  int64_t slot(const int32_t* row, int32_t pos) const {
    return static_cast<int64_t>(row[pos / block_size_]) * block_size_ + pos % block_size_;
  }

  uint64_t reference(Known& k, int32_t pos) {
    while (static_cast<int32_t>(k.fingerprints.size()) <= pos) {
      const size_t p = k.fingerprints.size();
      const uint64_t prev = p == 0 ? k.seed : k.fingerprints[p - 1];
      k.fingerprints.push_back(mix(prev, static_cast<uint64_t>(k.tokens[p])));
    }
    return k.fingerprints[pos];
  }

  void check_layout(const ScheduledBatch& b) const {
    if (b.query_start_loc.size() != static_cast<size_t>(b.num_seqs) + 1 || b.query_start_loc[0] != 0 ||
        b.query_start_loc[b.num_seqs] != b.num_tokens) {
      fail("query_start_loc does not cover the batch");
    }
    for (int32_t i = 0; i < b.num_seqs; ++i) {
      const int32_t n = b.query_start_loc[i + 1] - b.query_start_loc[i];
      if (n <= 0 || n > b.max_query_len) fail("a sequence computes no tokens or more than max_query_len");
      if (b.seq_lens[i] != b.num_computed[i] + n || b.seq_lens[i] > b.max_seq_len) fail("seq_lens disagree");
      if ((b.seq_lens[i] + block_size_ - 1) / block_size_ > b.max_blocks_per_seq) fail("block table too short");
    }
  }

  int32_t block_size_;
  int32_t vocab_size_;
  std::vector<uint64_t> cache_;  // [num_blocks * block_size] one fingerprint per slot
  std::unordered_map<RequestId, Known> known_;
};

}  // namespace rtpllm::testing

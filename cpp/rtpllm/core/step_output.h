// What one update() reports: per request, the tokens it gained this step and whether it finished.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "rtpllm/core/types.h"

namespace rtpllm {

// One request's result, owning its tokens (what the Python binding hands out).
struct StepOutput {
  RequestId request_id = 0;
  std::vector<TokenId> new_token_ids;
  bool finished = false;
  FinishReason finish_reason = FinishReason::NONE;
  TokenId stop_token_id = -1;  // the stop id that finished the request, or -1
};

// All results of one step, flattened so that a step allocates nothing once the buffers have
// grown: entry i's tokens are token_ids[entries[i].token_begin, + token_count). A request
// appears only when it gained tokens or finished (a prefill chunk that samples nothing is silent).
class StepOutputs {
 public:
  struct Entry {
    RequestId request_id;
    int32_t token_begin;
    int32_t token_count;
    bool finished;
    FinishReason finish_reason;
    TokenId stop_token_id;
  };

  void clear() {
    entries_.clear();
    token_ids_.clear();
  }
  void add(RequestId request_id, const TokenId* tokens, int32_t num_tokens, FinishReason reason, TokenId stop_token_id);

  size_t size() const { return entries_.size(); }
  bool empty() const { return entries_.empty(); }
  const Entry& entry(size_t i) const { return entries_[i]; }
  const TokenId* tokens(size_t i) const { return token_ids_.data() + entries_[i].token_begin; }
  StepOutput materialize(size_t i) const;

 private:
  std::vector<Entry> entries_;
  std::vector<TokenId> token_ids_;
};

}  // namespace rtpllm

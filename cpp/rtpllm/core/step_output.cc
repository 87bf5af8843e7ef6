#include "rtpllm/core/step_output.h"

namespace rtpllm {

void StepOutputs::add(RequestId request_id, const TokenId* tokens, int32_t num_tokens, FinishReason reason,
                      TokenId stop_token_id) {
  const auto begin = static_cast<int32_t>(token_ids_.size());
  token_ids_.insert(token_ids_.end(), tokens, tokens + num_tokens);
  entries_.push_back(Entry{request_id, begin, num_tokens, reason != FinishReason::NONE, reason, stop_token_id});
}

StepOutput StepOutputs::materialize(size_t i) const {
  const Entry& e = entries_[i];
  StepOutput out;
  out.request_id = e.request_id;
  out.new_token_ids.assign(tokens(i), tokens(i) + e.token_count);
  out.finished = e.finished;
  out.finish_reason = e.finish_reason;
  out.stop_token_id = e.stop_token_id;
  return out;
}

}  // namespace rtpllm

#include "rtpllm/core/request.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace rtpllm {
namespace {

[[noreturn]] void reject(const char* field, const std::string& message) {
  throw std::invalid_argument(std::string(field) + ": " + message);
}

void require_token_ids(const std::vector<TokenId>& ids, const char* field) {
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0) reject(field, "token ids must be non-negative, got " + std::to_string(ids[i]) + " at index " + std::to_string(i));
  }
}

}  // namespace

Request::Request(const RequestSpec& spec)
    : id(spec.request_id),
      token_ids(spec.prompt_token_ids),
      num_prompt_tokens(static_cast<int32_t>(spec.prompt_token_ids.size())),
      max_new_tokens(spec.max_new_tokens),
      min_new_tokens(spec.min_new_tokens),
      stop_token_ids(spec.stop_token_ids),
      ignore_eos(spec.ignore_eos),
      priority(spec.priority),
      arrival_time(spec.arrival_time),
      extra_key(spec.extra_key) {
  // Messages are built only on failure: this runs for every request.
  if (spec.prompt_token_ids.empty()) reject("prompt_token_ids", "must not be empty");
  if (spec.prompt_token_ids.size() >= static_cast<size_t>(INT32_MAX)) reject("prompt_token_ids", "too many tokens");
  require_token_ids(spec.prompt_token_ids, "prompt_token_ids");
  require_token_ids(spec.stop_token_ids, "stop_token_ids");
  if (max_new_tokens < 1) reject("max_new_tokens", "must be >= 1, got " + std::to_string(max_new_tokens));
  if (min_new_tokens < 0 || min_new_tokens > max_new_tokens) {
    reject("min_new_tokens", "must be in [0, max_new_tokens=" + std::to_string(max_new_tokens) + "], got " +
                                 std::to_string(min_new_tokens));
  }
  if (!std::isfinite(arrival_time)) reject("arrival_time", "must be finite");
  std::sort(stop_token_ids.begin(), stop_token_ids.end());
  stop_token_ids.erase(std::unique(stop_token_ids.begin(), stop_token_ids.end()), stop_token_ids.end());
  // Room for a typical generation up front, so decode steps rarely reallocate.
  token_ids.reserve(token_ids.size() + static_cast<size_t>(std::min(max_new_tokens, 256)));
}

bool Request::is_stop_token(TokenId token) const {
  // Usually one to three ids (EOS variants): a linear scan beats a binary search.
  if (stop_token_ids.size() <= 8) {
    return std::find(stop_token_ids.begin(), stop_token_ids.end(), token) != stop_token_ids.end();
  }
  return std::binary_search(stop_token_ids.begin(), stop_token_ids.end(), token);
}

}  // namespace rtpllm

#include "rtpllm/sched/speculation.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace rtpllm {

int32_t max_lookahead(const Request& request, int32_t max_context_len) {
  const int32_t room_new = request.max_new_tokens - request.num_output_tokens() - 1;
  const int32_t room_context = max_context_len - request.num_tokens() - 1;
  return std::max(0, std::min(room_new, room_context));
}

int32_t count_verified_tokens(const TokenId* row, int32_t num_slots, size_t index) {
  int32_t count = 0;
  while (count < num_slots && row[count] >= 0) ++count;
  if (count == 0) {
    throw std::invalid_argument("sampled_token_ids: the first verified token of a sequence must be a token id, got " +
                                std::to_string(row[0]) + " at index " + std::to_string(index));
  }
  for (int32_t j = count; j < num_slots; ++j) {
    if (row[j] != -1) {
      throw std::invalid_argument("sampled_token_ids: expected -1 after the accepted tokens of a sequence, got " +
                                  std::to_string(row[j]) + " at index " + std::to_string(index + static_cast<size_t>(j)));
    }
  }
  return count;
}

}  // namespace rtpllm

#include "rtpllm/sched/scheduler_options.h"

#include <stdexcept>
#include <string>

namespace rtpllm {
namespace {

void require_positive(int32_t value, const char* field) {
  if (value <= 0) throw std::invalid_argument(std::string(field) + ": must be positive, got " + std::to_string(value));
}

}  // namespace

void SchedulerOptions::validate() const {
  require_positive(max_num_batched_tokens, "max_num_batched_tokens");
  require_positive(max_num_seqs, "max_num_seqs");
  require_positive(max_model_len, "max_model_len");
}

}  // namespace rtpllm

// Continuous-batching limits.
#pragma once

#include <cstdint>

namespace rtpllm {

struct SchedulerOptions {
  int32_t max_num_batched_tokens = 8192;  // token budget of one step (decode + prefill tokens)
  int32_t max_num_seqs = 256;             // sequences running at once
  // On: a prompt longer than the step's remaining budget is computed in chunks over several
  // steps. Off: a prompt waits for a step with room for all of it.
  bool enable_chunked_prefill = true;
  int32_t max_model_len = 4096;  // context limit: prompt + generated tokens

  // Throws std::invalid_argument naming the bad field.
  void validate() const;
};

}  // namespace rtpllm

// A request as the scheduler sees it: plain data, validated on construction.
//
// Token layout: `token_ids` holds the prompt followed by every generated token. The first
// `num_computed_tokens` of them have their KV in the blocks of `block_table`; the rest are
// computed by upcoming steps. The newest sampled token is never computed in the step that
// sampled it: after a prefill of P prompt tokens samples t0, the next step's input is t0 at
// position P and the context (seq_len) becomes P + 1.
//
// Asynchronous steps (Scheduler::commit/resolve): a step whose sampled tokens are still on the
// device appends kPendingToken placeholders; the trailing `num_pending_tokens` entries of
// `token_ids` are such placeholders until the step is resolved. Nothing hashes or reports them.
#pragma once

#include <cstdint>
#include <vector>

#include "rtpllm/core/types.h"

namespace rtpllm {

// What the engine asks for. Validated when a Request is built from it.
struct RequestSpec {
  RequestId request_id = 0;
  std::vector<TokenId> prompt_token_ids;
  int32_t max_new_tokens = 16;
  // Every id here stops the request once min_new_tokens tokens exist. The engine adds the
  // model's EOS ids unless the user set ignore_eos, so the scheduler honours all of them.
  std::vector<TokenId> stop_token_ids;
  bool ignore_eos = false;  // kept for reporting; the stop list already reflects it
  int32_t min_new_tokens = 0;
  int32_t priority = 0;       // lower value = more important (as in vLLM)
  double arrival_time = 0.0;  // seconds, any monotonic clock; later arrivals are preempted first
  uint64_t extra_key = 0;     // mixed into every block hash (LoRA id, multimodal inputs, opt-out)
};

struct Request {
  // Throws std::invalid_argument naming the bad field.
  explicit Request(const RequestSpec& spec);

  RequestId id;
  std::vector<TokenId> token_ids;  // prompt then generated tokens
  int32_t num_prompt_tokens;
  int32_t num_computed_tokens = 0;

  RequestStatus status = RequestStatus::WAITING;
  FinishReason finish_reason = FinishReason::NONE;
  TokenId stop_token_id = -1;  // the stop id that finished it, or -1

  // Limits.
  int32_t max_new_tokens;
  int32_t min_new_tokens;
  std::vector<TokenId> stop_token_ids;  // sorted, unique
  bool ignore_eos;
  int32_t priority;
  double arrival_time;
  uint64_t extra_key;

  // KV cache state, maintained by KVCacheManager.
  std::vector<BlockId> block_table;
  std::vector<BlockHash> block_hashes;  // hashes of the leading full blocks of token_ids, computed lazily
  int32_t num_cached_blocks = 0;        // leading blocks of block_table registered in the prefix cache

  // Scheduler bookkeeping.
  int32_t num_pending_tokens = 0;   // trailing placeholders in token_ids (committed, not resolved)
  bool last_token_pending = false;  // the pending token is its last one (a length limit): not scheduled again
  int32_t num_steps_referencing = 0;  // scheduled or committed steps that name it; it outlives finishing until 0
  uint64_t admission_order = 0;  // tie-break after arrival_time: later added = preempted first
  int64_t scheduled_step = -1;   // the step that last scheduled it (tracks the batch in flight)
  int32_t num_preemptions = 0;
  bool skip_kv_tiers = false;  // a load from the tiers failed: recompute instead of asking again

  // Speculative decoding (sched/speculation.h). Lookahead slots asked for the next step (consumed
  // by schedule()), and the draft slots the scheduled step holds past the known tokens (KV
  // positions computed for unverified tokens: rolled back when the step is applied or dropped).
  int32_t num_lookahead_tokens = 0;
  int32_t num_draft_slots = 0;

  int32_t num_tokens() const { return static_cast<int32_t>(token_ids.size()); }
  int32_t num_known_tokens() const { return num_tokens() - num_pending_tokens; }
  int32_t num_output_tokens() const { return num_tokens() - num_prompt_tokens; }
  bool is_finished() const { return status == RequestStatus::FINISHED; }
  bool is_stop_token(TokenId token) const;
};

}  // namespace rtpllm

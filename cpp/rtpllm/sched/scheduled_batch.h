// One step's work, as the model runner consumes it: flat, contiguous arrays.
//
// Sequences are laid out one after another. Sequence i computes tokens
// input_token_ids[query_start_loc[i] : query_start_loc[i + 1]], which sit at context positions
// num_computed[i] .. seq_lens[i] - 1 and whose KV goes to slot_mapping (block * block_size + offset).
// A sequence is sampled when this step reaches the end of its known tokens: its last token's row
// is logits_indices[k] and sampled_request_ids[k] names it, in sequence order.
//
// Speculative decoding: a sampled sequence may carry draft_counts[k] lookahead slots after its
// last known token (input kDraftToken, to be filled by the runner with proposed tokens; their
// token indices are draft_token_indices). Its verified positions are the last known token and
// every draft: verify_logits_indices[verify_offsets[k] : verify_offsets[k + 1]], k + 1 rows.
// update() then takes one token per verified row (see Scheduler::update).
#pragma once

#include <cstdint>
#include <vector>

#include "rtpllm/core/request.h"

namespace rtpllm {

struct ScheduledBatch {
  int32_t num_seqs = 0;
  int32_t num_tokens = 0;
  int32_t num_sampled = 0;
  int32_t max_query_len = 0;       // the longest run of new tokens of one sequence
  int32_t max_seq_len = 0;         // the longest context after this step
  int32_t max_blocks_per_seq = 0;  // row width of block_tables

  std::vector<int64_t> request_ids;          // [num_seqs]
  std::vector<int32_t> input_token_ids;      // [num_tokens]
  std::vector<int32_t> positions;            // [num_tokens]
  std::vector<int32_t> query_start_loc;      // [num_seqs + 1], cu_seqlens_q
  std::vector<int32_t> seq_lens;             // [num_seqs], context length after this step
  std::vector<int32_t> num_computed;         // [num_seqs], context already cached before this step
  std::vector<int32_t> block_tables;         // [num_seqs, max_blocks_per_seq] row-major, padded with 0
  std::vector<int64_t> slot_mapping;         // [num_tokens]
  std::vector<int32_t> logits_indices;       // [num_sampled]
  std::vector<int64_t> sampled_request_ids;  // [num_sampled]

  int32_t num_draft_tokens = 0;                // lookahead slots in the batch, all sequences
  std::vector<int32_t> draft_counts;           // [num_sampled]
  std::vector<int32_t> verify_offsets;         // [num_sampled + 1], cumulative draft_counts + 1
  std::vector<int32_t> verify_logits_indices;  // [num_sampled + num_draft_tokens]
  std::vector<int32_t> draft_token_indices;    // [num_draft_tokens], indices into input_token_ids

  // Which scheduler and step produced it: update() accepts only the latest batch of its scheduler.
  uint64_t scheduler_id = 0;
  int64_t step_id = -1;

  bool empty() const { return num_seqs == 0; }
};

// One sequence's share of a step, as decided by the scheduler.
struct ScheduledEntry {
  Request* request;  // nullptr: preempted later in the same step (skipped)
  int32_t num_new_tokens;
  bool needs_sampling;
  int32_t num_draft_tokens = 0;  // lookahead slots at the end of num_new_tokens (speculation)
};

// Fills `batch` from the entries (skipping null ones), reusing its buffers' capacity.
void build_scheduled_batch(const std::vector<ScheduledEntry>& entries, int32_t block_size, ScheduledBatch& batch);

}  // namespace rtpllm

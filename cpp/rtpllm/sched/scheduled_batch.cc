#include "rtpllm/sched/scheduled_batch.h"

#include <algorithm>

namespace rtpllm {

void build_scheduled_batch(const std::vector<ScheduledEntry>& entries, int32_t block_size, ScheduledBatch& batch) {
  int32_t num_seqs = 0, num_tokens = 0, num_sampled = 0, max_query = 0, max_seq = 0, max_blocks = 0, num_drafts = 0;
  for (const ScheduledEntry& e : entries) {
    if (e.request == nullptr) continue;
    ++num_seqs;
    num_drafts += e.num_draft_tokens;
    num_tokens += e.num_new_tokens;
    num_sampled += e.needs_sampling ? 1 : 0;
    max_query = std::max(max_query, e.num_new_tokens);
    max_seq = std::max(max_seq, e.request->num_computed_tokens + e.num_new_tokens);
    max_blocks = std::max(max_blocks, static_cast<int32_t>(e.request->block_table.size()));
  }
  batch.num_seqs = num_seqs;
  batch.num_tokens = num_tokens;
  batch.num_sampled = num_sampled;
  batch.max_query_len = max_query;
  batch.max_seq_len = max_seq;
  batch.max_blocks_per_seq = max_blocks;

  // resize() keeps capacity, so a reused batch allocates nothing in steady state.
  batch.request_ids.resize(num_seqs);
  batch.input_token_ids.resize(num_tokens);
  batch.positions.resize(num_tokens);
  batch.query_start_loc.resize(static_cast<size_t>(num_seqs) + 1);
  batch.seq_lens.resize(num_seqs);
  batch.num_computed.resize(num_seqs);
  batch.block_tables.resize(static_cast<size_t>(num_seqs) * max_blocks);
  batch.slot_mapping.resize(num_tokens);
  batch.logits_indices.resize(num_sampled);
  batch.sampled_request_ids.resize(num_sampled);
  batch.num_draft_tokens = num_drafts;
  batch.draft_counts.resize(num_sampled);
  batch.verify_offsets.resize(static_cast<size_t>(num_sampled) + 1);
  batch.verify_logits_indices.resize(static_cast<size_t>(num_sampled) + num_drafts);
  batch.draft_token_indices.resize(num_drafts);

  batch.query_start_loc[0] = 0;
  batch.verify_offsets[0] = 0;
  int32_t seq = 0, token = 0, sampled = 0, verified = 0, draft = 0;
  for (const ScheduledEntry& e : entries) {
    const Request* r = e.request;
    if (r == nullptr) continue;
    const int32_t start = r->num_computed_tokens;
    const int32_t end = start + e.num_new_tokens;
    batch.request_ids[seq] = r->id;
    batch.num_computed[seq] = start;
    batch.seq_lens[seq] = end;
    // One pass per row: the table, then zero padding (a reused buffer holds stale ids).
    const auto row = batch.block_tables.begin() + static_cast<size_t>(seq) * max_blocks;
    std::fill(std::copy(r->block_table.begin(), r->block_table.end(), row), row + max_blocks, 0);
    // Lookahead slots follow the known tokens; the runner fills them with proposals.
    const int32_t known_end = end - e.num_draft_tokens;
    std::copy(r->token_ids.begin() + start, r->token_ids.begin() + known_end, batch.input_token_ids.begin() + token);
    std::fill_n(batch.input_token_ids.begin() + token + (known_end - start), e.num_draft_tokens, kDraftToken);
    for (int32_t pos = start; pos < end; ++pos, ++token) {
      batch.positions[token] = pos;
      batch.slot_mapping[token] = static_cast<int64_t>(r->block_table[pos / block_size]) * block_size + pos % block_size;
    }
    batch.query_start_loc[seq + 1] = token;
    if (e.needs_sampling) {
      const int32_t last_known = token - 1 - e.num_draft_tokens;
      batch.logits_indices[sampled] = last_known;
      batch.sampled_request_ids[sampled] = r->id;
      batch.draft_counts[sampled] = e.num_draft_tokens;
      for (int32_t j = 0; j <= e.num_draft_tokens; ++j) batch.verify_logits_indices[verified++] = last_known + j;
      for (int32_t j = 1; j <= e.num_draft_tokens; ++j) batch.draft_token_indices[draft++] = last_known + j;
      ++sampled;
      batch.verify_offsets[sampled] = verified;
    }
    ++seq;
  }
}

}  // namespace rtpllm

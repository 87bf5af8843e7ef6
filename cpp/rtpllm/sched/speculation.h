// Speculative decoding in the scheduler: lookahead slots and verified tokens.
//
// A decoding request may be given k lookahead slots for its next step (Scheduler::set_lookahead):
// the step then computes k + 1 positions, its last known token followed by k proposed (draft)
// tokens that the runner writes into the kDraftToken inputs. The target model's outputs at those
// k + 1 positions verify the drafts: the runner reports, per sequence, the accepted drafts followed
// by one more token (the correction at the first rejection, or the bonus token when all k were
// accepted), and -1 for the remaining rows. update() appends those tokens in one go, counts the
// accepted drafts' KV as computed (a draft equal to the accepted token computed the same KV) and
// frees the blocks that only rejected positions used. Unverified tokens never enter token_ids, so
// no block hash, prefix-cache entry or preempted recompute ever sees them.
//
// Speculative steps are synchronous: commit() refuses a batch with lookahead slots, because the
// next step's inputs depend on how many drafts were accepted. A step with no lookahead slots
// (speculation off, or adapted down to zero) commits asynchronously as before.
#pragma once

#include <cstddef>
#include <cstdint>

#include "rtpllm/core/request.h"

namespace rtpllm {

// The most lookahead slots `request` can use: accepting them all plus the bonus token must stay
// within max_new_tokens and the context limit.
int32_t max_lookahead(const Request& request, int32_t max_context_len);

// Checks one sequence's verified row (num_slots = drafts + 1 tokens): a non-negative token
// first, then accepted ones, then only -1. Returns the count of tokens to append. Throws
// std::invalid_argument naming `index` (the row's offset in the step's tokens) otherwise.
int32_t count_verified_tokens(const TokenId* row, int32_t num_slots, size_t index);

}  // namespace rtpllm

// Vocabulary types shared by the runtime: ids, request status and finish reasons.
#pragma once

#include <cstdint>

namespace rtpllm {

using TokenId = int32_t;    // vocabulary index
inline constexpr TokenId kPendingToken = -1;  // a sampled token not yet known to the host
inline constexpr TokenId kDraftToken = -2;    // a lookahead slot: the runner puts a proposed token there
using RequestId = int64_t;  // owned by the engine; unique among unfinished requests
using BlockId = int32_t;    // index of a KV block in the pool, [0, num_blocks)
using BlockHash = uint64_t; // prefix-cache key of a full block (see cache/block_hash.h)

enum class RequestStatus : uint8_t {
  WAITING,    // queued, never scheduled
  RUNNING,    // holds KV blocks; scheduled every step its token budget allows
  PREEMPTED,  // evicted by recompute: back in the waiting queue, no blocks, outputs kept
  FINISHED,
  // Admitted with blocks allocated; a tier below the GPU (KVConnector) is loading part of its
  // prefix into them. Neither running nor in the waiting queue until the load ends.
  WAITING_FOR_KV,
};

enum class FinishReason : uint8_t {
  NONE,    // not finished
  STOP,    // sampled a stop token (EOS or a user stop id)
  LENGTH,  // reached max_new_tokens or the context limit
  ABORT,   // cancelled by the engine
  ERROR,   // failed (set by the engine through abort())
};

const char* to_string(RequestStatus status);
const char* to_string(FinishReason reason);

}  // namespace rtpllm

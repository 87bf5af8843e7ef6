// The prefix-cache key of a full KV block.
//
// A block's KV depends on every token before it, so its key chains the parent block's key:
//   hash(block i) = hash_block_tokens(hash(block i-1), tokens of block i, extra_key)
// with the cache identity (CacheOptions::root_hash, kRootBlockHash unless set) as the parent of
// block 0. The function is part of the public interface:
// the tiered KV store (host memory, disk, remote) and KV transfer key their copies on it, so it
// is stable across processes, builds and machines (no std::hash, no per-process seed).
// 64 bits: a collision between two distinct live prefixes has probability ~n^2 / 2^65.
#pragma once

#include <cstddef>
#include <cstdint>

#include "rtpllm/core/types.h"

namespace rtpllm {

constexpr BlockHash kRootBlockHash = 0;

BlockHash hash_block_tokens(BlockHash parent_hash, const TokenId* token_ids, size_t num_tokens, uint64_t extra_key);

}  // namespace rtpllm

// Per-request view of the KV pool: prefix matching, slot allocation, freeing, counters.
//
// Owns the BlockPool. Maintains the cache fields of a Request (block_table, block_hashes,
// num_cached_blocks); the scheduler owns everything else, including num_computed_tokens
// (except on admission, where a prefix hit sets it to the cached length).
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "rtpllm/cache/block_pool.h"
#include "rtpllm/cache/cache_options.h"
#include "rtpllm/core/request.h"

namespace rtpllm {

// Leading full blocks of a request whose KV is already in the pool.
struct PrefixHit {
  std::vector<BlockId> blocks;
  int32_t num_tokens = 0;  // blocks.size() * block_size
};

class KVCacheManager {
 public:
  explicit KVCacheManager(const CacheOptions& options);  // validates options

  const CacheOptions& options() const { return options_; }
  int32_t block_size() const { return options_.block_size; }
  int32_t num_blocks() const { return pool_.num_blocks(); }
  int32_t num_free_blocks() const { return pool_.num_free_blocks(); }
  double usage() const { return static_cast<double>(pool_.num_used_blocks()) / pool_.num_blocks(); }
  uint64_t num_prefix_query_tokens() const { return prefix_query_tokens_; }
  uint64_t num_prefix_hit_tokens() const { return prefix_hit_tokens_; }

  // Longest run of leading full blocks of `request` found in the prefix cache. Never covers the
  // last token: a step must compute at least one token to have logits to sample. Empty when
  // prefix caching is off. Fills request.block_hashes as far as it looks.
  PrefixHit find_cached_prefix(Request& request);

  // Blocks needed to hold tokens [0, num_computed_tokens + num_new_tokens) of `request`.
  int32_t blocks_needed(const Request& request, int32_t num_new_tokens) const;

  // Grows the block table to hold num_computed_tokens + num_new_tokens tokens. On admission pass
  // the prefix hit: its blocks head the block table and num_computed_tokens becomes the hit
  // length (counted in the prefix hit rate). Returns false, changing nothing, when the pool is
  // short of free blocks (cached free blocks count as free; they are evicted on demand).
  bool allocate_slots(Request& request, int32_t num_new_tokens, const PrefixHit* admission_hit = nullptr);

  // Hashes of the request's first num_full_blocks full blocks (computed now where missing).
  const std::vector<BlockHash>& hash_full_blocks(Request& request, int32_t num_full_blocks) const;

  // Registers the full blocks covered by num_computed_tokens in the prefix cache. With recording
  // on (set_record_cached_blocks) and `record` true, every newly registered block is also noted
  // for take_newly_cached(): the scheduler saves those to the tiers below the GPU.
  void cache_computed_blocks(Request& request, bool record = true);
  void set_record_cached_blocks(bool on) { record_cached_ = on; }
  // The (hash, block) pairs registered since the last call, oldest first.
  void take_newly_cached(std::vector<std::pair<BlockHash, BlockId>>& out);
  bool has_newly_cached() const { return !newly_cached_.empty(); }
  size_t num_newly_cached() const { return newly_cached_.size(); }

  // Extra references on blocks (a transfer that reads or writes them): they stay out of the free
  // list, so they are neither reused nor evicted, until released.
  void hold(const std::vector<BlockId>& blocks);
  void release(const std::vector<BlockId>& blocks) { pool_.release(blocks); }

  // Releases the tail of the block table beyond the blocks that num_tokens tokens need (the
  // rejected lookahead slots of a speculative step). Never touches a cached block: those hold
  // computed tokens only, which stay below num_tokens.
  void truncate(Request& request, int32_t num_tokens);

  // Releases the request's blocks; its cached full blocks stay findable until evicted.
  void free(Request& request);

  void set_eviction_listener(BlockEvictionListener* listener) { pool_.set_eviction_listener(listener); }
  void set_event_log(KVEventLog* log) { pool_.set_event_log(log); }
  const BlockPool& pool() const { return pool_; }

 private:
  void hash_blocks_up_to(Request& request, int32_t num_full_blocks) const;

  CacheOptions options_;
  BlockPool pool_;
  bool record_cached_ = false;
  std::vector<std::pair<BlockHash, BlockId>> newly_cached_;
  uint64_t prefix_query_tokens_ = 0;
  uint64_t prefix_hit_tokens_ = 0;
};

}  // namespace rtpllm

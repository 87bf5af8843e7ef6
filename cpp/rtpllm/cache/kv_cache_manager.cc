#include "rtpllm/cache/kv_cache_manager.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "rtpllm/cache/block_hash.h"

namespace rtpllm {
namespace {

const CacheOptions& validated(const CacheOptions& options) {
  options.validate();
  return options;
}

}  // namespace

KVCacheManager::KVCacheManager(const CacheOptions& options)
    : options_(validated(options)), pool_(options.num_blocks) {}

void KVCacheManager::hash_blocks_up_to(Request& request, int32_t num_full_blocks) const {
  const int32_t bs = options_.block_size;
  auto& hashes = request.block_hashes;
  for (auto i = static_cast<int32_t>(hashes.size()); i < num_full_blocks; ++i) {
    const BlockHash parent = i == 0 ? options_.root_hash : hashes[i - 1];
    hashes.push_back(hash_block_tokens(parent, request.token_ids.data() + static_cast<size_t>(i) * bs,
                                       static_cast<size_t>(bs), request.extra_key));
  }
}

PrefixHit KVCacheManager::find_cached_prefix(Request& request) {
  PrefixHit hit;
  if (!options_.enable_prefix_caching) return hit;
  const int32_t max_blocks = (request.num_tokens() - 1) / options_.block_size;
  for (int32_t i = 0; i < max_blocks; ++i) {
    // Hash lazily: a miss on block i makes the hashes of later blocks useless for now.
    hash_blocks_up_to(request, i + 1);
    const auto block = pool_.lookup(request.block_hashes[i]);
    if (!block) break;
    hit.blocks.push_back(*block);
  }
  hit.num_tokens = static_cast<int32_t>(hit.blocks.size()) * options_.block_size;
  return hit;
}

int32_t KVCacheManager::blocks_needed(const Request& request, int32_t num_new_tokens) const {
  const int64_t tokens = static_cast<int64_t>(request.num_computed_tokens) + num_new_tokens;
  return static_cast<int32_t>((tokens + options_.block_size - 1) / options_.block_size);
}

bool KVCacheManager::allocate_slots(Request& request, int32_t num_new_tokens, const PrefixHit* admission_hit) {
  if (admission_hit != nullptr) {
    if (!request.block_table.empty() || request.num_computed_tokens != 0) {
      throw std::logic_error("allocate_slots: admission of request " + std::to_string(request.id) + " that holds blocks");
    }
    const int32_t total = (admission_hit->num_tokens + num_new_tokens + options_.block_size - 1) / options_.block_size;
    const int32_t fresh = total - static_cast<int32_t>(admission_hit->blocks.size());
    // Hit blocks nobody holds sit in the free list: taking them costs free blocks too.
    int32_t revived = 0;
    for (BlockId b : admission_hit->blocks) revived += pool_.ref_count(b) == 0 ? 1 : 0;
    if (fresh + revived > pool_.num_free_blocks()) return false;
    // Touch before allocating so that the allocation cannot evict a hit block.
    for (BlockId b : admission_hit->blocks) pool_.touch(b);
    request.block_table = admission_hit->blocks;
    pool_.allocate(fresh, request.block_table);
    request.num_computed_tokens = admission_hit->num_tokens;
    request.num_cached_blocks = static_cast<int32_t>(admission_hit->blocks.size());
    prefix_query_tokens_ += static_cast<uint64_t>(request.num_tokens());
    prefix_hit_tokens_ += static_cast<uint64_t>(admission_hit->num_tokens);
    return true;
  }
  const int32_t missing = blocks_needed(request, num_new_tokens) - static_cast<int32_t>(request.block_table.size());
  if (missing <= 0) return true;
  if (missing > pool_.num_free_blocks()) return false;
  pool_.allocate(missing, request.block_table);
  return true;
}

const std::vector<BlockHash>& KVCacheManager::hash_full_blocks(Request& request, int32_t num_full_blocks) const {
  hash_blocks_up_to(request, std::min(num_full_blocks, request.num_known_tokens() / options_.block_size));
  return request.block_hashes;
}

void KVCacheManager::cache_computed_blocks(Request& request, bool record) {
  if (!options_.enable_prefix_caching) return;
  // Blocks holding a pending (not yet known) token cannot be hashed yet.
  const int32_t num_full = std::min(request.num_computed_tokens, request.num_known_tokens()) / options_.block_size;
  if (num_full <= request.num_cached_blocks) return;
  hash_blocks_up_to(request, num_full);
  for (int32_t i = request.num_cached_blocks; i < num_full; ++i) {
    // A block not registered (another block holds the prefix) is not recorded: that one is.
    if (pool_.cache(request.block_table[i], request.block_hashes[i]) && record && record_cached_) {
      newly_cached_.emplace_back(request.block_hashes[i], request.block_table[i]);
    }
  }
  request.num_cached_blocks = num_full;
}

void KVCacheManager::truncate(Request& request, int32_t num_tokens) {
  const auto keep = static_cast<size_t>((num_tokens + options_.block_size - 1) / options_.block_size);
  if (request.block_table.size() <= keep) return;
  if (static_cast<size_t>(request.num_cached_blocks) > keep) {
    throw std::logic_error("truncate: request " + std::to_string(request.id) + " would lose a cached block");
  }
  const std::vector<BlockId> tail(request.block_table.begin() + static_cast<std::ptrdiff_t>(keep), request.block_table.end());
  pool_.release(tail);
  request.block_table.resize(keep);
}

void KVCacheManager::take_newly_cached(std::vector<std::pair<BlockHash, BlockId>>& out) {
  out.insert(out.end(), newly_cached_.begin(), newly_cached_.end());
  newly_cached_.clear();
}

void KVCacheManager::hold(const std::vector<BlockId>& blocks) {
  for (BlockId b : blocks) pool_.touch(b);
}

void KVCacheManager::free(Request& request) {
  pool_.release(request.block_table);
  request.block_table.clear();
  request.num_cached_blocks = 0;
}

}  // namespace rtpllm

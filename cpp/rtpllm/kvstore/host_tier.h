// The host-memory tier: a fixed pool of host block buffers (pinned on CUDA builds), indexed by
// block hash, evicted least recently used first.
//
// save() and load() are copies through the copy engine and complete in poll(). Every block whose
// save completed is also offered to the next tier (the disk), write-through: the disk tier copies
// it out of its host buffer on its own threads, so neither the scheduler nor host eviction ever
// waits on disk, and a restarted server finds on disk every block the host tier held (spilling
// only on eviction would need a copy on the eviction path and lose the host contents at exit).
// A block offered to the next tier stays pinned (not evictable) until that tier has read it.
//
// Thread-safety: calls come from the scheduler thread; the next tier's threads only unpin.
#pragma once

#include <chrono>
#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "rtpllm/kvstore/copy_engine.h"
#include "rtpllm/kvstore/kv_store_tier.h"

namespace rtpllm {

class HostTier final : public KVStoreTier {
 public:
  // capacity_bytes / engine->layout().bytes_per_block() buffers (at least one: throws
  // std::invalid_argument otherwise), allocated up front from the engine's host allocator.
  // next_tier: nullptr, or the tier that receives a copy of every saved block.
  HostTier(std::shared_ptr<KVCopyEngine> engine, int64_t capacity_bytes, std::shared_ptr<KVBlockSink> next_tier = nullptr);
  ~HostTier() override;  // waits for this tier's copies in flight

  std::string name() const override { return "host"; }
  int32_t match(const std::vector<BlockHash>& hashes) override;
  TransferHandle load(const std::vector<BlockHash>& hashes, const std::vector<BlockId>& gpu_blocks) override;
  TransferHandle save(const std::vector<BlockHash>& hashes, const std::vector<BlockId>& gpu_blocks) override;
  TransferState poll(TransferHandle handle) override;
  std::vector<KVTierStats> stats() override;
  bool contains(BlockHash hash) override;
  void cancel(TransferHandle) override {}
  // Stored: a block whose save completed; removed: a block evicted for room.
  void set_event_log(KVEventLog* log) override;
  void held_blocks(std::vector<KVEvent>& out) override;  // host copies are short: a pending load just finishes

  int32_t capacity_blocks() const;
  // Slots, index and LRU list agree; throws std::logic_error otherwise. For tests.
  void check_invariants();

 private:
  struct State;  // shared with the next tier's release callbacks, which may outlive this object

  struct Transfer {
    bool is_load = false;
    CopyTicket ticket = 0;  // 0: finished at submission (final_state)
    TransferState final_state = TransferState::PENDING;
    std::vector<int32_t> slots;
    std::chrono::steady_clock::time_point start;
  };

  void check_request(const std::vector<BlockHash>& hashes, const std::vector<BlockId>& gpu_blocks) const;
  void finish_save(Transfer& transfer, bool ok);
  void finish_load(Transfer& transfer, bool ok);
  void offer_to_next_tier(const std::vector<int32_t>& slots);

  const std::shared_ptr<KVCopyEngine> engine_;
  const std::shared_ptr<KVBlockSink> next_tier_;
  const int64_t bytes_per_block_;
  std::shared_ptr<State> state_;
  std::unordered_map<TransferHandle, Transfer> transfers_;  // scheduler thread only
  TransferHandle next_handle_ = 1;
};

}  // namespace rtpllm

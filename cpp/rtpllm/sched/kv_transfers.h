// The scheduler's side of the tiers below the GPU pool (a KVConnector: host memory, disk, ...):
// which transfers are under way, which blocks they hold, which requests wait for them.
//
// NOTE: every transfer holds one extra reference on each GPU block it names, from submission
// until poll() reports its end, whatever happens to its request meanwhile (abort, timeout,
// preemption): the connector may still be writing (load) or reading (save) those blocks, so they
// must be neither reused nor evicted before. A save therefore never races a GPU eviction, and an
// eviction never needs a copy.
//
// A load has a waiting request (status WAITING_FOR_KV) until the load ends or times out, or the
// request is aborted; the transfer then runs on, detached, until the connector reports its end.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "rtpllm/cache/kv_cache_manager.h"
#include "rtpllm/core/request.h"
#include "rtpllm/kvstore/kv_connector.h"

namespace rtpllm {

class KVTransfers {
 public:
  enum class LoadEnd : uint8_t { DONE, FAILED, TIMED_OUT };
  struct EndedLoad {
    Request* request;
    int32_t num_blocks;  // the blocks the load named: block_table[num_computed / block_size, + num_blocks)
    LoadEnd end;
  };

  // `kv` must outlive this object. A load pending longer than load_timeout_s seconds is given up
  // (its request recomputes).
  KVTransfers(std::shared_ptr<KVConnector> connector, KVCacheManager& kv, double load_timeout_s);
  // Unsets the connector's event log: the connector may outlive this object, the log may not.
  ~KVTransfers();
  KVTransfers(const KVTransfers&) = delete;
  KVTransfers& operator=(const KVTransfers&) = delete;

  KVConnector& connector() { return *connector_; }
  // The tiers record the blocks they store and evict into `log` (KVConnector::set_event_log),
  // after a kStored event for each block they hold already.
  void set_event_log(KVEventLog* log);

  // Leading hashes of `hashes` (a chain) the tiers hold.
  int32_t match(const std::vector<BlockHash>& hashes);

  // Starts loading request.block_table[first_block, first_block + count) from the tiers, keyed
  // by request.block_hashes at the same indexes. Returns false, holding nothing, when the
  // connector refuses (the request then computes those tokens).
  bool start_load(Request& request, int32_t first_block, int32_t count);

  // The request no longer waits for its load (aborted); the load itself runs on until it ends.
  void detach(const Request& request);

  // Submits one save of the blocks the KV cache manager registered since the last save (those
  // still cached under the same hash: none was evicted in between, but check rather than trust).
  // Decode fills a few blocks a step: they are gathered over up to kMaxSaveWaitPolls calls into
  // one save of at least kSaveBatchBlocks, so that a busy engine pays one copy submission every
  // few steps, not every step. Only while the pool evicts nothing: under pressure a block waiting
  // for its save could be evicted first, and its copy lost. `now` saves whatever there is (no step
  // will follow soon).
  void save_newly_cached(bool now = false);
  static constexpr size_t kSaveBatchBlocks = 32;
  static constexpr int32_t kMaxSaveWaitPolls = 8;

  // Called once per scheduled step with its token count. The time from a step with many tokens to
  // the next call measures what computing a token costs; the connector is told what recomputing a
  // block costs, so that it can leave out of match() tiers slower than that (a busy disk).
  void observe_step(int32_t num_tokens);

  // Polls every transfer once. Appends each load that ended or timed out while a request waited
  // for it; releases the blocks of every transfer that ended.
  void poll(std::vector<EndedLoad>& ended);

  int32_t num_waiting_requests() const { return num_waiting_; }
  bool has_pending() const { return !loads_.empty() || !saves_.empty(); }
  template <typename Fn>
  void for_each_waiting(Fn&& fn) const {
    for (const Load& l : loads_) {
      if (l.request != nullptr) fn(*l.request, static_cast<int32_t>(l.blocks.size()));
    }
  }
  // Adds one to holders[b] per reference a transfer holds on block b.
  void count_held_blocks(std::vector<int32_t>& holders) const;
  int32_t num_held_blocks() const;

  // Cumulative counters.
  uint64_t num_loaded_blocks() const { return loaded_blocks_; }
  uint64_t num_failed_loads() const { return failed_loads_; }  // refused, or ended FAILED while awaited
  uint64_t num_timed_out_loads() const { return timed_out_loads_; }
  uint64_t num_saved_blocks() const { return saved_blocks_; }  // submitted for saving
  uint64_t num_failed_saves() const { return failed_saves_; }

 private:
  using Clock = std::chrono::steady_clock;
  struct Load {
    TransferHandle handle;
    Request* request;  // nullptr once detached
    std::vector<BlockId> blocks;
    Clock::time_point started;
  };
  struct Save {
    TransferHandle handle;
    std::vector<BlockId> blocks;
  };

  // The state of a handle; a connector that throws on poll() has lost the transfer: FAILED.
  TransferState poll_handle(TransferHandle handle);

  std::shared_ptr<KVConnector> connector_;
  KVCacheManager& kv_;
  Clock::duration load_timeout_;
  std::vector<Load> loads_;
  std::vector<Save> saves_;
  int32_t num_waiting_ = 0;
  std::vector<std::pair<BlockHash, BlockId>> to_save_;  // scratch
  int32_t save_wait_polls_ = 0;  // calls since blocks started waiting to be saved
  uint64_t evictions_seen_ = 0;  // the pool's eviction count at the last call
  Clock::time_point last_step_at_{};
  int32_t last_step_tokens_ = 0;
  double seconds_per_token_ = 0;  // moving average over prefill-heavy steps; 0 until measured

  uint64_t loaded_blocks_ = 0;
  uint64_t failed_loads_ = 0;
  uint64_t timed_out_loads_ = 0;
  uint64_t saved_blocks_ = 0;
  uint64_t failed_saves_ = 0;
};

}  // namespace rtpllm

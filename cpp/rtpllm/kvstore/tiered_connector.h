// The connector the scheduler talks to: chains the tiers below the GPU (host memory, then disk,
// later the remote store) behind one KVConnector.
//
//   match()  the longest leading run of hashes each of which some tier holds;
//   load()   splits the blocks by the first tier (in chain order) that holds each one, one
//            sub-load per tier, and ends DONE when all of them did;
//   save()   goes to the first tier, which hands blocks down the chain itself (write-through);
//            saving blocks that were loaded from a lower tier puts them back in the first tier
//            (tiers skip hashes they hold), so a caller that saves every block it caches, loaded
//            or computed, gets promotion for free;
//   poll()   combines the sub-transfers; a load still pending at its deadline is cancelled in its
//            tiers and ends FAILED as soon as no tier copies into its GPU blocks any more;
//   stats()  one entry per tier (its query counters are kept here: the tiers are asked through
//            contains(), which they do not count).
// Calls come from the scheduler thread only.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "rtpllm/kvstore/kv_store_tier.h"

namespace rtpllm {

class TieredKVConnector final : public KVConnector {
 public:
  // tiers: at least one, fastest first. load_timeout_s > 0: how long a load may take.
  TieredKVConnector(std::vector<std::shared_ptr<KVStoreTier>> tiers, double load_timeout_s);

  std::string name() const override { return "tiered"; }
  int32_t match(const std::vector<BlockHash>& hashes) override;
  TransferHandle load(const std::vector<BlockHash>& hashes, const std::vector<BlockId>& gpu_blocks) override;
  TransferHandle save(const std::vector<BlockHash>& hashes, const std::vector<BlockId>& gpu_blocks) override;
  TransferState poll(TransferHandle handle) override;
  std::vector<KVTierStats> stats() override;
  void set_event_log(KVEventLog* log) override;
  void held_blocks(std::vector<KVEvent>& out) override;

  size_t num_pending() const { return transfers_.size(); }

 private:
  struct Part {
    size_t tier = 0;
    TransferHandle handle = 0;
    TransferState state = TransferState::PENDING;
  };
  struct Transfer {
    bool is_load = false;
    std::vector<Part> parts;
    std::chrono::steady_clock::time_point deadline;
    bool timed_out = false;
  };
  struct QueryCounters {
    uint64_t queries = 0;
    uint64_t query_blocks = 0;
    uint64_t hit_blocks = 0;
    uint64_t failed_loads = 0;  // loads that failed before reaching the tier (block gone since match)
    uint64_t timed_out_loads = 0;
  };

  // The first tier that holds `hash`, or tiers_.size().
  size_t find_tier(BlockHash hash);

  const std::vector<std::shared_ptr<KVStoreTier>> tiers_;
  const std::chrono::steady_clock::duration load_timeout_;
  std::vector<QueryCounters> counters_;  // per tier
  std::unordered_map<TransferHandle, Transfer> transfers_;
  TransferHandle next_handle_ = 1;
};

}  // namespace rtpllm

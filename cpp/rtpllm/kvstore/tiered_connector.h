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
//            a tier that saves_from_pool() (the remote store) gets every save too;
//   poll()   combines the sub-transfers; a load still pending at its deadline is cancelled in its
//            tiers and ends FAILED as soon as no tier copies into its GPU blocks any more;
//   stats()  one entry per tier (its query counters are kept here: the tiers are asked through
//            contains(), which they do not count).
// Slow tiers: once the caller has said what recomputing a block costs
// (set_recompute_seconds_per_block), match() stops at the first block of a tier whose
// expected_load_seconds() for its share of the run is above recomputing that share: a disk with a
// long queue or a slow read rate then costs a recompute, never more (counted as skipped_blocks).
// The same estimate shortens a load's deadline: a load may take kLoadBudgetFactor times what
// recomputing its blocks would take, plus kMinLoadBudgetSeconds, and never more than
// load_timeout_s: a disk that stalls mid-load costs a bounded wait, then the recompute.
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
  void set_recompute_seconds_per_block(double seconds) override { recompute_seconds_per_block_ = seconds > 0 ? seconds : 0; }
  void set_event_log(KVEventLog* log) override;
  void held_blocks(std::vector<KVEvent>& out) override;

  size_t num_pending() const { return transfers_.size(); }

  static constexpr double kLoadBudgetFactor = 4.0;
  static constexpr double kMinLoadBudgetSeconds = 0.5;

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
    uint64_t skipped_blocks = 0;
  };

  // The first tier that holds `hash`, or tiers_.size().
  size_t find_tier(BlockHash hash);

  const std::vector<std::shared_ptr<KVStoreTier>> tiers_;
  const std::chrono::steady_clock::duration load_timeout_;
  std::vector<QueryCounters> counters_;  // per tier
  std::unordered_map<TransferHandle, Transfer> transfers_;
  TransferHandle next_handle_ = 1;
  double recompute_seconds_per_block_ = 0;  // 0: unknown, no tier is skipped
  std::vector<size_t> match_tiers_;          // scratch: the tier of each matched block
};

}  // namespace rtpllm

// The KV tiers of a tensor-parallel engine: each rank keeps its own KV heads in its own pool, so
// each rank has its own tiers (host memory, disk) holding its heads of every block. Rank 0's
// scheduler talks to this connector, which
//   match()  asks rank 0's tiers alone: every rank's tiers see the same loads and saves in the
//            same order with the same capacity, so they hold the same blocks (where they do not,
//            after a rank's disk failed, say, that rank's load ends FAILED and the tokens are
//            recomputed: a mismatch costs time, never wrong tokens);
//   load(), save()  start the transfer in rank 0's tiers and record it as an operation for the
//            other ranks ("mirrors"), which the executor takes (take_operations) and ships to
//            them ahead of the next step, so each rank copies its own heads on its own device;
//   poll()   ends a transfer once rank 0's part and every mirror's part (report()) have ended:
//            DONE when all of them were DONE, else FAILED. Until then the caller keeps the
//            blocks reserved on every rank, which is what makes a reused block safe on all.
// A mirror that dies is the executor's failure to report (the engine stops); a mirror that is
// slow only delays the end of the transfer (its own tiers cut a load at their deadline).
// Calls come from the scheduler's thread; take_operations() and report() from the same thread
// between the scheduler's calls.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "rtpllm/kvstore/kv_connector.h"

namespace rtpllm {

// One load or save for the mirrors to repeat on their own tiers.
struct MirroredOperation {
  TransferHandle handle = 0;  // this connector's handle, which the mirrors report back
  bool is_load = false;
  std::vector<BlockHash> hashes;
  std::vector<BlockId> gpu_blocks;
};

class MirroredKVConnector final : public KVConnector {
 public:
  // local: rank 0's tiers. num_mirrors >= 1: the other ranks.
  MirroredKVConnector(std::shared_ptr<KVConnector> local, int32_t num_mirrors);

  std::string name() const override { return "mirrored(" + local_->name() + ")"; }
  int32_t match(const std::vector<BlockHash>& hashes) override { return local_->match(hashes); }
  TransferHandle load(const std::vector<BlockHash>& hashes, const std::vector<BlockId>& gpu_blocks) override;
  TransferHandle save(const std::vector<BlockHash>& hashes, const std::vector<BlockId>& gpu_blocks) override;
  TransferState poll(TransferHandle handle) override;
  std::vector<KVTierStats> stats() override { return local_->stats(); }
  void set_recompute_seconds_per_block(double seconds) override { local_->set_recompute_seconds_per_block(seconds); }
  void set_event_log(KVEventLog* log) override { local_->set_event_log(log); }
  void held_blocks(std::vector<KVEvent>& out) override { local_->held_blocks(out); }

  // The operations started since the last call, oldest first, for every mirror.
  std::vector<MirroredOperation> take_operations();
  // Mirror `mirror` (0 .. num_mirrors - 1) finished its part of `handle`. Throws
  // std::invalid_argument for an unknown handle or mirror, or a second report of one part.
  void report(int32_t mirror, TransferHandle handle, bool done);

  int32_t num_mirrors() const { return num_mirrors_; }
  size_t num_pending() const { return transfers_.size(); }

 private:
  struct Transfer {
    TransferHandle local = 0;
    TransferState local_state = TransferState::PENDING;
    std::vector<TransferState> mirrors;  // per mirror
  };

  TransferHandle start(bool is_load, TransferHandle local, const std::vector<BlockHash>& hashes,
                       const std::vector<BlockId>& gpu_blocks);

  const std::shared_ptr<KVConnector> local_;
  const int32_t num_mirrors_;
  std::unordered_map<TransferHandle, Transfer> transfers_;
  std::vector<MirroredOperation> unsent_;
  TransferHandle next_handle_ = 1;
};

}  // namespace rtpllm

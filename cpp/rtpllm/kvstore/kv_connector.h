// The seam below the GPU pool: every place KV can live besides the GPU (host memory, local disk,
// the shared remote store, a prefill-decode peer) is a KVConnector.
//
// A tier keys its copies by block hash (cache/block_hash.h), whose chain starts from the cache
// identity (model, dtype, block size, layout), so copies from another model never match. The
// scheduler talks to one connector, a coordinator that chains the tiers (host, then disk, ...):
//   match()  how many leading blocks of a hash chain the tier can supply;
//   load()   asynchronously fill given GPU-pool blocks with those hashes' KV;
//   save()   asynchronously copy given GPU-pool blocks into the tier under their hashes;
//   poll()   completion, polled by the scheduler once per step (never blocks the step loop).
// A load that fails or times out reports FAILED: the scheduler then recomputes those tokens, so a
// tier can cost time but never produce wrong tokens. While a load or save is PENDING the caller
// keeps the named GPU blocks reserved and unmodified.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "rtpllm/cache/kv_event_log.h"
#include "rtpllm/core/types.h"

namespace rtpllm {

using TransferHandle = uint64_t;  // 0 is never a valid handle

enum class TransferState : uint8_t {
  PENDING,
  DONE,
  FAILED,
};

// Counters of one tier (cumulative unless said otherwise), for /metrics.
struct KVTierStats {
  std::string name;
  uint64_t queries = 0;           // match() calls
  uint64_t query_blocks = 0;      // blocks asked about
  uint64_t hit_blocks = 0;        // blocks match() reported present
  uint64_t loaded_blocks = 0;     // blocks copied into the GPU pool
  uint64_t saved_blocks = 0;      // blocks copied into this tier
  uint64_t load_bytes = 0;        // bytes moved tier -> GPU
  uint64_t save_bytes = 0;        // bytes moved GPU (or the tier above) -> tier
  uint64_t failed_loads = 0;      // load() handles that ended FAILED
  uint64_t timed_out_loads = 0;   // of those, cut short by the coordinator's load deadline
  uint64_t skipped_blocks = 0;    // held, but not offered by match(): loading them was expected to
                                  // take longer than recomputing them
  uint64_t evicted_blocks = 0;    // dropped for capacity
  uint64_t capacity_blocks = 0;   // current
  uint64_t used_blocks = 0;       // current
  // false once the tier stopped itself (a full disk, an I/O error): it accepts no more saves, but
  // keeps serving match() and load() for the blocks it holds.
  bool enabled = true;
  std::vector<double> load_latency_s;  // latencies of loads finished since the last stats() call
};

class KVConnector {
 public:
  virtual ~KVConnector() = default;

  virtual std::string name() const = 0;

  // Number of leading hashes of `hashes` (a chain, block 0 first) this tier can load, contiguous
  // from hashes[0]. A later load() may still fail (the copy was evicted or is corrupt).
  virtual int32_t match(const std::vector<BlockHash>& hashes) = 0;

  // Starts filling gpu_blocks[i] with the KV of hashes[i]. Sizes must agree (std::invalid_argument
  // otherwise). Never blocks on I/O.
  virtual TransferHandle load(const std::vector<BlockHash>& hashes, const std::vector<BlockId>& gpu_blocks) = 0;

  // Starts copying gpu_blocks[i] (KV that hashes[i] names, computed by work already submitted to
  // the device) into the tier. Hashes the tier already holds are skipped. Never blocks on I/O.
  virtual TransferHandle save(const std::vector<BlockHash>& hashes, const std::vector<BlockId>& gpu_blocks) = 0;

  // PENDING, or the final state; a finished handle is forgotten after it has been reported once
  // (polling it again throws std::invalid_argument, as does an unknown handle).
  virtual TransferState poll(TransferHandle handle) = 0;

  // Per tier (a coordinator reports one entry per tier it chains).
  virtual std::vector<KVTierStats> stats() = 0;

  // What recomputing one block's KV costs now (seconds; 0: unknown), measured by the caller. A
  // connector may then leave out of match() blocks it expects to load more slowly than that.
  virtual void set_recompute_seconds_per_block(double /*seconds*/) {}

  // From now on, records into `log` (nullptr: stop) the hashes this connector's tiers store and
  // evict, under their tier. The log must outlive the connector or be unset first. Default:
  // records nothing (a connector that keeps no copies).
  virtual void set_event_log(KVEventLog* log) { (void)log; }
  // Appends a kStored event for every block the tiers hold now (what a reader of the event log
  // starts from, or resyncs from after the log overflowed).
  virtual void held_blocks(std::vector<KVEvent>& out) { (void)out; }
};

}  // namespace rtpllm

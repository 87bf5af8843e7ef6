// The block hashes an instance stored and evicted, in order, for whoever mirrors its cache from
// outside (the router's cache-aware policy).
//
// The block pool records a kStored event when a block is registered under its prefix hash and a
// kRemoved event when a cached block is evicted. The engine drains the log every step. The log is
// bounded: when more than `capacity` events pile up between two drains it drops them all and
// reports `overflowed` on the next drain; a reader's mirror is then stale and must be rebuilt from
// a snapshot of the cached hashes (Scheduler::cached_block_hashes()).
//
// Each event names its tier: the host and disk tiers (kvstore/) record the blocks they store and
// evict into the same log (KVConnector::set_event_log). Thread-safe: the disk tier records from
// its writer threads while the step loop records and drains.
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <vector>

#include "rtpllm/core/types.h"

namespace rtpllm {

enum class KVEventKind : uint8_t { kStored = 0, kRemoved = 1 };
enum class KVTier : uint8_t { kDevice = 0, kHost = 1, kDisk = 2, kRemote = 3 };

struct KVEvent {
  BlockHash hash = 0;
  KVEventKind kind = KVEventKind::kStored;
  KVTier tier = KVTier::kDevice;
};

class KVEventLog {
 public:
  // Throws std::invalid_argument for a zero capacity.
  explicit KVEventLog(size_t capacity);

  size_t capacity() const { return capacity_; }
  size_t size() const;
  bool overflowed() const;

  void record(KVEventKind kind, KVTier tier, BlockHash hash);

  // Appends the events recorded since the last drain to `out`, oldest first, and empties the log.
  // Returns true when events were lost to overflow since the last drain: then nothing is appended
  // and the caller must resync from a snapshot taken now.
  bool drain(std::vector<KVEvent>& out);

 private:
  size_t capacity_;
  mutable std::mutex mutex_;  // guards the two below
  std::vector<KVEvent> events_;
  bool overflowed_ = false;
};

}  // namespace rtpllm

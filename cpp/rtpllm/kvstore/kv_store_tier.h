// What a storage tier offers beyond the KVConnector seam, for the coordinator that chains tiers
// (TieredKVConnector) and for a tier that hands blocks down to the next one (KVBlockSink).
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "rtpllm/kvstore/kv_connector.h"

namespace rtpllm {

// Where a tier reports trouble that is not an error of the caller (a corrupt file, a full disk).
// Called from any of the tier's threads; must be thread-safe. Default: one line on stderr.
using KVStoreLogger = std::function<void(const std::string& message)>;
KVStoreLogger default_kvstore_logger();

class KVStoreTier : public KVConnector {
 public:
  // Whether a load() of this one hash can be served now. Unlike match(), not counted in stats.
  virtual bool contains(BlockHash hash) = 0;

  // How long a load() of num_blocks blocks started now is expected to take (behind the tier's own
  // queue), in seconds; 0 when the tier cannot tell or is fast enough not to matter (host memory).
  // The coordinator compares it with the time recomputing those blocks would take.
  virtual double expected_load_seconds(int32_t /*num_blocks*/) { return 0; }

  // Asks a pending load to end early (the coordinator's deadline passed). The handle still ends
  // through poll(): FAILED, or DONE if the data had already arrived. A tier reports FAILED only
  // once nothing is copying into the load's GPU blocks any more, so that the caller may reuse them
  // at once. No-op for an unknown or finished handle.
  virtual void cancel(TransferHandle handle) = 0;

  // True for a tier that copies its saves straight out of the GPU pool rather than being fed by
  // the tier above it (the remote store): the coordinator then hands it every save as well.
  virtual bool saves_from_pool() const { return false; }
};

// A tier below another: receives block copies the upper tier already holds in host memory.
class KVBlockSink {
 public:
  virtual ~KVBlockSink() = default;

  // Offers the bytes_per_block bytes at `data` (the upper tier's buffer) under `hash`. Returns
  // false when the sink does not want it (already held, full, stopped, queue too long): nothing
  // more happens then. On true, the sink calls `release` exactly once, from any thread, as soon as
  // it no longer reads `data`; until then the upper tier keeps the buffer unchanged. Never blocks
  // on I/O.
  virtual bool offer(BlockHash hash, const uint8_t* data, std::function<void()> release) = 0;
};

}  // namespace rtpllm

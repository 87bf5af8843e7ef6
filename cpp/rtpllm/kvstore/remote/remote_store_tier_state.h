// RemoteStoreTier's operation and connection records, shared by remote_store_tier.cc (the scheduler
// thread's side and the handshake) and remote_store_tier_worker.cc (the worker thread's exchanges).
// Private to those two files.
#pragma once

#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "rtpllm/kvstore/remote/remote_store_tier.h"
#include "rtpllm/kvstore/remote/store_protocol.h"
#include "rtpllm/transfer/control_channel.h"

namespace rtpllm {

inline std::chrono::steady_clock::duration remote_seconds(double s) {
  return std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::duration<double>(s));
}

inline std::string remote_hex(uint64_t value) {
  char text[24];
  std::snprintf(text, sizeof(text), "%016" PRIx64, value);
  return text;
}

struct RemoteStoreTier::Op {
  bool is_load = false;
  std::vector<BlockHash> hashes;
  std::vector<BlockId> blocks;
  std::function<void()> fence;  // saves: wait before reading the pool blocks
  std::chrono::steady_clock::time_point start;
  // Guarded by ops_mutex_.
  TransferState state = TransferState::PENDING;
  bool cancelled = false;
  // Worker thread only.
  Phase phase = Phase::QUEUED;
  uint64_t request_id = 0;
  std::chrono::steady_clock::time_point deadline;
  TransferHandle transfer = 0;
  int64_t moved_blocks = 0;
  bool connection_lost = false;  // the store connection dropped while the transfer was in flight
};

struct RemoteStoreTier::Connection {
  ControlConnection control;
  PeerId peer = 0;
  StoreWelcome welcome;
};

}  // namespace rtpllm

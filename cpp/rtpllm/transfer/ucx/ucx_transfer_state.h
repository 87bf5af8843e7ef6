// The state UcxTransfer keeps per peer and per transfer; shared by ucx_transfer.cc (the API, the
// progress loop, transfers) and ucx_transfer_peers.cc (handshakes, liveness, failure). Internal.
#pragma once

#include <chrono>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "rtpllm/transfer/ucx/ucx_transfer.h"

namespace rtpllm {

inline std::chrono::milliseconds ucx_seconds_to_ms(double seconds) {
  return std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000.0));
}

struct UcxTransfer::Peer {
  PeerId id = 0;
  PeerDescriptor remote;
  std::unique_ptr<ControlConnection> connection;
  ucp_ep_h ep = nullptr;
  std::vector<ucp_rkey_h> rkeys;  // parallel to remote.regions
  PeerState state = PeerState::CONNECTED;
  std::string error;
  ucs_status_t endpoint_status = UCS_OK;  // set by UCX's error callback, handled after progress
  SteadyTime last_heard;
  SteadyTime last_sent;
  // Write grants (the peer requires them): queries sent and not answered yet, and the answers
  // received, each used by the puts queued when it came and then dropped (the next put asks anew).
  std::set<uint64_t> grant_queries;
  std::map<uint64_t, GrantMessage> grant_answers;

  // The rkey of the region holding [address, address + bytes), or nullptr.
  ucp_rkey_h rkey_for(uint64_t address, uint64_t bytes) const {
    for (size_t i = 0; i < remote.regions.size(); ++i) {
      const RemoteRegion& r = remote.regions[i];
      if (address >= r.base && address + bytes <= r.base + r.length) return rkeys[i];
    }
    return nullptr;
  }
};

struct UcxTransfer::Transfer {
  enum class Phase { QUEUED, ISSUED, FINAL };
  TransferHandle handle = 0;
  PeerId peer = 0;
  bool is_put = true;
  bool notify = false;
  NoticeMessage notice;
  std::vector<CopyOp> copies;
  uint64_t bytes = 0;
  Phase phase = Phase::QUEUED;
  bool granted = false;     // a put to a peer that requires write grants: its answer allowed it
  int64_t outstanding = 0;  // UCX requests not yet completed
  std::string error;
  SteadyTime deadline;
};
}  // namespace rtpllm

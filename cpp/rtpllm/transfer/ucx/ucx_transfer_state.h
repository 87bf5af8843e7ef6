// The state UcxTransfer keeps per peer and per transfer; shared by ucx_transfer.cc (the API, the
// progress loop, transfers) and ucx_transfer_peers.cc (handshakes, liveness, failure). Internal.
#pragma once

#include <chrono>
#include <cstdint>
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

// DataPath::MESSAGES, receiving side: one put from a peer that has not fully landed yet.
struct IncomingPut {
  uint64_t received = 0;                 // bytes landed so far
  uint64_t expected = UINT64_MAX;        // the put's size, known once its PUT_DONE message came
  bool notify = false;
  NoticeMessage notice;
  bool complete() const { return received == expected; }
};

// DataPath::MESSAGES: a peer's get, answered after the worker's progress call (never inside it).
struct GetReply {
  uint64_t handle = 0;  // the requester's transfer
  uint64_t src = 0;     // in this engine's memory
  uint64_t dst = 0;     // in the requester's memory
  uint64_t bytes = 0;
};

struct UcxTransfer::Peer {
  PeerId id = 0;
  PeerDescriptor remote;
  uint64_t key = 0;  // the connection key (PeerDescriptor::connection_key) that stamps its messages
  DataPath data_path = DataPath::RMA;  // how this engine's puts and gets to the peer travel
  std::unique_ptr<ControlConnection> connection;
  ucp_ep_h ep = nullptr;
  std::vector<ucp_rkey_h> rkeys;  // parallel to remote.regions
  std::vector<uint64_t> mapped;   // DataPath::DIRECT: where each of remote.regions is mapped here
  PeerState state = PeerState::CONNECTED;
  std::string error;
  SteadyTime close_by;  // failed: its endpoint is force-closed by then if requests are still outstanding
  ucs_status_t endpoint_status = UCS_OK;  // set by UCX's error callback, handled after progress
  SteadyTime last_heard;
  SteadyTime last_sent;
  // The peer has its entry for this connection: always for the side that connected (the acceptor
  // added its entry before answering HELLO); for the acceptor, once a frame followed the HELLO (the
  // connector pings at once). Puts and gets by messages wait for it: a message for a key the
  // receiver does not know yet would be dropped.
  bool knows_us = false;
  // Write grants (the peer requires them): queries sent and not answered yet, and the answers
  // received, each used by the puts queued when it came and then dropped (the next put asks anew).
  std::set<uint64_t> grant_queries;
  std::map<uint64_t, GrantMessage> grant_answers;
  // DataPath::MESSAGES, sending: puts are numbered on this connection from 1; the peer acknowledges
  // (PUT_ACK) the highest number up to which every put has landed.
  uint64_t next_put_sequence = 1;
  uint64_t acked_sequence = 0;
  // Receiving (whatever path this engine uses): the peer's puts not complete yet, by number; every
  // put up to completed_sequence has landed and been noticed, ack_sent_sequence was acknowledged.
  std::map<uint64_t, IncomingPut> incoming;
  uint64_t completed_sequence = 0;
  uint64_t ack_sent_sequence = 0;
  std::vector<GetReply> get_replies;
  uint64_t get_requests_out = 0;  // this engine's GET_REQUESTs to the peer not answered yet (kGetWindow)
  std::string protocol_error;  // found inside a message handler; the peer is failed after progress

  // The index in remote.regions of the region holding [address, address + bytes), or -1.
  int region_of(uint64_t address, uint64_t bytes) const {
    for (size_t i = 0; i < remote.regions.size(); ++i) {
      const RemoteRegion& r = remote.regions[i];
      if (address >= r.base && address + bytes <= r.base + r.length) return static_cast<int>(i);
    }
    return -1;
  }

  // DataPath::DIRECT: the address here of the peer's [address, address + bytes), or 0 outside its regions.
  uint64_t mapped_for(uint64_t address, uint64_t bytes) const {
    const int i = mapped.empty() ? -1 : region_of(address, bytes);
    return i < 0 ? 0 : mapped[i] + (address - remote.regions[i].base);
  }

  // The rkey of the region holding [address, address + bytes), or nullptr.
  ucp_rkey_h rkey_for(uint64_t address, uint64_t bytes) const {
    const int i = region_of(address, bytes);
    return i < 0 ? nullptr : rkeys[i];
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
  bool by_messages = false; // issued on DataPath::MESSAGES
  uint64_t direct_ticket = 0; // issued on DataPath::DIRECT: its PeerMemory copy, until it ended
  uint64_t sequence = 0;    // a put by messages: its number on the connection (done once acknowledged)
  uint64_t received = 0;    // a get by messages: bytes of the replies landed (done at `bytes`)
  std::string done_message; // a put by messages: its PUT_DONE payload, alive until the send completes
  std::vector<std::vector<ucp_dt_iov_t>> scatter_iovs;  // a put by messages: its PUT_SCATTER sources, likewise
  size_t next_copy = 0;     // a get by messages: the copy (and offset in it) its next request asks for
  uint64_t next_offset = 0;
  int64_t outstanding = 0;  // UCX requests not yet completed
  std::string error;
  SteadyTime deadline;

  // Counts a request just issued for this transfer (its callback is on_request_done), or records
  // why it could not be; true while the transfer has no error.
  bool track(ucs_status_ptr_t request) {
    if (UCS_PTR_IS_ERR(request)) {
      error = std::string("UCX: ") + ucs_status_string(UCS_PTR_STATUS(request));
    } else if (request != nullptr) {
      ++outstanding;
    }
    return error.empty();
  }
};
}  // namespace rtpllm

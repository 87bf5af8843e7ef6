// UcxTransfer's DataPath::MESSAGES: puts and gets as UCX active messages that the receiving engine
// copies into its own registered memory (see kv_transfer.h DataPath for why this path exists).
//
// A put to a peer is numbered on its connection (1, 2, ...) and sent as PUT_DATA messages of at
// most kMessageBytes, each naming its destination (small copies packed, many to a PUT_SCATTER
// message with a table of destinations), then one PUT_DONE message with the put's size and its
// notice. The receiver counts each put's bytes; once a put and every earlier one are
// complete it delivers their notices in order and acknowledges the highest number on the control
// channel (PUT_ACK); the sender's put is DONE at that acknowledgement. Counting rather than
// relying on message order keeps this correct on transports with several lanes.
//
// A get is GET_REQUEST messages (source, destination, size), at most kGetWindow unanswered per
// connection; the target answers each with a GET_REPLY data message after its progress call, and
// the get is DONE when all its bytes landed.
//
// The rule that makes this path safe where UCX's emulated RMA is not: nothing here sends from
// inside a message handler. Handlers only copy, count and queue; acknowledgements and replies go
// out from the progress loop (answer_peers_locked) through the API's error-returning calls, so a
// peer that died is an error on its connection, never an abort. A message that breaks the rules
// (a destination outside this engine's memory, more bytes than announced) fails its peer.
#include <algorithm>
#include <array>
#include <chrono>
#include <cstring>
#include <functional>
#include <stdexcept>

#include "rtpllm/transfer/ucx/ucx_message_wire.h"
#include "rtpllm/transfer/ucx/ucx_transfer.h"
#include "rtpllm/transfer/ucx/ucx_transfer_state.h"

namespace rtpllm {
namespace {

using Clock = std::chrono::steady_clock;
using namespace ucx_wire;

// Bounds on what one peer can make this engine hold: puts in progress and gets waiting for replies.
constexpr size_t kMaxIncomingPuts = 1 << 14;
constexpr size_t kMaxQueuedReplies = 1 << 16;

template <typename Header>
bool read_header(const void* bytes, size_t length, Header* header) {
  if (length != sizeof(Header)) return false;
  std::memcpy(header, bytes, sizeof(Header));
  return true;
}

// Transports whose puts and gets UCX performs without the target's CPU (RDMA, CUDA IPC, the
// kernel's cross-memory attach, shared-memory mappings). Anything else, TCP above all, goes by
// messages; an unknown name is the safe guess.
bool has_hardware_rma(const char* transport) {
  static constexpr std::array<const char*, 11> kNames = {"rc_verbs", "rc_mlx5", "dc_mlx5", "rc_gga", "gga",
                                                         "srd",      "cuda_ipc", "rocm_ipc", "cma", "knem",
                                                         "xpmem"};
  if (transport == nullptr) return false;
  for (const char* name : kNames) {
    if (std::strcmp(transport, name) == 0) return true;
  }
  return false;
}

}  // namespace

// A message send of `transfer` from memory of `memory` (its data), eager: the receiver answers nothing.
ucp_request_param_t UcxTransfer::message_param(Transfer& transfer, ucs_memory_type_t memory) {
  ucp_request_param_t param{};
  param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS |
                       UCP_OP_ATTR_FIELD_MEMORY_TYPE;
  param.cb.send = &UcxTransfer::on_request_done;
  param.user_data = &transfer;
  param.flags = UCP_AM_SEND_FLAG_EAGER | UCP_AM_SEND_FLAG_COPY_HEADER;
  param.memory_type = memory;
  return param;
}

void UcxTransfer::register_message_handlers() {
  struct Handler {
    unsigned id;
    uint32_t flags;
    ucp_am_recv_callback_t callback;
  };
  // Handlers run inside ucp_worker_progress, which the progress thread calls holding mutex_.
  // PUT_DATA and GET_REPLY keep their data (PERSISTENT_DATA) so that ucp_am_recv_data_nbx can copy
  // it into device memory as well as host memory.
  const Handler handlers[] = {
      {kPutData, UCP_AM_FLAG_WHOLE_MSG | UCP_AM_FLAG_PERSISTENT_DATA,
       [](void* self, const void* header, size_t header_length, void* data, size_t length,
          const ucp_am_recv_param_t* param) {
         return static_cast<UcxTransfer*>(self)->on_put_data_locked(header, header_length, data, length, param);
       }},
      {kPutScatter, UCP_AM_FLAG_WHOLE_MSG | UCP_AM_FLAG_PERSISTENT_DATA,
       [](void* self, const void* header, size_t header_length, void* data, size_t length,
          const ucp_am_recv_param_t* param) {
         return static_cast<UcxTransfer*>(self)->on_put_scatter_locked(header, header_length, data, length, param);
       }},
      {kPutDone, UCP_AM_FLAG_WHOLE_MSG,
       [](void* self, const void* header, size_t header_length, void* data, size_t length,
          const ucp_am_recv_param_t* param) {
         return static_cast<UcxTransfer*>(self)->on_put_done_locked(header, header_length, data, length, param);
       }},
      {kGetRequest, UCP_AM_FLAG_WHOLE_MSG,
       [](void* self, const void* header, size_t header_length, void*, size_t, const ucp_am_recv_param_t*) {
         return static_cast<UcxTransfer*>(self)->on_get_request_locked(header, header_length);
       }},
      {kGetReply, UCP_AM_FLAG_WHOLE_MSG | UCP_AM_FLAG_PERSISTENT_DATA,
       [](void* self, const void* header, size_t header_length, void* data, size_t length,
          const ucp_am_recv_param_t* param) {
         return static_cast<UcxTransfer*>(self)->on_get_reply_locked(header, header_length, data, length, param);
       }},
  };
  for (const Handler& h : handlers) {
    ucp_am_handler_param_t param{};
    param.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_FLAGS |
                       UCP_AM_HANDLER_PARAM_FIELD_CB | UCP_AM_HANDLER_PARAM_FIELD_ARG;
    param.id = h.id;
    param.flags = h.flags;
    param.cb = h.callback;
    param.arg = this;
    check_ucs(ucp_worker_set_am_recv_handler(ucx_.worker(), &param), "ucp_worker_set_am_recv_handler");
  }
}

DataPath UcxTransfer::data_path_for(ucp_ep_h ep) const {
  if (options_.data_path != DataPath::AUTO) return options_.data_path;
  std::array<ucp_transport_entry_t, 32> entries{};
  ucp_ep_attr_t attr{};
  attr.field_mask = UCP_EP_ATTR_FIELD_TRANSPORTS;
  attr.transports.entries = entries.data();
  attr.transports.num_entries = static_cast<unsigned>(entries.size());
  attr.transports.entry_size = sizeof(ucp_transport_entry_t);
  if (ucp_ep_query(ep, &attr) != UCS_OK) return DataPath::MESSAGES;
  for (unsigned i = 0; i < attr.transports.num_entries && i < entries.size(); ++i) {
    if (has_hardware_rma(entries[i].transport_name)) return DataPath::RMA;
  }
  return DataPath::MESSAGES;
}

void UcxTransfer::issue_as_messages_locked(Transfer& transfer, Peer& peer) {
  transfer.by_messages = true;
  for (const CopyOp& copy : transfer.copies) {  // all or nothing: check before the first message
    if (peer.rkey_for(transfer.is_put ? copy.dst : copy.src, copy.bytes) == nullptr) {
      transfer.error = "remote address outside the peer's registered memory";
      return;
    }
  }
  bool ok = true;
  if (transfer.is_put) {
    transfer.sequence = peer.next_put_sequence++;
    ok = send_put_data_locked(transfer, peer);
    if (ok) {
      transfer.done_message = transfer.notify ? encode_notice(transfer.notice) : std::string();
      const PutDoneHeader header{peer.key, transfer.sequence, transfer.bytes, transfer.notify ? 1u : 0u};
      const ucp_request_param_t param = message_param(transfer, ucx_memory_type(MemoryKind::HOST));
      ok = transfer.track(ucp_am_send_nbx(peer.ep, kPutDone, &header, sizeof(header), transfer.done_message.data(),
                                          transfer.done_message.size(), &param));
    }
  } else {
    ok = send_get_requests_locked(transfer, peer);
  }
  // A put cut short leaves a gap in the connection's numbering that no later put could pass, and
  // messages on the wire cannot be recalled: only closing the connection ends either.
  if (!ok && (transfer.is_put || transfer.outstanding > 0)) {
    fail_peer_locked(peer, "transfer " + std::to_string(transfer.handle) + " failed: " + transfer.error);
  }
}

bool UcxTransfer::send_put_data_locked(Transfer& transfer, Peer& peer) {
  const ucp_request_param_t data_param = message_param(transfer, ucx_memory_type(layout_.memory));
  ucp_request_param_t scatter_param = data_param;
  scatter_param.op_attr_mask |= UCP_OP_ATTR_FIELD_DATATYPE;
  scatter_param.datatype = ucp_dt_make_iov();  // the pieces straight from the KV memory, no staging copy
  const size_t header_room = ucx_.max_am_header() > sizeof(PutScatterHeader)
                                 ? (ucx_.max_am_header() - sizeof(PutScatterHeader)) / sizeof(ScatterEntry) : 0;
  // Packed sends read host memory only, for now: an IOV of device pointers through UCX's eager
  // protocols is not yet verified on a GPU (device memory keeps one message per copy).
  const size_t max_entries = layout_.memory == MemoryKind::HOST ? std::min<size_t>(kMaxScatterEntries, header_room) : 0;
  std::vector<ScatterEntry> entries;
  std::vector<ucp_dt_iov_t> pieces;
  uint64_t packed = 0;
  auto send_packed = [&]() -> bool {
    if (entries.empty()) return true;
    std::string header(sizeof(PutScatterHeader) + entries.size() * sizeof(ScatterEntry), '\0');
    const PutScatterHeader fixed{peer.key, transfer.sequence, entries.size()};
    std::memcpy(header.data(), &fixed, sizeof(fixed));
    std::memcpy(header.data() + sizeof(fixed), entries.data(), entries.size() * sizeof(ScatterEntry));
    transfer.scatter_iovs.push_back(std::move(pieces));  // UCX reads it until the send completes
    const std::vector<ucp_dt_iov_t>& kept = transfer.scatter_iovs.back();
    entries.clear();
    pieces = {};
    packed = 0;
    return transfer.track(ucp_am_send_nbx(peer.ep, kPutScatter, header.data(), header.size(), kept.data(),
                                          kept.size(), &scatter_param));  // the header is copied (COPY_HEADER)
  };
  for (const CopyOp& copy : transfer.copies) {
    if (copy.bytes < kScatterBelow && max_entries >= 2) {
      if ((entries.size() == max_entries || packed + copy.bytes > kMessageBytes) && !send_packed()) return false;
      entries.push_back({copy.dst, copy.bytes});
      pieces.push_back({reinterpret_cast<void*>(copy.src), copy.bytes});
      packed += copy.bytes;
      continue;
    }
    for (uint64_t offset = 0; offset < copy.bytes; offset += kMessageBytes) {
      const PutDataHeader header{peer.key, transfer.sequence, copy.dst + offset};
      if (!transfer.track(ucp_am_send_nbx(peer.ep, kPutData, &header, sizeof(header),
                                          reinterpret_cast<void*>(copy.src + offset),
                                          std::min(kMessageBytes, copy.bytes - offset), &data_param))) {
        return false;
      }
    }
  }
  return send_packed();
}

bool UcxTransfer::send_get_requests_locked(Transfer& transfer, Peer& peer) {
  const ucp_request_param_t param = message_param(transfer, ucx_memory_type(MemoryKind::HOST));
  while (transfer.next_copy < transfer.copies.size() && peer.get_requests_out < kGetWindow) {
    const CopyOp& copy = transfer.copies[transfer.next_copy];
    const uint64_t bytes = std::min(kMessageBytes, copy.bytes - transfer.next_offset);
    const GetRequestHeader header{peer.key, transfer.handle, copy.src + transfer.next_offset,
                                  copy.dst + transfer.next_offset, bytes};
    if (!transfer.track(ucp_am_send_nbx(peer.ep, kGetRequest, &header, sizeof(header), nullptr, 0, &param))) {
      return false;
    }
    ++peer.get_requests_out;
    transfer.next_offset += bytes;
    if (transfer.next_offset == copy.bytes) {
      ++transfer.next_copy;
      transfer.next_offset = 0;
    }
  }
  return true;
}

void UcxTransfer::continue_gets_locked() {
  for (auto& [handle, transfer_ptr] : transfers_) {
    Transfer& transfer = *transfer_ptr;
    if (transfer.phase != Transfer::Phase::ISSUED || !transfer.by_messages || transfer.is_put ||
        !transfer.error.empty() || transfer.next_copy == transfer.copies.size()) {
      continue;
    }
    Peer& peer = *peers_.at(transfer.peer);
    if (peer.state != PeerState::CONNECTED) continue;  // failing the peer failed its transfers
    if (!send_get_requests_locked(transfer, peer) && transfer.outstanding > 0) {
      fail_peer_locked(peer, "transfer " + std::to_string(transfer.handle) + " failed: " + transfer.error);
    }
  }
}

bool UcxTransfer::land_scatter_locked(void* data, const ScatterEntry* entries, size_t count,
                                      const ucp_am_recv_param_t* param) {
  if (!(param->recv_attr & UCP_AM_RECV_ATTR_FLAG_DATA) || (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV)) return false;
  std::vector<ucp_dt_iov_t> pieces(count);
  for (size_t i = 0; i < count; ++i) {
    if (!registered_locked(entries[i].address, entries[i].bytes)) return false;
    pieces[i] = {reinterpret_cast<void*>(entries[i].address), entries[i].bytes};
  }
  ucp_request_param_t recv{};
  recv.op_attr_mask = UCP_OP_ATTR_FIELD_MEMORY_TYPE | UCP_OP_ATTR_FIELD_DATATYPE;
  recv.memory_type = ucx_memory_type(layout_.memory);
  recv.datatype = ucp_dt_make_iov();  // one call scatters the pieces into place
  const ucs_status_ptr_t request = ucp_am_recv_data_nbx(ucx_.worker(), data, pieces.data(), count, &recv);
  if (UCS_PTR_IS_PTR(request)) {
    ucp_request_free(request);
    return false;
  }
  return UCS_PTR_STATUS(request) == UCS_OK;
}

bool UcxTransfer::landed_locked(const Transfer& transfer, const Peer& peer) const {
  if (!transfer.by_messages) return true;  // RMA: the requests' completion is the landing
  return transfer.is_put ? peer.acked_sequence >= transfer.sequence : transfer.received == transfer.bytes;
}

void UcxTransfer::answer_peers_locked() {
  const SteadyTime now = Clock::now();
  for (auto& [id, peer_ptr] : peers_) {
    Peer& peer = *peer_ptr;
    std::vector<GetReply> replies;
    replies.swap(peer.get_replies);
    if (peer.state != PeerState::CONNECTED) continue;
    if (peer.completed_sequence > peer.ack_sent_sequence) {
      std::string error;
      if (!peer.connection->send(MessageType::PUT_ACK, encode_put_ack(peer.completed_sequence),
                                 now + ucx_seconds_to_ms(options_.timeout_s), &error)) {
        fail_peer_locked(peer, error);
        continue;
      }
      peer.ack_sent_sequence = peer.completed_sequence;
      peer.last_sent = now;
    }
    for (const GetReply& reply : replies) {
      ucp_request_param_t param{};
      param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_FLAGS | UCP_OP_ATTR_FIELD_MEMORY_TYPE;
      param.cb.send = &UcxTransfer::on_reply_sent;
      param.flags = UCP_AM_SEND_FLAG_EAGER | UCP_AM_SEND_FLAG_COPY_HEADER;
      param.memory_type = ucx_memory_type(layout_.memory);
      const GetReplyHeader header{peer.key, reply.handle, reply.dst};
      const ucs_status_ptr_t request = ucp_am_send_nbx(peer.ep, kGetReply, &header, sizeof(header),
                                                       reinterpret_cast<void*>(reply.src), reply.bytes, &param);
      if (UCS_PTR_IS_ERR(request)) {
        fail_peer_locked(peer, std::string("answering a get: ") + ucs_status_string(UCS_PTR_STATUS(request)));
        break;
      }
    }
  }
}

UcxTransfer::Peer* UcxTransfer::peer_by_key_locked(uint64_t key) {
  for (auto& [id, peer] : peers_) {
    if (peer->key == key) {
      return peer->state == PeerState::CONNECTED && peer->protocol_error.empty() ? peer.get() : nullptr;
    }
  }
  return nullptr;  // a connection failed or never made: its late messages are dropped
}

bool UcxTransfer::registered_locked(uint64_t address, uint64_t bytes) const {
  if (!registration_) return false;
  for (const RemoteRegion& region : registration_->regions()) {
    if (address >= region.base && bytes <= region.length && address - region.base <= region.length - bytes) return true;
  }
  return false;
}

bool UcxTransfer::land_locked(void* data, uint64_t address, size_t bytes, const ucp_am_recv_param_t* param) {
  // Sent eager with persistent data; a rendezvous descriptor is not what this engine sends.
  if (!(param->recv_attr & UCP_AM_RECV_ATTR_FLAG_DATA) || (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV)) return false;
  if (!registered_locked(address, bytes)) return false;
  ucp_request_param_t recv{};
  recv.op_attr_mask = UCP_OP_ATTR_FIELD_MEMORY_TYPE;
  recv.memory_type = ucx_memory_type(layout_.memory);
  // Eager data is copied before this returns (UCX's own copy for device memory).
  const ucs_status_ptr_t request = ucp_am_recv_data_nbx(ucx_.worker(), data, reinterpret_cast<void*>(address), bytes, &recv);
  if (UCS_PTR_IS_PTR(request)) {  // not eager after all: never the case for this engine's messages
    ucp_request_free(request);
    return false;
  }
  return UCS_PTR_STATUS(request) == UCS_OK;
}

IncomingPut* UcxTransfer::incoming_put_locked(Peer& peer, uint64_t sequence) {
  const bool known = peer.incoming.count(sequence) != 0;
  if (sequence <= peer.completed_sequence || (!known && peer.incoming.size() >= kMaxIncomingPuts)) {
    peer.protocol_error = "a message of put " + std::to_string(sequence) + " out of order";
    return nullptr;
  }
  return &peer.incoming[sequence];
}

void UcxTransfer::complete_puts_locked(Peer& peer) {
  for (auto it = peer.incoming.find(peer.completed_sequence + 1); it != peer.incoming.end() && it->second.complete();
       it = peer.incoming.find(peer.completed_sequence + 1)) {
    if (it->second.notify) {
      try {
        push_notice_locked(peer, std::move(it->second.notice));
      } catch (const std::runtime_error& e) {
        peer.protocol_error = std::string("notice: ") + e.what();
        return;
      }
    }
    peer.incoming.erase(it);
    ++peer.completed_sequence;
  }
}

ucs_status_t UcxTransfer::on_put_data_locked(const void* header, size_t header_length, void* data, size_t length,
                                             const ucp_am_recv_param_t* param) {
  PutDataHeader h;
  Peer* peer = read_header(header, header_length, &h) ? peer_by_key_locked(h.key) : nullptr;
  IncomingPut* incoming = peer == nullptr ? nullptr : incoming_put_locked(*peer, h.sequence);
  if (incoming == nullptr) return UCS_OK;  // UCX releases the data
  receive_put_bytes_locked(*peer, *incoming, h.sequence, length,
                           [&] { return land_locked(data, h.address, length, param); });
  return UCS_OK;
}

void UcxTransfer::receive_put_bytes_locked(Peer& peer, IncomingPut& put, uint64_t sequence, size_t length,
                                           const std::function<bool()>& land) {
  if (length > put.expected - put.received) {
    peer.protocol_error = "more data than put " + std::to_string(sequence) + " announced";
  } else if (!land()) {
    peer.protocol_error = "put data outside this engine's KV memory";
  } else {
    put.received += length;
    complete_puts_locked(peer);
  }
}

ucs_status_t UcxTransfer::on_put_scatter_locked(const void* header, size_t header_length, void* data, size_t length,
                                                const ucp_am_recv_param_t* param) {
  PutScatterHeader h;
  Peer* peer = header_length >= sizeof(h) ? (std::memcpy(&h, header, sizeof(h)), peer_by_key_locked(h.key)) : nullptr;
  IncomingPut* incoming = peer == nullptr ? nullptr : incoming_put_locked(*peer, h.sequence);
  if (incoming == nullptr) return UCS_OK;
  if (h.count == 0 || h.count > kMaxScatterEntries || header_length != sizeof(h) + h.count * sizeof(ScatterEntry)) {
    peer->protocol_error = "a malformed scatter message of put " + std::to_string(h.sequence);
    return UCS_OK;
  }
  std::vector<ScatterEntry> entries(h.count);  // copied out: the header need not be aligned
  std::memcpy(entries.data(), static_cast<const char*>(header) + sizeof(h), h.count * sizeof(ScatterEntry));
  uint64_t total = 0;
  for (const ScatterEntry& e : entries) total += std::min(e.bytes, kMessageBytes + 1);  // no overflow
  if (total != length) {
    peer->protocol_error = "a scatter message whose pieces do not add up to its data";
  } else {
    receive_put_bytes_locked(*peer, *incoming, h.sequence, length,
                             [&] { return land_scatter_locked(data, entries.data(), entries.size(), param); });
  }
  return UCS_OK;
}

ucs_status_t UcxTransfer::on_put_done_locked(const void* header, size_t header_length, void* data, size_t length,
                                             const ucp_am_recv_param_t* param) {
  PutDoneHeader h;
  Peer* peer = read_header(header, header_length, &h) ? peer_by_key_locked(h.key) : nullptr;
  IncomingPut* incoming = peer == nullptr ? nullptr : incoming_put_locked(*peer, h.sequence);
  if (incoming == nullptr) return UCS_OK;
  IncomingPut& put = *incoming;
  if ((param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) || put.expected != UINT64_MAX || h.bytes < put.received) {
    peer->protocol_error = "put " + std::to_string(h.sequence) + " ended twice or with the wrong size";
    return UCS_OK;
  }
  put.expected = h.bytes;
  if (h.notify != 0) {
    try {
      put.notice = decode_notice(std::string(static_cast<const char*>(data), length));
      put.notify = true;
    } catch (const std::runtime_error& e) {
      peer->protocol_error = std::string("malformed notice: ") + e.what();
      return UCS_OK;
    }
  }
  complete_puts_locked(*peer);
  return UCS_OK;
}

ucs_status_t UcxTransfer::on_get_request_locked(const void* header, size_t header_length) {
  GetRequestHeader h;
  Peer* peer = read_header(header, header_length, &h) ? peer_by_key_locked(h.key) : nullptr;
  if (peer == nullptr) return UCS_OK;
  if (h.bytes == 0 || h.bytes > kMessageBytes || !registered_locked(h.src, h.bytes)) {
    peer->protocol_error = "a get outside this engine's KV memory";
  } else if (peer->get_replies.size() >= kMaxQueuedReplies) {
    peer->protocol_error = "too many gets waiting for replies";
  } else {
    peer->get_replies.push_back({h.handle, h.src, h.dst, h.bytes});
  }
  return UCS_OK;
}

ucs_status_t UcxTransfer::on_get_reply_locked(const void* header, size_t header_length, void* data, size_t length,
                                              const ucp_am_recv_param_t* param) {
  GetReplyHeader h;
  Peer* peer = read_header(header, header_length, &h) ? peer_by_key_locked(h.key) : nullptr;
  if (peer == nullptr) return UCS_OK;
  if (peer->get_requests_out > 0) --peer->get_requests_out;  // one reply answers one request
  auto it = transfers_.find(h.handle);
  if (it == transfers_.end()) return UCS_OK;  // a get that failed and was reported: its late bytes are dropped
  Transfer& transfer = *it->second;
  if (transfer.peer != peer->id || transfer.is_put || !transfer.by_messages) {
    peer->protocol_error = "a get reply for a transfer that is not its get";
  } else if (transfer.phase != Transfer::Phase::ISSUED || !transfer.error.empty()) {
    return UCS_OK;  // failed: nothing more lands in its blocks
  } else if (length > transfer.bytes - transfer.received) {
    peer->protocol_error = "more get reply data than the get asked for";
  } else if (!land_locked(data, h.address, length, param)) {
    peer->protocol_error = "get reply outside this engine's KV memory";
  } else {
    transfer.received += length;
  }
  return UCS_OK;
}

void UcxTransfer::on_reply_sent(void* request, ucs_status_t, void*) {
  // A reply to a peer that died fails here; the peer's connection reports it.
  ucp_request_free(request);
}

}  // namespace rtpllm

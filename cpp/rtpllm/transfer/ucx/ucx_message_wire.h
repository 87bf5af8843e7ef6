// The active messages of UcxTransfer's DataPath::MESSAGES (ucx_transfer_messages.cc): their UCX
// AM ids and headers. Headers are raw structs: both ends run this code on little-endian 64-bit
// machines, and the PeerDescriptor's protocol version guards the layout. Every header starts with
// the connection key that names the sender's connection at the receiver.
#pragma once

#include <cstdint>

namespace rtpllm::ucx_wire {

enum MessageId : unsigned { kPutData = 0x7210, kPutDone, kGetRequest, kGetReply };

// Data: the bytes to land at `address` in the receiver's memory, part of put number `sequence`.
struct PutDataHeader {
  uint64_t key, sequence, address;
};
// Data: the put's encoded NoticeMessage when notify != 0. Put `sequence` carried `bytes` in all.
struct PutDoneHeader {
  uint64_t key, sequence, bytes, notify;
};
// No data: send `bytes` from `src` in the receiver's memory back to `dst` in the sender's, for the
// sender's transfer `handle` (bytes <= kMessageBytes).
struct GetRequestHeader {
  uint64_t key, handle, src, dst, bytes;
};
// Data: the bytes of transfer `handle`'s get to land at `address`.
struct GetReplyHeader {
  uint64_t key, handle, address;
};

// Messages stay this small so that a receiver assembles at most this much per message (UCX holds a
// whole eager message before the handler runs) and large copies stream in pieces.
constexpr uint64_t kMessageBytes = 256 << 10;

}  // namespace rtpllm::ucx_wire

// The active messages of UcxTransfer's DataPath::MESSAGES (ucx_transfer_messages.cc): their UCX
// AM ids and headers. Headers are raw structs: both ends run this code on little-endian 64-bit
// machines, and the PeerDescriptor's protocol version guards the layout. Every header starts with
// the connection key that names the sender's connection at the receiver.
#pragma once

#include <cstdint>

namespace rtpllm::ucx_wire {

enum MessageId : unsigned { kPutData = 0x7210, kPutDone, kGetRequest, kGetReply, kPutScatter };

// Data: the bytes to land at `address` in the receiver's memory, part of put number `sequence`.
struct PutDataHeader {
  uint64_t key, sequence, address;
};
// Data: `count` pieces of put `sequence`, one after another. The header is followed by `count`
// ScatterEntry: where each piece lands in the receiver's memory, and its length. Small copies (a
// head slice moves one per token) travel this way, many to a message, instead of one message each.
struct PutScatterHeader {
  uint64_t key, sequence, count;
};
struct ScatterEntry {
  uint64_t address, bytes;
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

// Copies shorter than this travel packed in PUT_SCATTER messages, at most kMaxScatterEntries to one
// (fewer where UCX's largest message header, max_am_header, holds fewer entries), from host memory.
constexpr uint64_t kScatterBelow = 16 << 10;
constexpr uint64_t kMaxScatterEntries = 256;

// A requester keeps at most this many GET_REQUESTs unanswered on a connection, and asks for more
// as replies land: a target queues what it has not answered yet, and fails a peer that makes it
// queue more than it allows (kMaxQueuedReplies, far above this).
constexpr uint64_t kGetWindow = 1024;

}  // namespace rtpllm::ucx_wire

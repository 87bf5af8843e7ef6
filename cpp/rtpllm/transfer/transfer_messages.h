// The typed messages of the transfer engine's control channel and their byte encoding.
//
// A frame is [u32 type][u32 payload length][payload], integers little endian (every platform we
// build for). Decoding checks every length against the bytes present and throws
// std::runtime_error on a malformed payload; the connection that sent it is then failed, so a
// corrupt or hostile peer costs one connection, never the process.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "rtpllm/core/types.h"
#include "rtpllm/kvstore/kv_layout.h"

namespace rtpllm {

enum class MessageType : uint32_t {
  HELLO = 1,   // PeerDescriptor: the first message each side sends
  REFUSE = 2,  // reason (string): the HELLO was not accepted; the sender closes
  NOTICE = 3,  // NoticeMessage: a put's data has landed
  PING = 4,    // empty: keeps a quiet connection alive (liveness)
  BYE = 5,     // empty: orderly close
  STORE = 6,   // a KV store protocol message (kvstore/remote/store_protocol.h), opaque here
  GRANT_QUERY = 7,  // u64 request id: which blocks may a put of this request write?
  GRANT = 8,        // GrantMessage: the answer
  PUT_ACK = 9,      // u64 sequence number: every put sent as messages up to it has landed (DataPath::MESSAGES)
};
inline constexpr MessageType kLastMessageType = MessageType::PUT_ACK;

inline constexpr uint32_t kMaxMessageBytes = 16u << 20;  // larger frames are a protocol error

// One registered span of the sender's memory and the UCX remote key that grants access to it.
struct RemoteRegion {
  uint64_t base = 0;
  uint64_t length = 0;
  std::string rkey;  // packed by ucp_rkey_pack, opaque here
  std::string exported;  // PeerMemory::export_region of it; empty: not mappable (peer_memory.h)
};

// What a peer needs to address this engine's KV memory.
struct PeerDescriptor {
  uint32_t protocol_version = 4;
  std::string name;
  std::string identity;
  std::string worker_address;  // ucp_worker_get_address, opaque here
  KVLayout layout;
  std::vector<RemoteRegion> regions;
  bool requires_write_grants = false;
  // Names this connection in the active messages of DataPath::MESSAGES: the connecting side draws
  // it and sends it in its HELLO, the accepting side adopts it (0 in the accepting side's HELLO).
  uint64_t connection_key = 0;
  // PeerMemory::scope of the exports in `regions` (empty: none): DataPath::DIRECT maps them only
  // from an engine with the same scope.
  std::string memory_scope;
};

struct NoticeMessage {
  uint64_t request_id = 0;
  int32_t layer = -1;
  int64_t num_tokens = 0;
  std::vector<BlockId> blocks;
  std::string payload;  // optional trailer: absent on the wire when empty (older peers send none)
};

std::string encode_descriptor(const PeerDescriptor& descriptor);
PeerDescriptor decode_descriptor(const std::string& payload);

std::string encode_notice(const NoticeMessage& notice);
NoticeMessage decode_notice(const std::string& payload);

// The receiver's answer to a GRANT_QUERY: the blocks a put naming request_id may write.
struct GrantMessage {
  uint64_t request_id = 0;
  bool granted = false;        // false: no grant for this id (never given, revoked, or expired)
  std::vector<BlockId> blocks;
};

std::string encode_grant_query(uint64_t request_id);
uint64_t decode_grant_query(const std::string& payload);
std::string encode_grant(const GrantMessage& grant);
GrantMessage decode_grant(const std::string& payload);

std::string encode_put_ack(uint64_t sequence);
uint64_t decode_put_ack(const std::string& payload);

// [type][length][payload] ready to write to the socket.
std::string frame_message(MessageType type, const std::string& payload);

}  // namespace rtpllm

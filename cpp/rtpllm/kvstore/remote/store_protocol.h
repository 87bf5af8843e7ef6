// The typed messages between the shared KV store (kv_store_server.h) and its clients
// (remote_store_tier.h), and their byte encoding.
//
// They travel as MessageType::STORE frames of the transfer engine's control channel
// (transfer/control_channel.h) on a connection of their own: the payload is [u32 StoreMessage]
// [body], integers little endian. The KV bytes never go here: they move one-sided over the
// transfer engine (UCX) between the client's pool and the store's block buffers.
//
// A session:
//   client -> HELLO (identity, KV shape)     store -> WELCOME (transfer port, capacity) or REFUSE
//   store  -> INDEX (every hash it holds, then each change): the client's local view, so that
//             the step loop's match() never waits on the network;
//   load:  client -> PIN(id, hashes)      store -> PINNED(id, slots) or PINNED(id, error)
//          client gets the slots' bytes, then -> UNPIN(id)
//   save:  client -> RESERVE(id, hashes)  store -> RESERVED(id, slot per hash, -1: skip it)
//          client puts its blocks into the slots, then -> COMMIT(id, ok)
//   a request the store cannot parse or accept -> ERROR(id, why); a malformed frame closes the
//   connection (one connection lost, never the store).
// Decoding checks every length against the bytes present and throws std::runtime_error.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "rtpllm/core/types.h"

namespace rtpllm {

enum class StoreMessage : uint32_t {
  HELLO = 1,
  WELCOME = 2,
  REFUSE = 3,
  INDEX = 4,
  PIN = 5,
  PINNED = 6,
  UNPIN = 7,
  RESERVE = 8,
  RESERVED = 9,
  COMMIT = 10,
  ERROR = 11,
};

inline constexpr uint32_t kStoreProtocolVersion = 1;

// What one block's bytes mean: every client of a store must present the same shape and identity.
struct KVBlockShape {
  int32_t num_layers = 0;
  int32_t block_size = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t element_bytes = 0;

  int64_t bytes_per_block() const {
    return 2LL * num_layers * block_size * num_kv_heads * head_dim * element_bytes;
  }
  bool operator==(const KVBlockShape& o) const {
    return num_layers == o.num_layers && block_size == o.block_size && num_kv_heads == o.num_kv_heads &&
           head_dim == o.head_dim && element_bytes == o.element_bytes;
  }
  std::string describe() const;  // "layers=2 block_size=16 kv_heads=2 head_dim=8 element_bytes=4"
};

struct StoreHello {
  uint32_t protocol_version = kStoreProtocolVersion;
  std::string name;
  uint64_t identity = 0;  // the cache identity (root of the block-hash chain)
  KVBlockShape shape;
};

struct StoreWelcome {
  int32_t transfer_port = 0;  // where the store's transfer engine listens (same host)
  int64_t capacity_blocks = 0;
  int32_t max_blocks_per_request = 0;
  // A client's transfers into and out of the store must end (DONE or FAILED) within this; the
  // store keeps a vanished client's slots untouched for twice as long.
  double transfer_timeout_s = 0;
};

// The store's index changed (the first one after WELCOME lists everything it holds).
struct StoreIndexUpdate {
  std::vector<BlockHash> added;
  std::vector<BlockHash> removed;
  int64_t used_blocks = 0;
};

// PIN and RESERVE.
struct StoreBlockRequest {
  uint64_t request_id = 0;
  std::vector<BlockHash> hashes;
};

// PINNED (slots, or error when any hash is not held) and RESERVED (one slot per hash, -1: skip).
struct StoreSlotsReply {
  uint64_t request_id = 0;
  std::vector<int32_t> slots;
  std::string error;  // PINNED only: non-empty when the pin was refused (slots empty)
};

// UNPIN (ok ignored) and COMMIT (ok: the puts into the reserved slots all completed).
struct StoreRelease {
  uint64_t request_id = 0;
  bool ok = true;
};

// ERROR and REFUSE (request_id 0).
struct StoreError {
  uint64_t request_id = 0;
  std::string message;
};

// The StoreMessage a payload carries; throws std::runtime_error when it is too short or unknown.
StoreMessage store_message_type(const std::string& payload);

std::string encode_store_hello(const StoreHello& m);
std::string encode_store_welcome(const StoreWelcome& m);
std::string encode_store_index(const StoreIndexUpdate& m);
std::string encode_store_request(StoreMessage type, const StoreBlockRequest& m);  // PIN, RESERVE
std::string encode_store_slots(StoreMessage type, const StoreSlotsReply& m);      // PINNED, RESERVED
std::string encode_store_release(StoreMessage type, const StoreRelease& m);       // UNPIN, COMMIT
std::string encode_store_error(StoreMessage type, const StoreError& m);           // ERROR, REFUSE

// Each throws std::runtime_error on a payload of another type or a malformed body.
StoreHello decode_store_hello(const std::string& payload);
StoreWelcome decode_store_welcome(const std::string& payload);
StoreIndexUpdate decode_store_index(const std::string& payload);
StoreBlockRequest decode_store_request(const std::string& payload);
StoreSlotsReply decode_store_slots(const std::string& payload);
StoreRelease decode_store_release(const std::string& payload);
StoreError decode_store_error(const std::string& payload);

}  // namespace rtpllm

#include "rtpllm/kvstore/remote/store_protocol.h"

#include "rtpllm/core/byte_codec.h"

#include <cstring>
#include <stdexcept>

namespace rtpllm {
namespace {

// A store message: its type first, then its fields.
ByteWriter writer(StoreMessage type) {
  ByteWriter w;
  w.put<uint32_t>(static_cast<uint32_t>(type));
  return w;
}

// Reads the fields of a message of type `expected` (or `or_this`), after its type.
ByteReader reader(const std::string& in, StoreMessage expected, StoreMessage or_this) {
  const StoreMessage type = store_message_type(in);
  if (type != expected && type != or_this) {
    throw std::runtime_error("malformed store message: type " + std::to_string(static_cast<uint32_t>(type)) +
                             " where " + std::to_string(static_cast<uint32_t>(expected)) + " was expected");
  }
  return ByteReader(in, "malformed store message", sizeof(uint32_t));
}

}  // namespace

std::string KVBlockShape::describe() const {
  return "layers=" + std::to_string(num_layers) + " block_size=" + std::to_string(block_size) + " kv_heads=" +
         std::to_string(num_kv_heads) + " head_dim=" + std::to_string(head_dim) + " element_bytes=" +
         std::to_string(element_bytes);
}

StoreMessage store_message_type(const std::string& payload) {
  uint32_t type = 0;
  if (payload.size() < sizeof(type)) throw std::runtime_error("malformed store message: no type");
  std::memcpy(&type, payload.data(), sizeof(type));
  if (type < static_cast<uint32_t>(StoreMessage::HELLO) || type > static_cast<uint32_t>(StoreMessage::ERROR)) {
    throw std::runtime_error("malformed store message: unknown type " + std::to_string(type));
  }
  return static_cast<StoreMessage>(type);
}

std::string encode_store_hello(const StoreHello& m) {
  ByteWriter w = writer(StoreMessage::HELLO);
  w.put<uint32_t>(m.protocol_version);
  w.put_bytes(m.name);
  w.put<uint64_t>(m.identity);
  w.put<int32_t>(m.shape.num_layers);
  w.put<int32_t>(m.shape.block_size);
  w.put<int32_t>(m.shape.num_kv_heads);
  w.put<int32_t>(m.shape.head_dim);
  w.put<int32_t>(m.shape.element_bytes);
  return w.take();
}

StoreHello decode_store_hello(const std::string& payload) {
  ByteReader r = reader(payload, StoreMessage::HELLO, StoreMessage::HELLO);
  StoreHello m;
  m.protocol_version = r.get<uint32_t>();
  m.name = r.get_bytes();
  m.identity = r.get<uint64_t>();
  m.shape.num_layers = r.get<int32_t>();
  m.shape.block_size = r.get<int32_t>();
  m.shape.num_kv_heads = r.get<int32_t>();
  m.shape.head_dim = r.get<int32_t>();
  m.shape.element_bytes = r.get<int32_t>();
  r.expect_end();
  return m;
}

std::string encode_store_welcome(const StoreWelcome& m) {
  ByteWriter w = writer(StoreMessage::WELCOME);
  w.put<int32_t>(m.transfer_port);
  w.put<int64_t>(m.capacity_blocks);
  w.put<int32_t>(m.max_blocks_per_request);
  w.put<double>(m.transfer_timeout_s);
  return w.take();
}

StoreWelcome decode_store_welcome(const std::string& payload) {
  ByteReader r = reader(payload, StoreMessage::WELCOME, StoreMessage::WELCOME);
  StoreWelcome m;
  m.transfer_port = r.get<int32_t>();
  m.capacity_blocks = r.get<int64_t>();
  m.max_blocks_per_request = r.get<int32_t>();
  m.transfer_timeout_s = r.get<double>();
  r.expect_end();
  return m;
}

std::string encode_store_index(const StoreIndexUpdate& m) {
  ByteWriter w = writer(StoreMessage::INDEX);
  w.put_vector(m.added);
  w.put_vector(m.removed);
  w.put<int64_t>(m.used_blocks);
  return w.take();
}

StoreIndexUpdate decode_store_index(const std::string& payload) {
  ByteReader r = reader(payload, StoreMessage::INDEX, StoreMessage::INDEX);
  StoreIndexUpdate m;
  m.added = r.get_vector<BlockHash>();
  m.removed = r.get_vector<BlockHash>();
  m.used_blocks = r.get<int64_t>();
  r.expect_end();
  return m;
}

std::string encode_store_request(StoreMessage type, const StoreBlockRequest& m) {
  ByteWriter w = writer(type);
  w.put<uint64_t>(m.request_id);
  w.put_vector(m.hashes);
  return w.take();
}

StoreBlockRequest decode_store_request(const std::string& payload) {
  ByteReader r = reader(payload, StoreMessage::PIN, StoreMessage::RESERVE);
  StoreBlockRequest m;
  m.request_id = r.get<uint64_t>();
  m.hashes = r.get_vector<BlockHash>();
  r.expect_end();
  return m;
}

std::string encode_store_slots(StoreMessage type, const StoreSlotsReply& m) {
  ByteWriter w = writer(type);
  w.put<uint64_t>(m.request_id);
  w.put_vector(m.slots);
  w.put_bytes(m.error);
  return w.take();
}

StoreSlotsReply decode_store_slots(const std::string& payload) {
  ByteReader r = reader(payload, StoreMessage::PINNED, StoreMessage::RESERVED);
  StoreSlotsReply m;
  m.request_id = r.get<uint64_t>();
  m.slots = r.get_vector<int32_t>();
  m.error = r.get_bytes();
  r.expect_end();
  return m;
}

std::string encode_store_release(StoreMessage type, const StoreRelease& m) {
  ByteWriter w = writer(type);
  w.put<uint64_t>(m.request_id);
  w.put<uint8_t>(m.ok ? 1 : 0);
  return w.take();
}

StoreRelease decode_store_release(const std::string& payload) {
  ByteReader r = reader(payload, StoreMessage::UNPIN, StoreMessage::COMMIT);
  StoreRelease m;
  m.request_id = r.get<uint64_t>();
  m.ok = r.get<uint8_t>() != 0;
  r.expect_end();
  return m;
}

std::string encode_store_error(StoreMessage type, const StoreError& m) {
  ByteWriter w = writer(type);
  w.put<uint64_t>(m.request_id);
  w.put_bytes(m.message);
  return w.take();
}

StoreError decode_store_error(const std::string& payload) {
  ByteReader r = reader(payload, StoreMessage::ERROR, StoreMessage::REFUSE);
  StoreError m;
  m.request_id = r.get<uint64_t>();
  m.message = r.get_bytes();
  r.expect_end();
  return m;
}

}  // namespace rtpllm

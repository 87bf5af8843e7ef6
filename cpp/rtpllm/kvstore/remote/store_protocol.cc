#include "rtpllm/kvstore/remote/store_protocol.h"

#include "rtpllm/core/byte_codec.h"

#include <cstring>
#include <stdexcept>
#include <type_traits>

namespace rtpllm {
namespace {

// Each message lists its fields once, in wire order (`visit`); the same list writes and reads it.
// A field is a fixed-size value, a byte string, or a vector of fixed-size items (byte_codec.h).
struct Writer {
  ByteWriter out;
  template <typename T>
  void operator()(const T& value) {
    out.put<T>(value);
  }
  void operator()(const std::string& bytes) { out.put_bytes(bytes); }
  template <typename T>
  void operator()(const std::vector<T>& items) {
    out.put_vector(items);
  }
  void operator()(bool flag) { out.put<uint8_t>(flag ? 1 : 0); }
};

struct Reader {
  ByteReader in;
  template <typename T>
  void operator()(T& value) {
    value = in.get<T>();
  }
  void operator()(std::string& bytes) { bytes = in.get_bytes(); }
  template <typename T>
  void operator()(std::vector<T>& items) {
    items = in.get_vector<T>();
  }
  void operator()(bool& flag) { flag = in.get<uint8_t>() != 0; }
};

template <typename F, typename M>
void visit(F&& f, M& m) {  // M: a message, const when writing
  using Message = std::remove_cv_t<M>;
  if constexpr (std::is_same_v<Message, StoreHello>) {
    f(m.protocol_version); f(m.name); f(m.identity);
    f(m.shape.num_layers); f(m.shape.block_size); f(m.shape.num_kv_heads); f(m.shape.head_dim);
    f(m.shape.element_bytes);
  } else if constexpr (std::is_same_v<Message, StoreWelcome>) {
    f(m.transfer_port); f(m.capacity_blocks); f(m.max_blocks_per_request); f(m.transfer_timeout_s);
  } else if constexpr (std::is_same_v<Message, StoreIndexUpdate>) {
    f(m.added); f(m.removed); f(m.used_blocks);
  } else if constexpr (std::is_same_v<Message, StoreBlockRequest>) {
    f(m.request_id); f(m.hashes);
  } else if constexpr (std::is_same_v<Message, StoreSlotsReply>) {
    f(m.request_id); f(m.slots); f(m.error);
  } else if constexpr (std::is_same_v<Message, StoreRelease>) {
    f(m.request_id); f(m.ok);
  } else if constexpr (std::is_same_v<Message, StoreError>) {
    f(m.request_id); f(m.message);
  } else {
    static_assert(sizeof(Message) == 0, "a store message without a field list");
  }
}

// [u32 type][fields].
template <typename M>
std::string encode(StoreMessage type, const M& m) {
  Writer w;
  w(static_cast<uint32_t>(type));
  visit(w, m);
  return w.out.take();
}

// The fields of a message of type `expected` (or `or_this`), after its type; nothing may follow.
template <typename M>
M decode(const std::string& in, StoreMessage expected, StoreMessage or_this) {
  const StoreMessage type = store_message_type(in);
  if (type != expected && type != or_this) {
    throw std::runtime_error("malformed store message: type " + std::to_string(static_cast<uint32_t>(type)) +
                             " where " + std::to_string(static_cast<uint32_t>(expected)) + " was expected");
  }
  Reader r{ByteReader(in, "malformed store message", sizeof(uint32_t))};
  M m;
  visit(r, m);
  r.in.expect_end();
  return m;
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

std::string encode_store_hello(const StoreHello& m) { return encode(StoreMessage::HELLO, m); }
StoreHello decode_store_hello(const std::string& p) { return decode<StoreHello>(p, StoreMessage::HELLO, StoreMessage::HELLO); }

std::string encode_store_welcome(const StoreWelcome& m) { return encode(StoreMessage::WELCOME, m); }
StoreWelcome decode_store_welcome(const std::string& p) {
  return decode<StoreWelcome>(p, StoreMessage::WELCOME, StoreMessage::WELCOME);
}

std::string encode_store_index(const StoreIndexUpdate& m) { return encode(StoreMessage::INDEX, m); }
StoreIndexUpdate decode_store_index(const std::string& p) {
  return decode<StoreIndexUpdate>(p, StoreMessage::INDEX, StoreMessage::INDEX);
}

std::string encode_store_request(StoreMessage type, const StoreBlockRequest& m) { return encode(type, m); }
StoreBlockRequest decode_store_request(const std::string& p) {
  return decode<StoreBlockRequest>(p, StoreMessage::PIN, StoreMessage::RESERVE);
}

std::string encode_store_slots(StoreMessage type, const StoreSlotsReply& m) { return encode(type, m); }
StoreSlotsReply decode_store_slots(const std::string& p) {
  return decode<StoreSlotsReply>(p, StoreMessage::PINNED, StoreMessage::RESERVED);
}

std::string encode_store_release(StoreMessage type, const StoreRelease& m) { return encode(type, m); }
StoreRelease decode_store_release(const std::string& p) {
  return decode<StoreRelease>(p, StoreMessage::UNPIN, StoreMessage::COMMIT);
}

std::string encode_store_error(StoreMessage type, const StoreError& m) { return encode(type, m); }
StoreError decode_store_error(const std::string& p) {
  return decode<StoreError>(p, StoreMessage::ERROR, StoreMessage::REFUSE);
}

}  // namespace rtpllm

#include "rtpllm/transfer/transfer_messages.h"

#include "rtpllm/core/byte_codec.h"

#include <cstring>
#include <stdexcept>

namespace rtpllm {

std::string encode_descriptor(const PeerDescriptor& d) {
  ByteWriter w;
  w.put<uint32_t>(d.protocol_version);
  w.put_bytes(d.name);
  w.put_bytes(d.identity);
  w.put_bytes(d.worker_address);
  const KVLayout& l = d.layout;
  w.put<uint8_t>(static_cast<uint8_t>(l.memory));
  w.put<int32_t>(l.device_index);
  w.put<int32_t>(l.num_blocks);
  w.put<int32_t>(l.block_size);
  w.put<int32_t>(l.num_kv_heads);
  w.put<int32_t>(l.head_dim);
  w.put<int32_t>(l.element_bytes);
  w.put<int64_t>(l.block_stride_bytes);
  w.put<uint32_t>(static_cast<uint32_t>(l.layers.size()));
  for (const KVLayerAddress& a : l.layers) {
    w.put<uint64_t>(a.k_base);
    w.put<uint64_t>(a.v_base);
  }
  w.put<uint32_t>(static_cast<uint32_t>(d.regions.size()));
  for (const RemoteRegion& r : d.regions) {
    w.put<uint64_t>(r.base);
    w.put<uint64_t>(r.length);
    w.put_bytes(r.rkey);
    w.put_bytes(r.exported);
  }
  w.put<uint8_t>(d.requires_write_grants ? 1 : 0);
  w.put<uint64_t>(d.connection_key);
  w.put_bytes(d.memory_scope);
  return w.take();
}

PeerDescriptor decode_descriptor(const std::string& payload) {
  ByteReader r(payload, "malformed message");
  PeerDescriptor d;
  d.protocol_version = r.get<uint32_t>();
  if (d.protocol_version != PeerDescriptor{}.protocol_version) {
    throw std::runtime_error("unsupported transfer protocol version " + std::to_string(d.protocol_version));
  }
  d.name = r.get_bytes();
  d.identity = r.get_bytes();
  d.worker_address = r.get_bytes();
  KVLayout& l = d.layout;
  l.memory = static_cast<MemoryKind>(r.get<uint8_t>());
  l.device_index = r.get<int32_t>();
  l.num_blocks = r.get<int32_t>();
  l.block_size = r.get<int32_t>();
  l.num_kv_heads = r.get<int32_t>();
  l.head_dim = r.get<int32_t>();
  l.element_bytes = r.get<int32_t>();
  l.block_stride_bytes = r.get<int64_t>();
  const uint32_t num_layers = r.get_count(2 * sizeof(uint64_t));
  l.layers.resize(num_layers);
  for (KVLayerAddress& a : l.layers) {
    a.k_base = r.get<uint64_t>();
    a.v_base = r.get<uint64_t>();
  }
  const uint32_t num_regions = r.get_count(2 * sizeof(uint64_t) + 2 * sizeof(uint32_t));
  d.regions.resize(num_regions);
  for (RemoteRegion& region : d.regions) {
    region.base = r.get<uint64_t>();
    region.length = r.get<uint64_t>();
    region.rkey = r.get_bytes();
    region.exported = r.get_bytes();
  }
  const uint8_t grants = r.get<uint8_t>();
  if (grants > 1) throw std::runtime_error("malformed message: bad write grant flag");
  d.requires_write_grants = grants == 1;
  d.connection_key = r.get<uint64_t>();
  d.memory_scope = r.get_bytes();
  r.expect_end();
  return d;
}

std::string encode_notice(const NoticeMessage& n) {
  ByteWriter w;
  w.put<uint64_t>(n.request_id);
  w.put<int32_t>(n.layer);
  w.put<int64_t>(n.num_tokens);
  w.put<uint32_t>(static_cast<uint32_t>(n.blocks.size()));
  for (BlockId b : n.blocks) w.put<int32_t>(b);
  if (!n.payload.empty()) w.put_bytes(n.payload);
  return w.take();
}

NoticeMessage decode_notice(const std::string& payload) {
  ByteReader r(payload, "malformed message");
  NoticeMessage n;
  n.request_id = r.get<uint64_t>();
  n.layer = r.get<int32_t>();
  n.num_tokens = r.get<int64_t>();
  const uint32_t count = r.get_count(sizeof(int32_t));
  n.blocks.resize(count);
  for (BlockId& b : n.blocks) b = r.get<int32_t>();
  if (!r.at_end()) n.payload = r.get_bytes();
  r.expect_end();
  return n;
}

namespace {

std::string encode_u64(uint64_t value) {
  ByteWriter w;
  w.put<uint64_t>(value);
  return w.take();
}

uint64_t decode_u64(const std::string& payload) {
  ByteReader r(payload, "malformed message");
  const uint64_t value = r.get<uint64_t>();
  r.expect_end();
  return value;
}

}  // namespace

std::string encode_grant_query(uint64_t request_id) { return encode_u64(request_id); }
uint64_t decode_grant_query(const std::string& payload) { return decode_u64(payload); }
std::string encode_put_ack(uint64_t sequence) { return encode_u64(sequence); }
uint64_t decode_put_ack(const std::string& payload) { return decode_u64(payload); }

std::string encode_grant(const GrantMessage& g) {
  ByteWriter w;
  w.put<uint64_t>(g.request_id);
  w.put<uint8_t>(g.granted ? 1 : 0);
  w.put<uint32_t>(static_cast<uint32_t>(g.blocks.size()));
  for (BlockId b : g.blocks) w.put<int32_t>(b);
  return w.take();
}

GrantMessage decode_grant(const std::string& payload) {
  ByteReader r(payload, "malformed message");
  GrantMessage g;
  g.request_id = r.get<uint64_t>();
  const uint8_t granted = r.get<uint8_t>();
  if (granted > 1) throw std::runtime_error("malformed message: bad granted flag");
  g.granted = granted == 1;
  g.blocks.resize(r.get_count(sizeof(int32_t)));
  for (BlockId& b : g.blocks) b = r.get<int32_t>();
  r.expect_end();
  return g;
}

std::string frame_message(MessageType type, const std::string& payload) {
  if (payload.size() > kMaxMessageBytes) throw std::invalid_argument("message too large for the control channel");
  ByteWriter w;
  w.put<uint32_t>(static_cast<uint32_t>(type));
  w.put<uint32_t>(static_cast<uint32_t>(payload.size()));
  return w.take() + payload;
}

}  // namespace rtpllm

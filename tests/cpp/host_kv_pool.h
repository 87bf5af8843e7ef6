// A paged KV pool in host memory, shaped as Python allocates the GPU pool: one buffer per layer,
// [2 (K, V), num_blocks, block_size, num_kv_heads, head_dim] bytes, and the KVLayout that
// describes it. Tests of the transfer plan and engine fill it with a pattern and compare tokens.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "rtpllm/kvstore/kv_layout.h"

namespace rtpllm::testing {

struct KVShape {
  int32_t num_layers = 3;
  int32_t num_kv_heads = 2;
  int32_t head_dim = 5;  // odd on purpose: tokens of 2 * 5 * 2 = 20 bytes
  int32_t element_bytes = 2;
};

class HostKVPool {
 public:
  HostKVPool(const KVShape& shape, int32_t num_blocks, int32_t block_size) : shape_(shape) {
    layout_.memory = MemoryKind::HOST;
    layout_.num_blocks = num_blocks;
    layout_.block_size = block_size;
    layout_.num_kv_heads = shape.num_kv_heads;
    layout_.head_dim = shape.head_dim;
    layout_.element_bytes = shape.element_bytes;
    layout_.block_stride_bytes = layout_.block_bytes();
    const size_t plane = static_cast<size_t>(num_blocks) * layout_.block_bytes();
    buffers_.resize(shape.num_layers);
    for (auto& buffer : buffers_) {
      buffer.assign(2 * plane, 0);
      const uint64_t base = reinterpret_cast<uint64_t>(buffer.data());
      layout_.layers.push_back({base, base + plane});
    }
  }

  const KVLayout& layout() const { return layout_; }
  int64_t token_bytes() const { return static_cast<int64_t>(shape_.num_kv_heads) * shape_.head_dim * shape_.element_bytes; }

  // Bytes of token `token` of the sequence stored in `blocks` (K: plane 0, V: plane 1).
  uint8_t* token(int32_t layer, int plane, const std::vector<BlockId>& blocks, int64_t token) {
    const KVLayerAddress& a = layout_.layers[layer];
    const uint64_t base = plane == 0 ? a.k_base : a.v_base;
    const BlockId block = blocks[token / layout_.block_size];
    return reinterpret_cast<uint8_t*>(base + block * layout_.block_stride_bytes +
                                      (token % layout_.block_size) * token_bytes());
  }

  // Writes a pattern that differs for every (layer, plane, token, byte) of the sequence.
  void fill_sequence(const std::vector<BlockId>& blocks, int64_t num_tokens, uint32_t seed) {
    for (int32_t l = 0; l < shape_.num_layers; ++l) {
      for (int plane = 0; plane < 2; ++plane) {
        for (int64_t t = 0; t < num_tokens; ++t) {
          uint8_t* bytes = token(l, plane, blocks, t);
          for (int64_t i = 0; i < token_bytes(); ++i) bytes[i] = pattern(seed, l, plane, t, i);
        }
      }
    }
  }

  // Number of tokens of (layer, plane) whose bytes differ from fill_sequence(seed)'s pattern.
  int64_t mismatches(const std::vector<BlockId>& blocks, int64_t num_tokens, uint32_t seed, int32_t layer, int plane) {
    int64_t bad = 0;
    for (int64_t t = 0; t < num_tokens; ++t) {
      const uint8_t* bytes = token(layer, plane, blocks, t);
      for (int64_t i = 0; i < token_bytes(); ++i) {
        if (bytes[i] != pattern(seed, layer, plane, t, i)) {
          ++bad;
          break;
        }
      }
    }
    return bad;
  }

  int64_t mismatches_all_layers(const std::vector<BlockId>& blocks, int64_t num_tokens, uint32_t seed) {
    int64_t bad = 0;
    for (int32_t l = 0; l < shape_.num_layers; ++l) {
      for (int plane = 0; plane < 2; ++plane) bad += mismatches(blocks, num_tokens, seed, l, plane);
    }
    return bad;
  }

  // Sum of all bytes of the pool: detects writes outside the named blocks.
  uint64_t checksum_except(const std::vector<BlockId>& skip) const {
    uint64_t sum = 0;
    const int64_t block = layout_.block_bytes();
    for (size_t l = 0; l < buffers_.size(); ++l) {
      for (int plane = 0; plane < 2; ++plane) {
        for (BlockId b = 0; b < layout_.num_blocks; ++b) {
          bool skipped = false;
          for (BlockId s : skip) skipped |= (s == b);
          if (skipped) continue;
          const uint8_t* p = buffers_[l].data() + (plane * layout_.num_blocks + b) * block;
          for (int64_t i = 0; i < block; ++i) sum = sum * 131 + p[i];
        }
      }
    }
    return sum;
  }

  static uint8_t pattern(uint32_t seed, int32_t layer, int plane, int64_t token, int64_t i) {
    uint64_t x = seed * 0x9E3779B97F4A7C15ULL + layer * 1000003ULL + plane * 7919ULL + token * 131ULL + i;
    x ^= x >> 29;
    x *= 0xBF58476D1CE4E5B9ULL;
    return static_cast<uint8_t>((x >> 32) | 1);  // never 0: zero bytes mean "not written"
  }

 private:
  KVShape shape_;
  KVLayout layout_;
  std::vector<std::vector<uint8_t>> buffers_;
};

}  // namespace rtpllm::testing

// Test helpers for the kvstore tests: a KV pool in host memory with an odd shape, block contents
// derived from a seed (so any copy can be checked byte for byte), and polling helpers.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "rtpllm/kvstore/copy_engine.h"
#include "rtpllm/kvstore/cpu_copy_engine.h"
#include "rtpllm/kvstore/kv_connector.h"
#include "rtpllm/kvstore/kv_layout.h"

namespace rtpllm::testing {

// One layer's K and V planes per layer, `block_stride` >= block bytes apart (padding between blocks
// catches a copy that uses the wrong stride).
class FakeKVPool {
 public:
  FakeKVPool(int32_t num_layers, int32_t num_blocks, int32_t block_size, int32_t num_kv_heads, int32_t head_dim,
             int32_t element_bytes, int64_t padding = 24) {
    layout_.memory = MemoryKind::HOST;
    layout_.num_blocks = num_blocks;
    layout_.block_size = block_size;
    layout_.num_kv_heads = num_kv_heads;
    layout_.head_dim = head_dim;
    layout_.element_bytes = element_bytes;
    layout_.block_stride_bytes = static_cast<int64_t>(block_size) * num_kv_heads * head_dim * element_bytes + padding;
    planes_.resize(static_cast<size_t>(2 * num_layers));
    for (auto& plane : planes_) plane.assign(static_cast<size_t>(layout_.block_stride_bytes * num_blocks), 0xEE);
    for (int32_t l = 0; l < num_layers; ++l) {
      layout_.layers.push_back(KVLayerAddress{reinterpret_cast<uint64_t>(planes_[2 * l].data()),
                                              reinterpret_cast<uint64_t>(planes_[2 * l + 1].data())});
    }
  }

  const KVLayout& layout() const { return layout_; }
  std::shared_ptr<CpuKVCopyEngine> make_engine() const { return std::make_shared<CpuKVCopyEngine>(layout_); }

  uint8_t* segment(BlockId block, int32_t layer, int32_t kv) {
    return reinterpret_cast<uint8_t*>(pool_segment_address(layout_, block, layer, kv));
  }

  // Writes the contents that `seed` names into every layer's K and V of `block`.
  void fill(BlockId block, uint64_t seed) {
    for (int32_t l = 0; l < layout_.num_layers(); ++l) {
      for (int32_t kv = 0; kv < 2; ++kv) {
        uint8_t* p = segment(block, l, kv);
        for (int64_t i = 0; i < layout_.block_bytes(); ++i) p[i] = byte_of(seed, host_segment_offset(layout_, l, kv) + i);
      }
    }
  }
  void clear(BlockId block) {
    for (int32_t l = 0; l < layout_.num_layers(); ++l) {
      for (int32_t kv = 0; kv < 2; ++kv) std::fill_n(segment(block, l, kv), layout_.block_bytes(), uint8_t{0});
    }
  }
  // Whether `block` holds what `seed` names.
  bool holds(BlockId block, uint64_t seed) {
    for (int32_t l = 0; l < layout_.num_layers(); ++l) {
      for (int32_t kv = 0; kv < 2; ++kv) {
        const uint8_t* p = segment(block, l, kv);
        for (int64_t i = 0; i < layout_.block_bytes(); ++i) {
          if (p[i] != byte_of(seed, host_segment_offset(layout_, l, kv) + i)) return false;
        }
      }
    }
    return true;
  }
  // Padding between blocks is never written.
  bool padding_intact() const {
    const int64_t bytes = layout_.block_bytes();
    for (const auto& plane : planes_) {
      for (int32_t b = 0; b < layout_.num_blocks; ++b) {
        for (int64_t i = bytes; i < layout_.block_stride_bytes; ++i) {
          if (plane[static_cast<size_t>(b * layout_.block_stride_bytes + i)] != 0xEE) return false;
        }
      }
    }
    return true;
  }

  static uint8_t byte_of(uint64_t seed, int64_t offset) {
    uint64_t x = seed * 0x9E3779B97F4A7C15ULL + static_cast<uint64_t>(offset) * 0xBF58476D1CE4E5B9ULL;
    x ^= x >> 31;
    x *= 0x94D049BB133111EBULL;
    return static_cast<uint8_t>(x >> 56);
  }

 private:
  KVLayout layout_;
  std::vector<std::vector<uint8_t>> planes_;
};

// Polls until the handle finishes (the scheduler's loop, compressed); fails the test after 10 s.
inline TransferState poll_until_done(KVConnector& connector, TransferHandle handle) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (true) {
    const TransferState state = connector.poll(handle);
    if (state != TransferState::PENDING) return state;
    if (std::chrono::steady_clock::now() > deadline) {
      ADD_FAILURE() << "transfer " << handle << " still pending after 10 s";
      return state;
    }
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
}

// A fresh directory under the temp dir, removed at the end of the test.
class TempDir {
 public:
  TempDir() {
    std::string pattern = (std::filesystem::temp_directory_path() / "rtpllm_kvstore_XXXXXX").string();
    path_ = mkdtemp(pattern.data());
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// Collects the warnings a tier logs.
struct WarningLog {
  std::mutex mutex;
  std::vector<std::string> lines;
  std::function<void(const std::string&)> logger() {
    return [this](const std::string& line) {
      std::lock_guard<std::mutex> lock(mutex);
      lines.push_back(line);
    };
  }
  size_t count() {
    std::lock_guard<std::mutex> lock(mutex);
    return lines.size();
  }
};

}  // namespace rtpllm::testing

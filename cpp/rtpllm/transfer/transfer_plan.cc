#include "rtpllm/transfer/transfer_plan.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <tuple>
#include <unordered_set>

namespace rtpllm {
namespace {

void require_positive(int64_t value, const char* field) {
  if (value <= 0) throw std::invalid_argument(std::string(field) + ": must be positive, got " + std::to_string(value));
}

void require_equal(int64_t src, int64_t dst, const char* field) {
  if (src != dst) {
    throw std::invalid_argument(std::string(field) + ": the layouts differ (" + std::to_string(src) + " vs " +
                                std::to_string(dst) + "); they cannot exchange tokens");
  }
}

// Each list must cover num_tokens exactly, with ids of its own pool.
void check_blocks(const KVLayout& layout, const std::vector<BlockId>& blocks, int64_t num_tokens, const char* field,
                  bool unique) {
  const int64_t needed = (num_tokens + layout.block_size - 1) / layout.block_size;
  if (static_cast<int64_t>(blocks.size()) != needed) {
    throw std::invalid_argument(std::string(field) + ": " + std::to_string(num_tokens) + " tokens in blocks of " +
                                std::to_string(layout.block_size) + " need " + std::to_string(needed) +
                                " blocks, got " + std::to_string(blocks.size()));
  }
  std::unordered_set<BlockId> seen;
  for (BlockId id : blocks) {
    if (id < 0 || id >= layout.num_blocks) {
      throw std::invalid_argument(std::string(field) + ": block id " + std::to_string(id) + " is outside [0, " +
                                  std::to_string(layout.num_blocks) + ")");
    }
    // Two segments writing one block would race (and one of them is a caller bug).
    if (unique && !seen.insert(id).second) {
      throw std::invalid_argument(std::string(field) + ": block id " + std::to_string(id) + " appears twice");
    }
  }
}

uint64_t plane_base(const KVLayout& layout, int32_t layer, int plane) {
  return plane == 0 ? layout.layers[layer].k_base : layout.layers[layer].v_base;
}

}  // namespace

int64_t token_bytes(const KVLayout& layout) {
  return static_cast<int64_t>(layout.num_kv_heads) * layout.head_dim * layout.element_bytes;
}

void check_layout(const KVLayout& layout) {
  if (layout.memory != MemoryKind::HOST && layout.memory != MemoryKind::CUDA) {
    throw std::invalid_argument("memory: unknown memory kind " + std::to_string(static_cast<int>(layout.memory)));
  }
  if (layout.device_index < 0) throw std::invalid_argument("device_index: must be >= 0");
  require_positive(layout.num_blocks, "num_blocks");
  require_positive(layout.block_size, "block_size");
  require_positive(layout.num_kv_heads, "num_kv_heads");
  require_positive(layout.head_dim, "head_dim");
  require_positive(layout.element_bytes, "element_bytes");
  if (layout.layers.empty()) throw std::invalid_argument("layers: a layout needs at least one layer");
  if (layout.block_stride_bytes < layout.block_bytes()) {
    throw std::invalid_argument("block_stride_bytes: " + std::to_string(layout.block_stride_bytes) +
                                " is shorter than a block (" + std::to_string(layout.block_bytes()) + " bytes)");
  }
  for (size_t l = 0; l < layout.layers.size(); ++l) {
    if (layout.layers[l].k_base == 0 || layout.layers[l].v_base == 0) {
      throw std::invalid_argument("layers: layer " + std::to_string(l) + " has a null K or V base address");
    }
  }
}

void check_compatible(const KVLayout& src, const KVLayout& dst) {
  require_equal(src.num_layers(), dst.num_layers(), "num_layers");
  require_equal(src.head_dim, dst.head_dim, "head_dim");
  require_equal(src.element_bytes, dst.element_bytes, "element_bytes");
}

void check_head_slice(const KVLayout& src, const KVLayout& dst, const HeadSlice& heads) {
  if (heads.count == -1) {
    if (src.num_kv_heads != dst.num_kv_heads) {
      throw std::invalid_argument("num_heads: the layouts hold " + std::to_string(src.num_kv_heads) + " and " +
                                  std::to_string(dst.num_kv_heads) +
                                  " KV heads per token; a transfer between them names the heads it moves");
    }
    return;
  }
  if (heads.count <= 0) {
    throw std::invalid_argument("num_heads: must be positive (or -1 for every head), got " +
                                std::to_string(heads.count));
  }
  for (const auto& [offset, layout, field] : {std::tuple{heads.src_offset, &src, "src_head_offset"},
                                              std::tuple{heads.dst_offset, &dst, "dst_head_offset"}}) {
    if (offset < 0 || offset + heads.count > layout->num_kv_heads) {
      throw std::invalid_argument(std::string(field) + ": heads [" + std::to_string(offset) + ", " +
                                  std::to_string(offset + heads.count) + ") are outside the layout's " +
                                  std::to_string(layout->num_kv_heads) + " KV heads");
    }
  }
}

std::vector<TransferSegment> plan_transfer(const KVLayout& src, const std::vector<BlockId>& src_blocks,
                                           const KVLayout& dst, const std::vector<BlockId>& dst_blocks,
                                           int64_t num_tokens) {
  check_compatible(src, dst);
  if (num_tokens <= 0) throw std::invalid_argument("num_tokens: must be positive, got " + std::to_string(num_tokens));
  check_blocks(src, src_blocks, num_tokens, "src_blocks", /*unique=*/false);
  check_blocks(dst, dst_blocks, num_tokens, "dst_blocks", /*unique=*/true);

  // A segment ends at whichever block boundary (source or destination) comes first.
  std::vector<TransferSegment> segments;
  int64_t token = 0;
  while (token < num_tokens) {
    const int32_t src_offset = static_cast<int32_t>(token % src.block_size);
    const int32_t dst_offset = static_cast<int32_t>(token % dst.block_size);
    const int64_t length = std::min<int64_t>(
        {src.block_size - src_offset, dst.block_size - dst_offset, num_tokens - token});
    segments.push_back({src_blocks[token / src.block_size], src_offset, dst_blocks[token / dst.block_size], dst_offset,
                        static_cast<int32_t>(length)});
    token += length;
  }
  return segments;
}

std::vector<CopyOp> plan_copies(const KVLayout& src, const KVLayout& dst, const std::vector<TransferSegment>& segments,
                                int32_t layer, const HeadSlice& heads) {
  check_compatible(src, dst);
  check_head_slice(src, dst, heads);
  if (layer < -1 || layer >= src.num_layers()) {
    throw std::invalid_argument("layer: " + std::to_string(layer) + " is outside [0, " +
                                std::to_string(src.num_layers()) + ") (or -1 for every layer)");
  }
  const uint64_t head_bytes = static_cast<uint64_t>(src.head_dim) * src.element_bytes;
  const int32_t count = heads.count < 0 ? src.num_kv_heads : heads.count;
  // A slice that is every head of both layouts is whole tokens: one copy per segment (and merged).
  // Otherwise each token's slice is its own copy.
  const bool whole_tokens = count == src.num_kv_heads && count == dst.num_kv_heads;
  const uint64_t src_token_bytes = static_cast<uint64_t>(token_bytes(src));
  const uint64_t dst_token_bytes = static_cast<uint64_t>(token_bytes(dst));
  const uint64_t slice_bytes = count * head_bytes;
  const uint64_t src_skip = static_cast<uint64_t>(heads.src_offset) * head_bytes;
  const uint64_t dst_skip = static_cast<uint64_t>(heads.dst_offset) * head_bytes;
  const int32_t first = layer < 0 ? 0 : layer;
  const int32_t last = layer < 0 ? src.num_layers() : layer + 1;
  std::vector<CopyOp> copies;
  for (int32_t l = first; l < last; ++l) {
    for (int plane = 0; plane < 2; ++plane) {
      // Copies merge only within a plane: two planes may touch in memory but belong to different
      // allocations, and one copy across an allocation boundary fails (CUDA IPC: invalid argument).
      const size_t plane_first = copies.size();
      const uint64_t src_base = plane_base(src, l, plane);
      const uint64_t dst_base = plane_base(dst, l, plane);
      auto add = [&](uint64_t from, uint64_t to, uint64_t bytes) {
        if (copies.size() > plane_first && copies.back().src + copies.back().bytes == from &&
            copies.back().dst + copies.back().bytes == to) {
          copies.back().bytes += bytes;
        } else {
          copies.push_back({from, to, bytes});
        }
      };
      for (const TransferSegment& seg : segments) {
        const uint64_t from = src_base + static_cast<uint64_t>(seg.src_block) * src.block_stride_bytes +
                              static_cast<uint64_t>(seg.src_token) * src_token_bytes;
        const uint64_t to = dst_base + static_cast<uint64_t>(seg.dst_block) * dst.block_stride_bytes +
                            static_cast<uint64_t>(seg.dst_token) * dst_token_bytes;
        if (whole_tokens) {
          add(from, to, static_cast<uint64_t>(seg.num_tokens) * src_token_bytes);
          continue;
        }
        for (int32_t t = 0; t < seg.num_tokens; ++t) {
          add(from + t * src_token_bytes + src_skip, to + t * dst_token_bytes + dst_skip, slice_bytes);
        }
      }
    }
  }
  return copies;
}

std::vector<MemoryRegion> layout_regions(const KVLayout& layout) {
  const uint64_t plane_bytes =
      static_cast<uint64_t>(layout.num_blocks - 1) * layout.block_stride_bytes + layout.block_bytes();
  std::vector<MemoryRegion> spans;
  for (const KVLayerAddress& address : layout.layers) {
    spans.push_back({address.k_base, plane_bytes});
    spans.push_back({address.v_base, plane_bytes});
  }
  std::sort(spans.begin(), spans.end(), [](const MemoryRegion& a, const MemoryRegion& b) { return a.base < b.base; });
  std::vector<MemoryRegion> merged;
  for (const MemoryRegion& span : spans) {
    // Only overlapping spans merge (a block-major buffer's planes interleave). Spans that merely
    // touch stay apart: separate allocations can be adjacent, and one registration across two of
    // them gives the peer a CUDA IPC handle that covers only the first.
    if (!merged.empty() && span.base < merged.back().base + merged.back().length) {
      merged.back().length = std::max(merged.back().length, span.base + span.length - merged.back().base);
    } else {
      merged.push_back(span);
    }
  }
  return merged;
}

KVLayout make_block_major_layout(uint64_t base, MemoryKind memory, int32_t num_blocks, int32_t num_layers,
                                 int32_t block_size, int32_t num_kv_heads, int32_t head_dim, int32_t element_bytes) {
  require_positive(num_layers, "num_layers");
  KVLayout layout;
  layout.memory = memory;
  layout.num_blocks = num_blocks;
  layout.block_size = block_size;
  layout.num_kv_heads = num_kv_heads;
  layout.head_dim = head_dim;
  layout.element_bytes = element_bytes;
  const int64_t plane = layout.block_bytes();
  layout.block_stride_bytes = 2 * num_layers * plane;
  for (int32_t l = 0; l < num_layers; ++l) {
    layout.layers.push_back({base + static_cast<uint64_t>(2 * l * plane), base + static_cast<uint64_t>((2 * l + 1) * plane)});
  }
  check_layout(layout);
  return layout;
}

}  // namespace rtpllm

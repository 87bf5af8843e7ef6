// Pure functions that turn a transfer of token ranges between two KV layouts into byte copies.
//
// Inside one plane (K or V) of one layer a block holds block_size tokens, each token
// num_kv_heads * head_dim * element_bytes contiguous bytes ([block_size, num_kv_heads, head_dim]).
// So two layouts with the same per-token shape but different block sizes (prefill 64, decode 16)
// map onto each other token range by token range:
//   plan_transfer  (src blocks, dst blocks, num_tokens) -> segments, each inside one src block and
//                  one dst block;
//   plan_copies    segments x layers x {K, V} -> (src address, dst address, bytes) copies, adjacent
//                  copies merged within a plane (consecutive blocks of a plane become one copy;
//                  never across planes, which may be separate allocations that touch).
// Tensor parallelism with different sizes on the two sides moves a slice of the KV heads (a rank
// holds a contiguous range of them): a token's slice is contiguous, but consecutive tokens' slices
// are not, so a sliced plan is one copy per token and plane.
// Nothing here touches memory or the network.
#pragma once

#include <cstdint>
#include <vector>

#include "rtpllm/core/types.h"
#include "rtpllm/kvstore/kv_layout.h"

namespace rtpllm {

// A run of tokens inside one source block and one destination block.
struct TransferSegment {
  BlockId src_block = 0;
  int32_t src_token = 0;  // first token inside src_block
  BlockId dst_block = 0;
  int32_t dst_token = 0;
  int32_t num_tokens = 0;
};

// Which KV heads move: heads [src_offset, src_offset + count) of every source token go to heads
// [dst_offset, dst_offset + count) of the same destination token. count -1 (the default) moves
// every head; the two layouts must then have as many.
struct HeadSlice {
  int32_t src_offset = 0;
  int32_t dst_offset = 0;
  int32_t count = -1;
};

struct CopyOp {
  uint64_t src = 0;
  uint64_t dst = 0;
  uint64_t bytes = 0;
};

// A span of registered memory.
struct MemoryRegion {
  uint64_t base = 0;
  uint64_t length = 0;
};

// Bytes of one token in one plane of one layer.
int64_t token_bytes(const KVLayout& layout);

// Throws std::invalid_argument naming the bad field: non-positive sizes, no layers, null bases,
// a stride shorter than a block, an invalid memory kind.
void check_layout(const KVLayout& layout);

// Throws std::invalid_argument naming the first field in which the two layouts cannot exchange
// tokens (layers, head dim, element size); block size, count, stride and the number of KV heads
// may differ (a transfer between different head counts names a HeadSlice).
void check_compatible(const KVLayout& src, const KVLayout& dst);

// Throws std::invalid_argument naming the bad field ("num_heads", "local_head_offset", ...: the
// names of TransferRequest) when heads is not a slice of both layouts: an offset or count out of
// range, or every head (count -1) between layouts with different head counts.
void check_head_slice(const KVLayout& src, const KVLayout& dst, const HeadSlice& heads);

// Maps tokens [0, num_tokens) stored in src_blocks onto the same tokens stored in dst_blocks.
// Each list must hold exactly ceil(num_tokens / block_size) blocks of its layout, every id in
// [0, num_blocks); std::invalid_argument (naming "src_blocks", "dst_blocks" or "num_tokens")
// otherwise (dst_blocks must also be distinct: two segments must not write one block).
std::vector<TransferSegment> plan_transfer(const KVLayout& src, const std::vector<BlockId>& src_blocks,
                                           const KVLayout& dst, const std::vector<BlockId>& dst_blocks,
                                           int64_t num_tokens);

// The byte copies for segments, for one layer (0 <= layer < num_layers) or every layer (-1), K and
// V planes both, of the heads in `heads` (check_head_slice). A copy continues the previous one when
// its source and destination both start where the previous ended.
std::vector<CopyOp> plan_copies(const KVLayout& src, const KVLayout& dst, const std::vector<TransferSegment>& segments,
                                int32_t layer, const HeadSlice& heads = {});

// The memory a layout spans, for registration: every layer's K and V plane
// [base, base + (num_blocks - 1) * stride + block_bytes), sorted, overlapping spans merged (a
// block-major host region is one). Spans that only touch stay apart: two allocations can be
// adjacent, and a region across both would give the peer an IPC handle for the first only.
std::vector<MemoryRegion> layout_regions(const KVLayout& layout);

// A layout over one contiguous host (or device) buffer that holds whole blocks one after another,
// each block [num_layers][K, V][block_size, num_kv_heads, head_dim]: the shape of a KV store's
// buffer, where a block (all its layers) is the unit stored and moved.
KVLayout make_block_major_layout(uint64_t base, MemoryKind memory, int32_t num_blocks, int32_t num_layers,
                                 int32_t block_size, int32_t num_kv_heads, int32_t head_dim, int32_t element_bytes);

}  // namespace rtpllm

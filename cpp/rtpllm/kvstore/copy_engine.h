// Batched, asynchronous block copies between the KV pool and host block buffers.
//
// The pool side is a registered KVLayout (K and V planes of every layer, addressed by block id).
// The host side is one contiguous buffer of layout.bytes_per_block() per block, layer-major, K
// then V (see host_segment_offset): the unit every tier stores, so a block copied out of one pool
// can be copied into another pool of the same shape.
//
// submit() returns at once; the copy runs on the engine's own worker (a thread on the CPU build, a
// stream of its own on CUDA). Copies of one submit() run in order with each other but complete
// together; the caller must keep the named pool blocks and host buffers untouched until the ticket
// has finished. Every method is thread-safe: the scheduler thread and the tiers' I/O threads share
// one engine.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "rtpllm/kvstore/host_allocator.h"
#include "rtpllm/kvstore/kv_connector.h"
#include "rtpllm/kvstore/kv_layout.h"

namespace rtpllm {

enum class CopyDirection : uint8_t {
  POOL_TO_HOST,  // save: KV pool -> host buffers
  HOST_TO_POOL,  // load: host buffers -> KV pool
};

struct BlockCopy {
  BlockId pool_block = 0;
  uint8_t* host = nullptr;  // bytes_per_block() bytes, from the engine's host_allocator()
};

using CopyTicket = uint64_t;  // 0 is never a valid ticket

class KVCopyEngine {
 public:
  virtual ~KVCopyEngine() = default;

  virtual std::string name() const = 0;
  virtual const KVLayout& layout() const = 0;
  // The allocator whose buffers this engine can copy to and from (pinned memory for CUDA).
  virtual std::shared_ptr<HostAllocator> host_allocator() const = 0;

  // Starts the copies. Throws std::invalid_argument on a block id outside the pool or a null host
  // pointer (nothing is copied then). An empty list gives a ticket that is already DONE.
  virtual CopyTicket submit(CopyDirection direction, const std::vector<BlockCopy>& copies) = 0;

  // PENDING, or the final state (DONE, or FAILED if the device reported an error). A ticket is
  // forgotten once its final state has been returned (by query or wait); asking again, or about
  // an unknown ticket, throws std::invalid_argument.
  virtual TransferState query(CopyTicket ticket) = 0;

  // Blocks the calling thread until the ticket finishes; returns (and forgets) its final state.
  // For background threads, tests and benchmarks, never for the scheduler thread.
  virtual TransferState wait(CopyTicket ticket) = 0;
};

// Offset of one layer's K (kv = 0) or V (kv = 1) bytes inside a host block buffer.
inline int64_t host_segment_offset(const KVLayout& layout, int32_t layer, int32_t kv) {
  return (2 * static_cast<int64_t>(layer) + kv) * layout.block_bytes();
}

// Pool address of one layer's K (kv = 0) or V (kv = 1) bytes of a block.
inline uint64_t pool_segment_address(const KVLayout& layout, BlockId block, int32_t layer, int32_t kv) {
  const KVLayerAddress& address = layout.layers[static_cast<size_t>(layer)];
  return (kv == 0 ? address.k_base : address.v_base) + static_cast<uint64_t>(block) * layout.block_stride_bytes;
}

// Throws std::invalid_argument naming the first bad entry (block id outside [0, num_blocks), null
// host pointer).
void check_block_copies(const KVLayout& layout, const std::vector<BlockCopy>& copies);
// Throws std::invalid_argument naming the first block id outside [0, num_blocks).
void check_pool_blocks(const KVLayout& layout, const std::vector<BlockId>& blocks);

}  // namespace rtpllm

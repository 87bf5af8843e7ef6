// Where read chunks go: the sink copies each piece of a chunk from the staging buffer to its
// destination. Reader threads call it concurrently, each on its own slots.
//
// Contract: `submit(slot, ...)` may return before the copies finish; the loader leaves that
// staging buffer untouched until `wait(slot)` returns, and calls `finish()` once at the end,
// after which every byte must be at its destination.
#pragma once

#include <cstddef>
#include <cstdint>

#include "rtpllm/loader/read_planner.h"

namespace rtpllm::loader {

class ChunkSink {
 public:
  virtual ~ChunkSink() = default;
  // Called once before any submit: slots are numbered 0 .. num_slots - 1 (one per staging buffer).
  virtual void prepare(size_t num_slots) = 0;
  // Starts copying every piece of `chunk` out of `host` (which holds the file bytes from chunk.offset).
  // Throws std::runtime_error if the copy cannot be started.
  virtual void submit(size_t slot, const ReadChunk& chunk, const uint8_t* host) = 0;
  // Blocks until the copies last submitted on `slot` no longer read its staging buffer.
  virtual void wait(size_t slot) = 0;
  // Blocks until every submitted copy has landed. Throws std::runtime_error if one failed.
  virtual void finish() = 0;
};

}  // namespace rtpllm::loader

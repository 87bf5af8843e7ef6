// Turns spans (file bytes -> destination) into the chunks the reader threads read: per file, in
// file order, each chunk one large aligned read inside one cell of a `chunk_bytes` grid, with the
// pieces to copy out of it. Spans of a cell separated by less than `max_gap` share a read
// (reading through a small hole is cheaper than another request); a span that crosses cells is
// split. Overlapping spans (two destinations for the same bytes) are fine.
#pragma once

#include <cstdint>
#include <vector>

#include "rtpllm/loader/tensor_request.h"

namespace rtpllm::loader {

struct ReadPlanOptions {
  uint64_t chunk_bytes = 16ull << 20;  // one read; a multiple of `alignment`
  uint64_t alignment = 4096;           // O_DIRECT needs offsets, lengths and buffers aligned to this
  uint64_t max_gap = 1ull << 20;       // unread bytes a chunk may read through between two spans
};

// A piece of a chunk: bytes [chunk_offset, chunk_offset + bytes) of the chunk's buffer go to `dst`.
struct CopyPiece {
  uint64_t chunk_offset = 0;
  uint64_t bytes = 0;
  uintptr_t dst = 0;
  uint32_t request = 0;
};

struct ReadChunk {
  uint32_t file = 0;
  uint64_t offset = 0;   // aligned file offset of the read
  uint64_t bytes = 0;    // aligned length of the read (it may run past the end of the file)
  uint64_t needed = 0;   // bytes from `offset` that must be read: the end of the last piece
  std::vector<CopyPiece> pieces;
};

// Chunks sorted by (file, offset). Throws std::invalid_argument for inconsistent options.
std::vector<ReadChunk> plan_reads(std::vector<ReadSpan> spans, const ReadPlanOptions& options);

}  // namespace rtpllm::loader

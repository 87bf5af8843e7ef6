#include "rtpllm/loader/read_planner.h"

#include <algorithm>
#include <stdexcept>

namespace rtpllm::loader {

std::vector<ReadChunk> plan_reads(std::vector<ReadSpan> spans, const ReadPlanOptions& options) {
  const uint64_t align = options.alignment;
  if (align == 0 || (align & (align - 1)) != 0)
    throw std::invalid_argument("alignment must be a power of two, got " + std::to_string(align));
  if (options.chunk_bytes == 0 || options.chunk_bytes % align != 0)
    throw std::invalid_argument("chunk_bytes must be a positive multiple of the alignment, got " +
                                std::to_string(options.chunk_bytes));
  // Cut every span at the chunk grid of its file ([k * chunk_bytes, (k + 1) * chunk_bytes)), so a
  // chunk never outgrows its buffer however the spans overlap or interleave.
  std::vector<ReadSpan> pieces;
  pieces.reserve(spans.size());
  for (ReadSpan span : spans) {
    while (span.bytes > 0) {
      const uint64_t cell_end = (span.offset / options.chunk_bytes + 1) * options.chunk_bytes;
      ReadSpan piece = span;
      piece.bytes = std::min(span.bytes, cell_end - span.offset);
      pieces.push_back(piece);
      span.offset += piece.bytes;
      span.dst += piece.bytes;
      span.bytes -= piece.bytes;
    }
  }
  std::stable_sort(pieces.begin(), pieces.end(), [](const ReadSpan& a, const ReadSpan& b) {
    return a.file != b.file ? a.file < b.file : a.offset < b.offset;
  });
  std::vector<ReadChunk> chunks;
  uint64_t end = 0;  // furthest byte the open chunk needs
  for (const ReadSpan& piece : pieces) {
    const uint64_t cell = piece.offset / options.chunk_bytes;
    const bool fits = !chunks.empty() && chunks.back().file == piece.file &&
                      chunks.back().offset / options.chunk_bytes == cell &&
                      (piece.offset <= end || piece.offset - end <= options.max_gap);
    if (!fits) {
      if (!chunks.empty()) chunks.back().needed = end - chunks.back().offset;
      ReadChunk chunk;
      chunk.file = piece.file;
      chunk.offset = piece.offset & ~(align - 1);
      chunks.push_back(std::move(chunk));
      end = chunks.back().offset;
    }
    ReadChunk& chunk = chunks.back();
    chunk.pieces.push_back({piece.offset - chunk.offset, piece.bytes, piece.dst, piece.request});
    end = std::max(end, piece.offset + piece.bytes);
  }
  if (!chunks.empty()) chunks.back().needed = end - chunks.back().offset;
  for (ReadChunk& chunk : chunks) chunk.bytes = (chunk.needed + align - 1) & ~(align - 1);
  return chunks;
}

}  // namespace rtpllm::loader

#include <cstring>

#include "rtpllm/loader/memcpy_sink.h"

namespace rtpllm::loader {

void MemcpySink::submit(size_t, const ReadChunk& chunk, const uint8_t* host) {
  for (const CopyPiece& piece : chunk.pieces)
    std::memcpy(reinterpret_cast<void*>(piece.dst), host + piece.chunk_offset, piece.bytes);
}

}  // namespace rtpllm::loader

// The sink for host destinations (the CPU build, and tests).
#pragma once

#include "rtpllm/loader/chunk_sink.h"

namespace rtpllm::loader {

// Host destinations: memcpy in the calling reader thread (so copies run in parallel too).
class MemcpySink final : public ChunkSink {
 public:
  void prepare(size_t) override {}
  void submit(size_t slot, const ReadChunk& chunk, const uint8_t* host) override;
  void wait(size_t) override {}
  void finish() override {}
};

}  // namespace rtpllm::loader

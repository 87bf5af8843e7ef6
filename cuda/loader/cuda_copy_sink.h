// The loader's sink for GPU destinations: every piece of a chunk becomes a cudaMemcpyAsync from
// the pinned staging buffer into the parameter's storage, on a stream of the sink's own, so copies
// overlap with the reader threads' next reads. One event per staging slot tells a reader when it
// may refill its buffer.
#pragma once

#include <cuda_runtime.h>

#include <vector>

#include "rtpllm/loader/chunk_sink.h"

namespace rtpllm::cuda {

class CudaCopySink final : public loader::ChunkSink {
 public:
  // Creates its stream on `device`. Throws std::runtime_error naming the CUDA error.
  explicit CudaCopySink(int device);
  ~CudaCopySink() override;
  CudaCopySink(const CudaCopySink&) = delete;
  CudaCopySink& operator=(const CudaCopySink&) = delete;

  void prepare(size_t num_slots) override;
  void submit(size_t slot, const loader::ReadChunk& chunk, const uint8_t* host) override;
  void wait(size_t slot) override;
  void finish() override;

  cudaStream_t stream() const { return stream_; }

 private:
  int device_;
  cudaStream_t stream_ = nullptr;
  std::vector<cudaEvent_t> events_;  // one per slot
  std::vector<char> recorded_;       // whether events_[slot] has been recorded since prepare
};

}  // namespace rtpllm::cuda

#include <stdexcept>
#include <string>

#include "cuda/loader/cuda_copy_sink.h"

namespace rtpllm::cuda {
namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("weight loader: ") + what + ": " + cudaGetErrorString(err));
}

}  // namespace

CudaCopySink::CudaCopySink(int device) : device_(device) {
  check(cudaSetDevice(device_), "cudaSetDevice");
  check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
}

CudaCopySink::~CudaCopySink() {
  cudaSetDevice(device_);
  if (stream_ != nullptr) cudaStreamSynchronize(stream_);
  for (cudaEvent_t event : events_) cudaEventDestroy(event);
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
}

void CudaCopySink::prepare(size_t num_slots) {
  check(cudaSetDevice(device_), "cudaSetDevice");
  while (events_.size() < num_slots) {
    cudaEvent_t event;
    check(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "cudaEventCreate");
    events_.push_back(event);
  }
  recorded_.assign(events_.size(), 0);
}

void CudaCopySink::submit(size_t slot, const loader::ReadChunk& chunk, const uint8_t* host) {
  // The current device is per thread: reader threads start on device 0.
  check(cudaSetDevice(device_), "cudaSetDevice");
  for (const loader::CopyPiece& piece : chunk.pieces)
    check(cudaMemcpyAsync(reinterpret_cast<void*>(piece.dst), host + piece.chunk_offset, piece.bytes,
                          cudaMemcpyHostToDevice, stream_),
          "cudaMemcpyAsync to the GPU");
  check(cudaEventRecord(events_.at(slot), stream_), "cudaEventRecord");
  recorded_[slot] = 1;
}

void CudaCopySink::wait(size_t slot) {
  if (!recorded_.at(slot)) return;
  check(cudaEventSynchronize(events_[slot]), "copy to the GPU");
}

void CudaCopySink::finish() { check(cudaStreamSynchronize(stream_), "copy to the GPU"); }

}  // namespace rtpllm::cuda

// The copy engine of the CUDA build: a KV pool in device memory, host buffers in pinned memory
// (CudaHostAllocator).
//
// Copies run on a stream of the engine's own (non-blocking, lowest priority, so the model's
// kernels win when both are ready), and every submit() first makes that stream wait for an event
// recorded on the compute stream given at construction: a save then copies a block only after the
// forward pass that wrote it, and a load writes a block only after every kernel already submitted
// that may still read its previous contents. Completion is a cudaEvent per ticket.
//
// NOTE: submit() records an event on the compute stream, so it must not run while that stream is
// being captured into a CUDA graph (the engine captures its graphs at start-up, before serving).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "rtpllm/kvstore/copy_engine.h"

namespace rtpllm::cuda {

enum class CudaCopyMethod : uint8_t {
  KERNEL,  // one gather/scatter kernel reading/writing mapped host memory (default)
  MEMCPY,  // one cudaMemcpyAsync per block, layer and K/V
  STAGED,  // the kernel between the pool and a device staging buffer, cudaMemcpyAsync across PCIe
  HYBRID,  // loads (latency) as KERNEL, saves (throughput, next to every step) as STAGED
};

// How many block images the STAGED method's device staging buffer holds (one round of copies).
inline constexpr int32_t kStagedCopyBlocks = 16;

class CudaKVCopyEngine final : public KVCopyEngine {
 public:
  // layout: validated, MemoryKind::CUDA. compute_stream: the stream the model runs on (0: the
  // legacy default stream). max_ctas: how many SMs the copy kernel may occupy. Throws
  // std::invalid_argument for bad arguments, std::runtime_error for CUDA errors.
  CudaKVCopyEngine(KVLayout layout, uintptr_t compute_stream, CudaCopyMethod method = CudaCopyMethod::KERNEL,
                   int32_t max_ctas = 32);
  ~CudaKVCopyEngine() override;  // waits for the copies in flight

  std::string name() const override {
    switch (method_) {
      case CudaCopyMethod::KERNEL: return "cuda_kernel";
      case CudaCopyMethod::MEMCPY: return "cuda_memcpy";
      case CudaCopyMethod::STAGED: return "cuda_staged";
      case CudaCopyMethod::HYBRID: return "cuda_hybrid";
    }
    return "cuda";
  }
  const KVLayout& layout() const override { return layout_; }
  std::shared_ptr<HostAllocator> host_allocator() const override { return allocator_; }
  CopyTicket submit(CopyDirection direction, const std::vector<BlockCopy>& copies) override;
  TransferState query(CopyTicket ticket) override;
  TransferState wait(CopyTicket ticket) override;

  uintptr_t copy_stream() const { return reinterpret_cast<uintptr_t>(copy_stream_); }

 private:
  struct Ticket {
    cudaEvent_t done = nullptr;  // nullptr: finished at submission (see failed)
    bool failed = false;
  };

  cudaEvent_t take_event();                       // mutex_ held
  TransferState finish(CopyTicket ticket, cudaError_t status);  // mutex_ held

  const KVLayout layout_;
  const CudaCopyMethod method_;
  const int32_t max_ctas_;
  const cudaStream_t compute_stream_;
  const std::shared_ptr<HostAllocator> allocator_;
  std::vector<uint64_t> layer_bases_host_;  // [num_layers][2]
  uint64_t* layer_bases_device_ = nullptr;
  uint8_t* staging_ = nullptr;  // STAGED: kStagedCopyBlocks block images in device memory
  int32_t staging_blocks_ = 0;
  cudaStream_t copy_stream_ = nullptr;

  std::mutex mutex_;  // guards everything below (and orders launches on copy_stream_)
  cudaEvent_t compute_ready_ = nullptr;
  std::vector<cudaEvent_t> spare_events_;
  std::unordered_map<CopyTicket, Ticket> tickets_;
  CopyTicket next_ticket_ = 1;
};

}  // namespace rtpllm::cuda

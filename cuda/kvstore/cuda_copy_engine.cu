#include "cuda/kvstore/cuda_copy_engine.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <utility>

#include "cuda/memory/cuda_host_allocator.h"
#include "cuda/kvstore/kv_block_copy.h"

namespace rtpllm::cuda {
namespace {

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("CudaKVCopyEngine: ") + what + ": " + cudaGetErrorString(err));
}

// Makes `device` current for the scope and restores the caller's device after: the engine runs on
// the scheduler's and the tiers' threads and must not move their current device.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    if (cudaGetDevice(&previous_) != cudaSuccess) previous_ = -1;
    check_cuda(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

// A copy kernel that touched pageable memory would fault and take the CUDA context down with it:
// refuse such pointers up front.
bool is_memory_of_type(const void* ptr, cudaMemoryType type) {
  cudaPointerAttributes attributes{};
  if (cudaPointerGetAttributes(&attributes, ptr) != cudaSuccess) {
    cudaGetLastError();  // clear the (non-sticky) error of an unknown pointer
    return false;
  }
  return attributes.type == type;
}

}  // namespace

CudaKVCopyEngine::CudaKVCopyEngine(KVLayout layout, uintptr_t compute_stream, CudaCopyMethod method, int32_t max_ctas)
    : layout_(std::move(layout)),
      method_(method),
      max_ctas_(max_ctas),
      compute_stream_(reinterpret_cast<cudaStream_t>(compute_stream)),
      allocator_(std::make_shared<CudaHostAllocator>()) {
  layout_.validate();
  if (layout_.memory != MemoryKind::CUDA) throw std::invalid_argument("CudaKVCopyEngine: KVLayout.memory must be CUDA");
  if (max_ctas_ < 1) throw std::invalid_argument("CudaKVCopyEngine: max_ctas must be at least 1");
  DeviceGuard device(layout_.device_index);
  for (const KVLayerAddress& layer : layout_.layers) {
    for (uint64_t base : {layer.k_base, layer.v_base}) {
      if (!is_memory_of_type(reinterpret_cast<const void*>(base), cudaMemoryTypeDevice)) {
        throw std::invalid_argument("CudaKVCopyEngine: KVLayout.layers has a base address that is not device memory");
      }
    }
    layer_bases_host_.push_back(layer.k_base);
    layer_bases_host_.push_back(layer.v_base);
  }
  const size_t table_bytes = layer_bases_host_.size() * sizeof(uint64_t);
  check_cuda(cudaMalloc(&layer_bases_device_, table_bytes), "cudaMalloc");
  check_cuda(cudaMemcpy(layer_bases_device_, layer_bases_host_.data(), table_bytes, cudaMemcpyHostToDevice), "cudaMemcpy");
  if (method_ == CudaCopyMethod::STAGED || method_ == CudaCopyMethod::HYBRID) {
    staging_blocks_ = std::min<int32_t>(kStagedCopyBlocks, layout_.num_blocks);
    check_cuda(cudaMalloc(&staging_, static_cast<size_t>(staging_blocks_) * static_cast<size_t>(layout_.bytes_per_block())),
               "cudaMalloc (staging)");
  }
  int least_priority = 0;
  int greatest_priority = 0;
  check_cuda(cudaDeviceGetStreamPriorityRange(&least_priority, &greatest_priority), "cudaDeviceGetStreamPriorityRange");
  check_cuda(cudaStreamCreateWithPriority(&copy_stream_, cudaStreamNonBlocking, least_priority), "cudaStreamCreate");
  check_cuda(cudaEventCreateWithFlags(&compute_ready_, cudaEventDisableTiming), "cudaEventCreate");
}

CudaKVCopyEngine::~CudaKVCopyEngine() {
  int previous = -1;
  cudaGetDevice(&previous);
  cudaSetDevice(layout_.device_index);
  if (copy_stream_ != nullptr) cudaStreamSynchronize(copy_stream_);
  for (auto& [ticket, entry] : tickets_) {
    if (entry.done != nullptr) cudaEventDestroy(entry.done);
  }
  for (cudaEvent_t event : spare_events_) cudaEventDestroy(event);
  if (compute_ready_ != nullptr) cudaEventDestroy(compute_ready_);
  if (copy_stream_ != nullptr) cudaStreamDestroy(copy_stream_);
  cudaFree(layer_bases_device_);
  cudaFree(staging_);
  if (previous >= 0) cudaSetDevice(previous);
}

cudaEvent_t CudaKVCopyEngine::take_event() {
  if (!spare_events_.empty()) {
    cudaEvent_t event = spare_events_.back();
    spare_events_.pop_back();
    return event;
  }
  cudaEvent_t event = nullptr;
  check_cuda(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "cudaEventCreate");
  return event;
}

CopyTicket CudaKVCopyEngine::submit(CopyDirection direction, const std::vector<BlockCopy>& copies) {
  check_block_copies(layout_, copies);
  std::vector<int32_t> pool_blocks;
  std::vector<uint8_t*> host_blocks;
  for (const BlockCopy& copy : copies) {
    if (method_ != CudaCopyMethod::MEMCPY && !is_memory_of_type(copy.host, cudaMemoryTypeHost)) {
      throw std::invalid_argument("CudaKVCopyEngine: host buffer of pool block " + std::to_string(copy.pool_block) +
                                  " is not pinned memory (allocate it from host_allocator())");
    }
    pool_blocks.push_back(copy.pool_block);
    host_blocks.push_back(copy.host);
  }
  KVBlockCopyArgs args;
  args.layer_bases_device = layer_bases_device_;
  args.layer_bases_host = layer_bases_host_.data();
  args.num_layers = layout_.num_layers();
  args.block_bytes = layout_.block_bytes();
  args.block_stride_bytes = layout_.block_stride_bytes;
  args.pool_blocks = pool_blocks.data();
  args.host_blocks = host_blocks.data();
  args.num_blocks = static_cast<int32_t>(copies.size());
  args.to_host = direction == CopyDirection::POOL_TO_HOST;

  std::lock_guard<std::mutex> lock(mutex_);
  DeviceGuard device(layout_.device_index);
  const CopyTicket ticket = next_ticket_++;
  Ticket entry;
  cudaError_t err = cudaEventRecord(compute_ready_, compute_stream_);
  if (err == cudaSuccess) err = cudaStreamWaitEvent(copy_stream_, compute_ready_, 0);
  if (err == cudaSuccess) {
    CudaCopyMethod method = method_;
    if (method == CudaCopyMethod::HYBRID) method = args.to_host ? CudaCopyMethod::STAGED : CudaCopyMethod::KERNEL;
    switch (method) {
      case CudaCopyMethod::HYBRID:  // resolved above
      case CudaCopyMethod::KERNEL: err = launch_kv_block_copy_kernel(args, max_ctas_, copy_stream_); break;
      case CudaCopyMethod::MEMCPY: err = launch_kv_block_memcpy(args, copy_stream_); break;
      case CudaCopyMethod::STAGED: err = launch_kv_block_staged(args, staging_, staging_blocks_, max_ctas_, copy_stream_); break;
    }
  }
  if (err == cudaSuccess) {
    entry.done = take_event();
    err = cudaEventRecord(entry.done, copy_stream_);
  }
  if (err != cudaSuccess) {
    if (entry.done != nullptr) spare_events_.push_back(entry.done);
    entry.done = nullptr;
    entry.failed = true;
  }
  tickets_.emplace(ticket, entry);
  return ticket;
}

TransferState CudaKVCopyEngine::finish(CopyTicket ticket, cudaError_t status) {
  auto it = tickets_.find(ticket);
  if (it->second.done != nullptr) spare_events_.push_back(it->second.done);
  tickets_.erase(it);
  return status == cudaSuccess ? TransferState::DONE : TransferState::FAILED;
}

TransferState CudaKVCopyEngine::query(CopyTicket ticket) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = tickets_.find(ticket);
  if (it == tickets_.end()) throw std::invalid_argument("CudaKVCopyEngine: unknown copy ticket " + std::to_string(ticket));
  if (it->second.done == nullptr) return finish(ticket, it->second.failed ? cudaErrorUnknown : cudaSuccess);
  const cudaError_t status = cudaEventQuery(it->second.done);
  if (status == cudaErrorNotReady) return TransferState::PENDING;
  return finish(ticket, status);
}

TransferState CudaKVCopyEngine::wait(CopyTicket ticket) {
  cudaEvent_t done = nullptr;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = tickets_.find(ticket);
    if (it == tickets_.end()) throw std::invalid_argument("CudaKVCopyEngine: unknown copy ticket " + std::to_string(ticket));
    if (it->second.done == nullptr) return finish(ticket, it->second.failed ? cudaErrorUnknown : cudaSuccess);
    done = it->second.done;
  }
  const cudaError_t status = cudaEventSynchronize(done);  // without the lock: other threads keep submitting
  std::lock_guard<std::mutex> lock(mutex_);
  return finish(ticket, status);
}

}  // namespace rtpllm::cuda

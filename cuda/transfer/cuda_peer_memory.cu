#include "cuda/transfer/cuda_peer_memory.h"

#include <cuda.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>
#include <algorithm>
#include <cstring>
#include <deque>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "rtpllm/core/byte_codec.h"

namespace rtpllm::cuda {
namespace {

constexpr int kMaxCtas = 64;
constexpr int kThreads = 512;
constexpr int kUnroll = 4;
constexpr uint64_t kPieceBytes = 256 << 10;

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // IPC and argument errors are not sticky: leave the context usable
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
  }
}

// Each CTA takes pieces in turn; 16-byte accesses where the piece allows, bytes otherwise.
__global__ void __launch_bounds__(kThreads) copy_pieces_kernel(const CopyOp* pieces, int32_t count) {
  for (int32_t i = blockIdx.x; i < count; i += gridDim.x) {
    const CopyOp piece = pieces[i];
    if (((piece.src | piece.dst | piece.bytes) & 15) == 0) {
      const uint4* src = reinterpret_cast<const uint4*>(piece.src);
      uint4* dst = reinterpret_cast<uint4*>(piece.dst);
      const int64_t n = static_cast<int64_t>(piece.bytes / 16);
      for (int64_t base = threadIdx.x; base < n; base += kThreads * kUnroll) {
        uint4 values[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (base + u * kThreads < n) values[u] = src[base + u * kThreads];
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (base + u * kThreads < n) dst[base + u * kThreads] = values[u];
        }
      }
    } else {
      const uint8_t* src = reinterpret_cast<const uint8_t*>(piece.src);
      uint8_t* dst = reinterpret_cast<uint8_t*>(piece.dst);
      for (uint64_t j = threadIdx.x; j < piece.bytes; j += kThreads) dst[j] = src[j];
    }
  }
}

// Makes `device` current for a scope and restores the caller's: methods run on the transfer
// engine's progress thread and on callers' threads (register_kv, disconnect), whose current device
// they must not change.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    cudaGetDevice(&previous_);
    if (previous_ != device) cudaSetDevice(device);
  }
  ~DeviceGuard() {
    int now = -1;
    cudaGetDevice(&now);
    if (now != previous_) cudaSetDevice(previous_);
  }

 private:
  int previous_ = 0;
};

// The copies as pieces of at most kPieceBytes (multiples of 16 where the copy is aligned).
std::vector<CopyOp> split_into_pieces(const std::vector<CopyOp>& copies) {
  std::vector<CopyOp> pieces;
  pieces.reserve(copies.size());
  for (const CopyOp& c : copies) {
    for (uint64_t offset = 0; offset < c.bytes; offset += kPieceBytes) {
      pieces.push_back({c.src + offset, c.dst + offset, std::min(kPieceBytes, c.bytes - offset)});
    }
  }
  return pieces;
}

// One copy() in flight: its pieces in pinned and device memory, and the event after its kernel.
struct Batch {
  uint64_t ticket = 0;
  size_t capacity = 0;  // pieces
  CopyOp* host = nullptr;
  CopyOp* device = nullptr;
  cudaEvent_t finished = nullptr;
};

struct Mapping {
  uint64_t base = 0;  // where the allocation is mapped here
  int references = 0;
};

class CudaPeerMemory final : public PeerMemory {
 public:
  explicit CudaPeerMemory(int device) : device_(device), scope_(host_scope() + "|cuda") {}

  ~CudaPeerMemory() override {
    DeviceGuard on(device_);
    if (stream_ != nullptr) cudaStreamSynchronize(stream_);
    for (std::deque<Batch>* list : {&in_flight_, &free_}) {
      for (Batch& b : *list) release(b);
    }
    for (auto& [handle, mapping] : mappings_) cudaIpcCloseMemHandle(reinterpret_cast<void*>(mapping.base));
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }

  std::string scope() const override { return scope_; }

  bool supports(MemoryKind kind) const override { return kind == MemoryKind::CUDA; }

  std::string export_region(uint64_t base, uint64_t length) override {
    DeviceGuard on(device_);
    CUdeviceptr allocation = 0;
    size_t allocation_bytes = 0;
    if (address_range()(&allocation, &allocation_bytes, static_cast<CUdeviceptr>(base)) != CUDA_SUCCESS) {
      throw std::runtime_error("cuMemGetAddressRange: the region is not device memory of one allocation");
    }
    if (base + length > allocation + allocation_bytes) {
      throw std::runtime_error("the region spans more than one allocation");
    }
    cudaIpcMemHandle_t handle;
    check(cudaIpcGetMemHandle(&handle, reinterpret_cast<void*>(allocation)), "cudaIpcGetMemHandle");
    ByteWriter w;
    w.put_bytes(std::string(reinterpret_cast<const char*>(&handle), sizeof(handle)));
    w.put<uint64_t>(base - allocation);
    w.put<uint64_t>(allocation_bytes);
    w.put<uint64_t>(base);
    w.put_bytes(process_nonce());
    w.put<int32_t>(device_);
    return w.take();
  }

  uint64_t map(const std::string& exported, uint64_t length) override {
    ByteReader r(exported, "malformed CUDA export");
    const std::string handle = r.get_bytes();
    const uint64_t offset = r.get<uint64_t>();
    const uint64_t allocation_bytes = r.get<uint64_t>();
    const uint64_t address = r.get<uint64_t>();
    const std::string process = r.get_bytes();
    const int32_t device = r.get<int32_t>();
    r.expect_end();
    if (handle.size() != sizeof(cudaIpcMemHandle_t) || offset > allocation_bytes || length > allocation_bytes - offset) {
      throw std::runtime_error("malformed CUDA export (handle size, or a region outside its allocation)");
    }
    DeviceGuard on(device_);
    if (process == process_nonce()) {  // this process's own memory: the address is valid here
      if (device != device_) {  // on another GPU: this device's kernel reaches it over peer access
        const cudaError_t err = cudaDeviceEnablePeerAccess(device, 0);
        if (err != cudaErrorPeerAccessAlreadyEnabled) check(err, "cudaDeviceEnablePeerAccess");
        cudaGetLastError();
      }
      return address;
    }
    Mapping& mapping = mappings_[handle];
    if (mapping.references == 0) {
      cudaIpcMemHandle_t h;
      std::memcpy(&h, handle.data(), sizeof(h));
      void* base = nullptr;
      const cudaError_t err = cudaIpcOpenMemHandle(&base, h, cudaIpcMemLazyEnablePeerAccess);
      if (err != cudaSuccess) {
        mappings_.erase(handle);
        check(err, "cudaIpcOpenMemHandle");
      }
      mapping.base = reinterpret_cast<uint64_t>(base);
    }
    ++mapping.references;
    const uint64_t here = mapping.base + offset;
    mapped_regions_.emplace(here, handle);
    return here;
  }

  void unmap(uint64_t address) noexcept override {
    const auto region = mapped_regions_.find(address);
    if (region == mapped_regions_.end()) return;  // this process's own memory: nothing was opened
    const auto mapping = mappings_.find(region->second);
    mapped_regions_.erase(region);
    if (mapping == mappings_.end() || --mapping->second.references > 0) return;
    DeviceGuard on(device_);
    cudaIpcCloseMemHandle(reinterpret_cast<void*>(mapping->second.base));
    mappings_.erase(mapping);
  }

  uint64_t copy(const std::vector<CopyOp>& copies) override {
    DeviceGuard on(device_);
    if (stream_ == nullptr) check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    const std::vector<CopyOp> pieces = split_into_pieces(copies);
    Batch batch = take_batch(pieces.size());
    cudaError_t err = cudaSuccess;
    const char* what = "";
    if (!pieces.empty()) {
      std::memcpy(batch.host, pieces.data(), pieces.size() * sizeof(CopyOp));
      err = cudaMemcpyAsync(batch.device, batch.host, pieces.size() * sizeof(CopyOp), cudaMemcpyHostToDevice, stream_);
      what = "cudaMemcpyAsync (copy list)";
      if (err == cudaSuccess) {
        const int count = static_cast<int>(pieces.size());
        copy_pieces_kernel<<<std::min(count, kMaxCtas), kThreads, 0, stream_>>>(batch.device, count);
        err = cudaGetLastError();
        what = "copy kernel launch";
      }
    }
    if (err == cudaSuccess) {
      err = cudaEventRecord(batch.finished, stream_);
      what = "cudaEventRecord";
    }
    if (err != cudaSuccess) {
      // Nothing of this copy may run once the caller hears it failed (it frees the blocks).
      cudaStreamSynchronize(stream_);
      free_.push_back(batch);
      check(err, what);
    }
    batch.ticket = ++last_ticket_;
    in_flight_.push_back(batch);
    return batch.ticket;
  }

  bool done(uint64_t ticket) override {
    collect();
    if (!device_error_.empty() && ticket > failed_after_) throw std::runtime_error("direct copy: " + device_error_);
    return ticket <= completed_;
  }

  void drain() noexcept override {
    if (stream_ == nullptr) return;
    DeviceGuard on(device_);
    cudaStreamSynchronize(stream_);
    collect();
  }

 private:
  using AddressRange = PFN_cuMemGetAddressRange_v3020;

  static AddressRange address_range() {
    static AddressRange fn = [] {
      void* symbol = nullptr;
      cudaDriverEntryPointQueryResult found{};
      check(cudaGetDriverEntryPointByVersion("cuMemGetAddressRange", &symbol, 3020, cudaEnableDefault, &found),
            "cudaGetDriverEntryPointByVersion(cuMemGetAddressRange)");
      if (found != cudaDriverEntryPointSuccess || symbol == nullptr) {
        throw std::runtime_error("the CUDA driver has no cuMemGetAddressRange");
      }
      return reinterpret_cast<AddressRange>(symbol);
    }();
    return fn;
  }

  // Moves the batches the device has finished (or failed) to the free list. A failure (the
  // context's errors are sticky) fails that batch's ticket and every later one.
  void collect() noexcept {
    while (!in_flight_.empty()) {
      const cudaError_t state = cudaEventQuery(in_flight_.front().finished);
      if (state == cudaErrorNotReady) break;
      if (state != cudaSuccess && device_error_.empty()) {
        device_error_ = cudaGetErrorString(state);
        failed_after_ = completed_;
      }
      completed_ = in_flight_.front().ticket;
      free_.push_back(in_flight_.front());
      in_flight_.pop_front();
    }
  }

  // A finished batch with room for `pieces` (the smallest that fits), else a new one.
  Batch take_batch(size_t pieces) {
    auto fits = free_.end();
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if (it->capacity >= pieces && (fits == free_.end() || it->capacity < fits->capacity)) fits = it;
    }
    if (fits != free_.end()) {
      Batch b = *fits;
      free_.erase(fits);
      return b;
    }
    Batch b;
    b.capacity = std::max<size_t>(1024, pieces);
    check(cudaMallocHost(&b.host, b.capacity * sizeof(CopyOp)), "cudaMallocHost (copy list)");
    check(cudaMalloc(&b.device, b.capacity * sizeof(CopyOp)), "cudaMalloc (copy list)");
    check(cudaEventCreateWithFlags(&b.finished, cudaEventDisableTiming), "cudaEventCreate");
    return b;
  }

  static void release(Batch& b) {
    cudaFreeHost(b.host);
    cudaFree(b.device);
    cudaEventDestroy(b.finished);
  }

  const int device_;
  const std::string scope_;
  cudaStream_t stream_ = nullptr;
  std::deque<Batch> in_flight_;  // in ticket order: one stream finishes them in order
  std::deque<Batch> free_;
  uint64_t last_ticket_ = 0;
  uint64_t completed_ = 0;       // every ticket up to it has ended
  std::string device_error_;     // the first failed copy's error: tickets after failed_after_ failed
  uint64_t failed_after_ = 0;
  std::map<std::string, Mapping> mappings_;        // IPC handle -> the allocation mapped here
  std::multimap<uint64_t, std::string> mapped_regions_;  // address map() returned -> its allocation's handle, per map()
};

}  // namespace

std::unique_ptr<PeerMemory> make_cuda_peer_memory(int device) { return std::make_unique<CudaPeerMemory>(device); }

}  // namespace rtpllm::cuda

// Block copies of the KV copy engine against a plain copy of the same bytes, in the same run.
//
//   kv_copy_bench [--layers 32] [--kv-heads 8] [--head-dim 128] [--pool-blocks 256] [--reps 5]
//                 [--disk-dir PATH] [--disk-blocks 128]
//
// For each block size (tokens per block) and block count: save (pool -> host buffers) and load
// (host buffers -> pool) of randomly scattered pool blocks, timed from submit() to the end of
// wait(), in GB/s and as a fraction of one contiguous copy of the same bytes. The CPU build copies
// a host pool with memcpy (baseline: one memcpy). The CUDA build (RTPLLM_CUDA=ON) copies a device
// pool to and from pinned host buffers with both methods of CudaKVCopyEngine (baseline: one
// cudaMemcpyAsync of the same bytes between a device buffer and pinned memory, H2D and D2H).
// With --disk-dir, also the disk tier on that file system: --disk-blocks 16-token blocks saved from
// the pool (copy, checksum, O_DIRECT write) and loaded back (O_DIRECT read, verify, copy).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "rtpllm/kvstore/cpu_copy_engine.h"
#include "rtpllm/kvstore/disk_block_file.h"
#include "rtpllm/kvstore/disk_tier.h"

#ifdef RTPLLM_WITH_CUDA
#include <cuda_runtime.h>

#include "cuda/kvstore/cuda_copy_engine.h"
#include "cuda/kvstore/cuda_host_allocator.h"
#endif

namespace rtpllm {
namespace {

using Clock = std::chrono::steady_clock;

struct Shape {
  int32_t layers = 32, kv_heads = 8, head_dim = 128, element_bytes = 2, pool_blocks = 256, reps = 5;
  std::string disk_dir;  // empty: no disk measurement
  int32_t disk_blocks = 128;
};

double median_seconds(int reps, const std::function<void()>& fn) {
  fn();  // warm-up
  std::vector<double> times;
  for (int i = 0; i < reps; ++i) {
    const auto start = Clock::now();
    fn();
    times.push_back(std::chrono::duration<double>(Clock::now() - start).count());
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

KVLayout make_layout(const Shape& shape, int32_t block_size, MemoryKind memory, const std::vector<uint8_t*>& planes) {
  KVLayout layout;
  layout.memory = memory;
  layout.num_blocks = shape.pool_blocks;
  layout.block_size = block_size;
  layout.num_kv_heads = shape.kv_heads;
  layout.head_dim = shape.head_dim;
  layout.element_bytes = shape.element_bytes;
  layout.block_stride_bytes = layout.block_bytes();
  for (int32_t l = 0; l < shape.layers; ++l) {
    layout.layers.push_back(KVLayerAddress{reinterpret_cast<uint64_t>(planes[2 * l]), reinterpret_cast<uint64_t>(planes[2 * l + 1])});
  }
  return layout;
}

std::vector<BlockId> scattered_blocks(int32_t count, int32_t pool_blocks, std::mt19937& rng) {
  std::vector<BlockId> all(static_cast<size_t>(pool_blocks));
  std::iota(all.begin(), all.end(), 0);
  std::shuffle(all.begin(), all.end(), rng);
  all.resize(static_cast<size_t>(count));
  return all;
}

void print_row(const char* engine, const char* direction, int32_t block_size, int32_t count, int64_t bytes, double seconds,
               double baseline_seconds) {
  const double gbps = static_cast<double>(bytes) / seconds / 1e9;
  const double baseline = static_cast<double>(bytes) / baseline_seconds / 1e9;
  std::printf("%-12s %-5s %6d %7d %10.1f %9.2f %11.2f %7.3f\n", engine, direction, block_size, count,
              static_cast<double>(bytes) / (1 << 20), gbps, baseline, gbps / baseline);
}

void print_header() {
  std::printf("%-12s %-5s %6s %7s %10s %9s %11s %7s\n", "engine", "dir", "tokens", "blocks", "MiB", "GB/s", "plain GB/s",
              "ratio");
}

// Times save and load of `counts` scattered blocks through `engine`; `baseline(bytes, to_host)`
// times a plain copy of the same bytes.
void run_engine(KVCopyEngine& engine, const Shape& shape, const std::vector<int32_t>& counts,
                const std::function<double(int64_t, bool)>& baseline) {
  const KVLayout& layout = engine.layout();
  const int64_t block = layout.bytes_per_block();
  const int32_t max_count = *std::max_element(counts.begin(), counts.end());
  HostBuffer host(engine.host_allocator(), static_cast<size_t>(block * max_count));
  std::memset(host.data(), 1, host.size());
  std::mt19937 rng(1);
  for (int32_t count : counts) {
    std::vector<BlockCopy> copies;
    for (BlockId b : scattered_blocks(count, layout.num_blocks, rng)) {
      copies.push_back(BlockCopy{b, host.data() + static_cast<int64_t>(copies.size()) * block});
    }
    const int64_t bytes = block * count;
    for (bool to_host : {true, false}) {
      const CopyDirection direction = to_host ? CopyDirection::POOL_TO_HOST : CopyDirection::HOST_TO_POOL;
      const double seconds = median_seconds(shape.reps, [&] { engine.wait(engine.submit(direction, copies)); });
      print_row(engine.name().c_str(), to_host ? "save" : "load", layout.block_size, count, bytes, seconds, baseline(bytes, to_host));
    }
  }
}

TransferState finish(KVConnector& tier, TransferHandle handle) {
  TransferState state;
  while ((state = tier.poll(handle)) == TransferState::PENDING) std::this_thread::sleep_for(std::chrono::microseconds(50));
  return state;
}

// Disk tier throughput: write (save from the pool, until flushed) and read back (load into the pool).
void run_disk(const std::shared_ptr<KVCopyEngine>& engine, const Shape& shape) {
  const int32_t count = std::min(shape.disk_blocks, engine->layout().num_blocks);
  DiskTierOptions options;
  options.directory = shape.disk_dir + "/kv_copy_bench";
  options.capacity_bytes = static_cast<int64_t>(2 * count) * static_cast<int64_t>(disk_block_file_bytes(engine->layout().bytes_per_block()));
  options.cache_identity = static_cast<uint64_t>(Clock::now().time_since_epoch().count());  // never finds old files
  options.max_queued_writes = count;
  std::vector<BlockHash> hashes;
  std::vector<BlockId> blocks;
  for (int32_t i = 0; i < count; ++i) {
    hashes.push_back(static_cast<BlockHash>(i + 1));
    blocks.push_back(i);
  }
  const double bytes = static_cast<double>(engine->layout().bytes_per_block()) * count;
  {
    DiskTier disk(engine, options);
    auto start = Clock::now();
    const TransferState saved = finish(disk, disk.save(hashes, blocks));
    disk.flush();
    const double write_s = std::chrono::duration<double>(Clock::now() - start).count();
    start = Clock::now();
    const TransferState loaded = finish(disk, disk.load(hashes, blocks));
    const double read_s = std::chrono::duration<double>(Clock::now() - start).count();
    const bool ok = saved == TransferState::DONE && loaded == TransferState::DONE && disk.stats()[0].saved_blocks == static_cast<uint64_t>(count);
    std::printf("disk tier (%s, %d writer / %d reader threads) %d blocks, %.0f MiB: write %.2f GB/s, read %.2f GB/s%s\n",
                options.directory.c_str(), options.writer_threads, options.reader_threads, count, bytes / (1 << 20),
                bytes / write_s / 1e9, bytes / read_s / 1e9, ok ? "" : " (FAILED: see warnings)");
  }
  std::filesystem::remove_all(options.directory);
}

#ifndef RTPLLM_WITH_CUDA
void run_cpu(const Shape& shape, const std::vector<int32_t>& block_sizes, const std::vector<int32_t>& counts) {
  for (int32_t block_size : block_sizes) {
    const int64_t block_bytes = static_cast<int64_t>(block_size) * shape.kv_heads * shape.head_dim * shape.element_bytes;
    std::vector<std::vector<uint8_t>> storage(static_cast<size_t>(2 * shape.layers));
    std::vector<uint8_t*> planes;
    for (auto& plane : storage) {
      plane.assign(static_cast<size_t>(block_bytes * shape.pool_blocks), 2);
      planes.push_back(plane.data());
    }
    auto engine = std::make_shared<CpuKVCopyEngine>(make_layout(shape, block_size, MemoryKind::HOST, planes));
    const size_t max_bytes = static_cast<size_t>(engine->layout().bytes_per_block()) * *std::max_element(counts.begin(), counts.end());
    std::vector<uint8_t> src(max_bytes, 3), dst(max_bytes, 4);
    run_engine(*engine, shape, counts, [&](int64_t bytes, bool) {
      return median_seconds(shape.reps, [&] { std::memcpy(dst.data(), src.data(), static_cast<size_t>(bytes)); });
    });
    if (!shape.disk_dir.empty() && block_size == 16) run_disk(engine, shape);
  }
}

#endif

#ifdef RTPLLM_WITH_CUDA
void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(err));
    std::exit(1);
  }
}

void run_cuda(const Shape& shape, const std::vector<int32_t>& block_sizes, const std::vector<int32_t>& counts) {
  cudaStream_t stream;
  check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
  for (int32_t block_size : block_sizes) {
    const int64_t block_bytes = static_cast<int64_t>(block_size) * shape.kv_heads * shape.head_dim * shape.element_bytes;
    std::vector<uint8_t*> planes;
    for (int32_t i = 0; i < 2 * shape.layers; ++i) {
      void* plane = nullptr;
      check(cudaMalloc(&plane, static_cast<size_t>(block_bytes * shape.pool_blocks)), "cudaMalloc");
      planes.push_back(static_cast<uint8_t*>(plane));
    }
    const KVLayout layout = make_layout(shape, block_size, MemoryKind::CUDA, planes);
    const size_t max_bytes = static_cast<size_t>(layout.bytes_per_block()) * *std::max_element(counts.begin(), counts.end());
    cuda::CudaHostAllocator pinned;
    void* host = pinned.allocate(max_bytes);
    void* device = nullptr;
    check(cudaMalloc(&device, max_bytes), "cudaMalloc");
    auto baseline = [&](int64_t bytes, bool to_host) {
      return median_seconds(shape.reps, [&] {
        check(to_host ? cudaMemcpyAsync(host, device, static_cast<size_t>(bytes), cudaMemcpyDeviceToHost, stream)
                      : cudaMemcpyAsync(device, host, static_cast<size_t>(bytes), cudaMemcpyHostToDevice, stream),
              "cudaMemcpyAsync");
        check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
      });
    };
    for (auto method : {cuda::CudaCopyMethod::KERNEL, cuda::CudaCopyMethod::MEMCPY}) {
      auto engine = std::make_shared<cuda::CudaKVCopyEngine>(layout, reinterpret_cast<uintptr_t>(stream), method);
      run_engine(*engine, shape, counts, baseline);
      if (!shape.disk_dir.empty() && block_size == 16 && method == cuda::CudaCopyMethod::KERNEL) run_disk(engine, shape);
    }
    pinned.deallocate(host);
    cudaFree(device);
    for (uint8_t* plane : planes) cudaFree(plane);
  }
  cudaStreamDestroy(stream);
}
#endif

int parse_int(int argc, char** argv, const char* flag, int fallback) {
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::strcmp(argv[i], flag) == 0) return std::atoi(argv[i + 1]);
  }
  return fallback;
}

std::string parse_string(int argc, char** argv, const char* flag) {
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::strcmp(argv[i], flag) == 0) return argv[i + 1];
  }
  return "";
}

}  // namespace
}  // namespace rtpllm

int main(int argc, char** argv) {
  using namespace rtpllm;
  Shape shape;
  shape.layers = parse_int(argc, argv, "--layers", shape.layers);
  shape.kv_heads = parse_int(argc, argv, "--kv-heads", shape.kv_heads);
  shape.head_dim = parse_int(argc, argv, "--head-dim", shape.head_dim);
  shape.pool_blocks = parse_int(argc, argv, "--pool-blocks", shape.pool_blocks);
  shape.reps = parse_int(argc, argv, "--reps", shape.reps);
  shape.disk_dir = parse_string(argc, argv, "--disk-dir");
  shape.disk_blocks = parse_int(argc, argv, "--disk-blocks", shape.disk_blocks);
  const std::vector<int32_t> block_sizes = {16, 64};
  std::vector<int32_t> counts;
  for (int32_t count : {1, 8, 32, 128}) {
    if (count <= shape.pool_blocks) counts.push_back(count);
  }
  std::printf("KV block copies: %d layers, %d KV heads, head_dim %d, %d-byte elements, %d pool blocks\n", shape.layers,
              shape.kv_heads, shape.head_dim, shape.element_bytes, shape.pool_blocks);
  print_header();
#ifdef RTPLLM_WITH_CUDA
  run_cuda(shape, block_sizes, counts);
#else
  run_cpu(shape, block_sizes, counts);
#endif
  return 0;
}

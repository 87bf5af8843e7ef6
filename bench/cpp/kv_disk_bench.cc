// The disk tier's read and write rates against the raw rates of the same file system, in one run.
//
//   kv_disk_bench --dir PATH [--blocks 256] [--chain 32] [--layers 32] [--kv-heads 8] [--head-dim 128]
//                 [--block-size 16] [--readers 0] [--writers 0] [--reps 3] [--copy-delay-ms 0]   (0 threads: DiskTierOptions' defaults)
//
// Rows (MB/s = 1e6 bytes per second, payload bytes):
//   raw O_DIRECT write   one file of all the blocks' images, 8 MiB writes, one thread (what `dd
//                        oflag=direct bs=8M` does)
//   raw O_DIRECT read    the same file, 8 MiB reads, one thread; then one block file image per
//                        read from as many threads as the tier has readers
//   checksum64           one thread over all the payloads (the verification every disk load does)
//   tier write           save() of every block from the pool, until flush() returns
// Read rates are the median of --reps runs.
//   tier read            load() of every block as chains of --chain blocks, all submitted at once
//                        (requests arriving together), until the last one is DONE
//   tier read, 1 chain   one load of --chain blocks: what one request waits for
//   tier read + writes   the same loads while as many new blocks are being written
// The pool is host memory (CpuKVCopyEngine): the numbers are the disk path's, not a GPU copy's.
// --copy-delay-ms D makes every copy into the pool end D ms after it was submitted, as a CUDA copy
// does when it must wait for the forward pass in flight (a step of a busy 8B model: 15-50 ms).
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <string>
#include <thread>
#include <vector>

#include "rtpllm/kvstore/checksum.h"
#include "rtpllm/kvstore/cpu_copy_engine.h"
#include "rtpllm/kvstore/disk_block_file.h"
#include "rtpllm/kvstore/disk_tier.h"

namespace rtpllm {
namespace {

using Clock = std::chrono::steady_clock;

struct Args {
  std::string dir;
  int32_t blocks = 256, chain = 32, layers = 32, kv_heads = 8, head_dim = 128, block_size = 16;
  int32_t readers = 0, writers = 0, reps = 3, copy_delay_ms = 0;
};

double since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

void row(const char* what, double bytes, double seconds, double raw_read_mbps = 0) {
  const double mbps = bytes / seconds / 1e6;
  if (raw_read_mbps > 0) {
    std::printf("%-44s %9.0f MB/s  (%.2f of raw O_DIRECT read)\n", what, mbps, mbps / raw_read_mbps);
  } else {
    std::printf("%-44s %9.0f MB/s\n", what, mbps);
  }
}

void die(const char* what) {
  std::perror(what);
  std::exit(1);
}

// Writes then reads one file of `bytes` with O_DIRECT in 8 MiB requests; returns {write, read} seconds.
std::pair<double, double> raw_sequential(const std::string& path, size_t bytes) {
  constexpr size_t kChunk = 8 << 20;
  HostBuffer buffer(std::make_shared<AlignedHostAllocator>(), kChunk);
  std::memset(buffer.data(), 7, kChunk);
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_DIRECT, 0644);
  if (fd < 0) die("open O_DIRECT for writing (the file system may not support O_DIRECT)");
  auto start = Clock::now();
  for (size_t done = 0; done < bytes; done += kChunk) {
    if (::pwrite(fd, buffer.data(), kChunk, static_cast<off_t>(done)) != static_cast<ssize_t>(kChunk)) die("pwrite");
  }
  ::fsync(fd);
  const double write_s = since(start);
  ::close(fd);
  fd = ::open(path.c_str(), O_RDONLY | O_DIRECT);
  if (fd < 0) die("open O_DIRECT for reading");
  start = Clock::now();
  for (size_t done = 0; done < bytes; done += kChunk) {
    if (::pread(fd, buffer.data(), kChunk, static_cast<off_t>(done)) != static_cast<ssize_t>(kChunk)) die("pread");
  }
  const double read_s = since(start);
  ::close(fd);
  return {write_s, read_s};
}

// `threads` threads read the file in `request`-byte pieces with O_DIRECT, interleaved.
double raw_parallel_read(const std::string& path, size_t bytes, size_t request, int32_t threads) {
  const size_t pieces = bytes / request;
  std::vector<std::thread> workers;
  const auto start = Clock::now();
  for (int32_t t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      HostBuffer buffer(std::make_shared<AlignedHostAllocator>(), request);
      const int fd = ::open(path.c_str(), O_RDONLY | O_DIRECT);
      if (fd < 0) die("open O_DIRECT for reading");
      for (size_t p = static_cast<size_t>(t); p < pieces; p += static_cast<size_t>(threads)) {
        if (::pread(fd, buffer.data(), request, static_cast<off_t>(p * request)) != static_cast<ssize_t>(request)) die("pread");
      }
      ::close(fd);
    });
  }
  for (std::thread& w : workers) w.join();
  return since(start);
}

// A copy engine whose copies end `delay` after submission at the earliest (see --copy-delay-ms).
class DelayedCopyEngine final : public KVCopyEngine {
 public:
  DelayedCopyEngine(std::shared_ptr<KVCopyEngine> inner, std::chrono::microseconds delay) : inner_(std::move(inner)), delay_(delay) {}
  std::string name() const override { return inner_->name() + "+delay"; }
  const KVLayout& layout() const override { return inner_->layout(); }
  std::shared_ptr<HostAllocator> host_allocator() const override { return inner_->host_allocator(); }
  CopyTicket submit(CopyDirection direction, const std::vector<BlockCopy>& copies) override {
    const CopyTicket ticket = inner_->submit(direction, copies);
    std::lock_guard<std::mutex> lock(mutex_);
    ready_at_[ticket] = Clock::now() + delay_;
    return ticket;
  }
  TransferState query(CopyTicket ticket) override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (Clock::now() < ready_at_.at(ticket)) return TransferState::PENDING;
    }
    const TransferState state = inner_->query(ticket);
    if (state != TransferState::PENDING) forget(ticket);
    return state;
  }
  TransferState wait(CopyTicket ticket) override {
    Clock::time_point ready;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      ready = ready_at_.at(ticket);
    }
    std::this_thread::sleep_until(ready);
    forget(ticket);
    return inner_->wait(ticket);
  }

 private:
  void forget(CopyTicket ticket) {
    std::lock_guard<std::mutex> lock(mutex_);
    ready_at_.erase(ticket);
  }
  const std::shared_ptr<KVCopyEngine> inner_;
  const std::chrono::microseconds delay_;
  std::mutex mutex_;
  std::unordered_map<CopyTicket, Clock::time_point> ready_at_;
};

// The median of `reps` runs of fn (seconds): the file system is shared and noisy.
double median_of(int32_t reps, const std::function<double()>& fn) {
  std::vector<double> times;
  for (int32_t i = 0; i < std::max(reps, 1); ++i) times.push_back(fn());
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

TransferState finish(KVConnector& tier, TransferHandle handle) {
  TransferState state;
  while ((state = tier.poll(handle)) == TransferState::PENDING) std::this_thread::sleep_for(std::chrono::microseconds(50));
  return state;
}

// Loads every block as chains of `chain`, all submitted together; returns the seconds until all are DONE.
double load_all(DiskTier& disk, const std::vector<BlockHash>& hashes, int32_t chain, int32_t pool_blocks) {
  std::vector<TransferHandle> handles;
  const auto start = Clock::now();
  for (size_t first = 0; first < hashes.size(); first += static_cast<size_t>(chain)) {
    const size_t n = std::min(static_cast<size_t>(chain), hashes.size() - first);
    std::vector<BlockHash> part(hashes.begin() + static_cast<std::ptrdiff_t>(first), hashes.begin() + static_cast<std::ptrdiff_t>(first + n));
    std::vector<BlockId> blocks;
    for (size_t i = 0; i < n; ++i) blocks.push_back(static_cast<BlockId>((first + i) % static_cast<size_t>(pool_blocks)));
    handles.push_back(disk.load(part, blocks));
  }
  bool ok = true;
  for (TransferHandle h : handles) ok = finish(disk, h) == TransferState::DONE && ok;
  const double seconds = since(start);
  if (!ok) std::printf("  (a load FAILED: see the warnings above)\n");
  return seconds;
}

int run(const Args& args) {
  std::filesystem::create_directories(args.dir);
  const int64_t block_bytes = static_cast<int64_t>(args.block_size) * args.kv_heads * args.head_dim * 2;
  const int32_t pool_blocks = std::max(args.chain, 64);
  std::vector<std::vector<uint8_t>> planes(static_cast<size_t>(2 * args.layers));
  KVLayout layout;
  layout.memory = MemoryKind::HOST;
  layout.num_blocks = pool_blocks;
  layout.block_size = args.block_size;
  layout.num_kv_heads = args.kv_heads;
  layout.head_dim = args.head_dim;
  layout.element_bytes = 2;
  layout.block_stride_bytes = block_bytes;
  for (int32_t l = 0; l < args.layers; ++l) {
    planes[2 * l].assign(static_cast<size_t>(block_bytes * pool_blocks), static_cast<uint8_t>(l));
    planes[2 * l + 1].assign(static_cast<size_t>(block_bytes * pool_blocks), static_cast<uint8_t>(l + 1));
    layout.layers.push_back(KVLayerAddress{reinterpret_cast<uint64_t>(planes[2 * l].data()), reinterpret_cast<uint64_t>(planes[2 * l + 1].data())});
  }
  std::shared_ptr<KVCopyEngine> engine = std::make_shared<CpuKVCopyEngine>(layout);
  if (args.copy_delay_ms > 0) engine = std::make_shared<DelayedCopyEngine>(engine, std::chrono::microseconds(1000 * args.copy_delay_ms));
  const size_t payload = static_cast<size_t>(engine->layout().bytes_per_block());
  const size_t file_bytes = disk_block_file_bytes(payload);
  DiskTierOptions options;
  options.directory = args.dir + "/kv_disk_bench_tier";
  options.capacity_bytes = static_cast<int64_t>(3 * args.blocks) * static_cast<int64_t>(file_bytes);
  options.cache_identity = static_cast<uint64_t>(Clock::now().time_since_epoch().count());  // never finds old files
  options.max_queued_writes = 2 * args.blocks;
  if (args.readers > 0) options.reader_threads = args.readers;
  if (args.writers > 0) options.writer_threads = args.writers;
  std::printf("kv_disk_bench: %s, %d blocks of %.2f MiB (%d layers x %d KV heads x %d x %d tokens), chains of %d, "
              "%d reader / %d writer threads, copies end >= %d ms after submission\n",
              args.dir.c_str(), args.blocks, static_cast<double>(payload) / (1 << 20), args.layers, args.kv_heads,
              args.head_dim, args.block_size, args.chain, options.reader_threads, options.writer_threads, args.copy_delay_ms);

  const double bytes = static_cast<double>(payload) * args.blocks;
  const std::string raw_path = args.dir + "/kv_disk_bench_raw";
  const size_t raw_bytes = (file_bytes * static_cast<size_t>(args.blocks) + (8 << 20) - 1) / (8 << 20) * (8 << 20);
  const auto [raw_write_s, raw_read_s] = raw_sequential(raw_path, raw_bytes);
  const double raw_read_mbps = static_cast<double>(raw_bytes) / raw_read_s / 1e6;
  row("raw O_DIRECT write, 8 MiB, 1 thread", static_cast<double>(raw_bytes), raw_write_s);
  row("raw O_DIRECT read, 8 MiB, 1 thread", static_cast<double>(raw_bytes), raw_read_s);
  char what[128];
  std::snprintf(what, sizeof(what), "raw O_DIRECT read, block files, %d threads", options.reader_threads);
  const size_t pieces = raw_bytes / file_bytes;
  row(what, static_cast<double>(pieces * file_bytes),
      median_of(args.reps, [&] { return raw_parallel_read(raw_path, raw_bytes, file_bytes, options.reader_threads); }), raw_read_mbps);
  std::filesystem::remove(raw_path);

  {
    std::vector<uint8_t> data(static_cast<size_t>(std::min<double>(bytes, 256.0 * (1 << 20))), 5);
    uint64_t sink = 0;
    const auto start = Clock::now();
    int reps = 0;
    while (since(start) < 0.5 || reps < 2) {
      sink += checksum64(data.data(), data.size());
      ++reps;
    }
    row("checksum64, 1 thread", static_cast<double>(data.size()) * reps, since(start));
    if (sink == 42) std::printf(" ");
  }

  std::vector<BlockHash> hashes;
  std::vector<BlockId> blocks;
  for (int32_t i = 0; i < args.blocks; ++i) {
    hashes.push_back(static_cast<BlockHash>(i + 1));
    blocks.push_back(i % pool_blocks);
  }
  {
    DiskTier disk(engine, options);
    auto start = Clock::now();
    finish(disk, disk.save(hashes, blocks));
    disk.flush();
    row("tier write (save, flush)", bytes, since(start));
  }
  {
    // A fresh tier rebuilt from the directory (as after a restart): nothing of the writes is cached
    // in the tier, and O_DIRECT bypasses the page cache.
    DiskTier disk(engine, options);
    row("tier read, all chains at once", bytes, median_of(args.reps, [&] { return load_all(disk, hashes, args.chain, pool_blocks); }),
        raw_read_mbps);
    const std::vector<BlockHash> one(hashes.begin(), hashes.begin() + std::min<size_t>(hashes.size(), static_cast<size_t>(args.chain)));
    const double one_s = median_of(args.reps, [&] { return load_all(disk, one, args.chain, pool_blocks); });
    std::snprintf(what, sizeof(what), "tier read, 1 chain of %zu blocks (%.1f ms)", one.size(), 1e3 * one_s);
    row(what, static_cast<double>(payload) * static_cast<double>(one.size()), one_s, raw_read_mbps);

    std::vector<BlockHash> fresh;
    for (int32_t i = 0; i < args.blocks; ++i) fresh.push_back(static_cast<BlockHash>(args.blocks + i + 1));
    const TransferHandle writes = disk.save(fresh, blocks);
    const double read_s = load_all(disk, hashes, args.chain, pool_blocks);
    const auto start = Clock::now();
    finish(disk, writes);
    disk.flush();
    row("tier read while writing as many blocks", bytes, read_s, raw_read_mbps);
    std::snprintf(what, sizeof(what), "  (the writes ended %.0f ms after the reads)", 1e3 * since(start));
    std::printf("%s\n", what);
  }
  std::filesystem::remove_all(options.directory);
  return 0;
}

int parse_int(int argc, char** argv, const char* flag, int fallback) {
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::strcmp(argv[i], flag) == 0) return std::atoi(argv[i + 1]);
  }
  return fallback;
}

}  // namespace
}  // namespace rtpllm

int main(int argc, char** argv) {
  using namespace rtpllm;
  Args args;
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::strcmp(argv[i], "--dir") == 0) args.dir = argv[i + 1];
  }
  if (args.dir.empty()) {
    std::fprintf(stderr, "usage: kv_disk_bench --dir PATH [--blocks N] [--chain N] [--readers N] [--writers N] ...\n");
    return 2;
  }
  args.blocks = parse_int(argc, argv, "--blocks", args.blocks);
  args.chain = parse_int(argc, argv, "--chain", args.chain);
  args.layers = parse_int(argc, argv, "--layers", args.layers);
  args.kv_heads = parse_int(argc, argv, "--kv-heads", args.kv_heads);
  args.head_dim = parse_int(argc, argv, "--head-dim", args.head_dim);
  args.block_size = parse_int(argc, argv, "--block-size", args.block_size);
  args.readers = parse_int(argc, argv, "--readers", args.readers);
  args.writers = parse_int(argc, argv, "--writers", args.writers);
  args.reps = parse_int(argc, argv, "--reps", args.reps);
  args.copy_delay_ms = parse_int(argc, argv, "--copy-delay-ms", args.copy_delay_ms);
  if (args.blocks < 1 || args.chain < 1) {
    std::fprintf(stderr, "--blocks and --chain must be positive\n");
    return 2;
  }
  return run(args);
}

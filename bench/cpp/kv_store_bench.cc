// Shared KV store throughput: RemoteStoreTier saves into and loads from a KVStoreServer running in
// a forked child process, by blocks per operation and block size, against memcpy of the same bytes
// measured in the same run (the ceiling on one host).
//
//   kv_store_bench [--memory host|cuda] [--device D] [--layers L] [--mib M] [--in-flight K]
//
// A save is RESERVE + one-sided put + COMMIT; a load is PIN + one-sided get + UNPIN, so small
// operations show the protocol's round trips and large ones the transport's bandwidth. UCX picks
// the transports (UCX_TLS; CI and `UCX_TLS=tcp` measure TCP). KV shape: Llama-3-8B's 8 KV heads x
// 128 dims in bf16, L layers (default 4). Every block saved is new to the store (fresh hashes), and
// loads read them back in the order they were saved.
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <string>
#include <thread>
#include <vector>

#include "rtpllm/kvstore/remote/kv_store_server.h"
#include "rtpllm/kvstore/remote/remote_store_tier.h"
#include "rtpllm/transfer/ucx/ucx_transfer.h"
#include "bench_kv_pool.h"
#ifdef RTPLLM_BENCH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace rtpllm {
namespace {

using Clock = std::chrono::steady_clock;

using kvbench::kElementBytes, kvbench::kHeadDim, kvbench::kHeads;
constexpr int32_t kPoolBlocks = 512;
constexpr uint64_t kIdentity = 0xbe7c4;

struct Args {
  MemoryKind memory = MemoryKind::HOST;
  int device = 0;
  int32_t layers = 4;
  int64_t mib = 256;     // moved per measurement
  int32_t in_flight = 16;  // operations outstanding at once
};

void die(const std::string& message) {
  std::fprintf(stderr, "kv_store_bench: %s\n", message.c_str());
  std::exit(1);
}

// The pool blocks move out of and into (bench_kv_pool.h).
struct Pool : kvbench::KVPool {
  Pool(const Args& args, int32_t block_tokens)
      : kvbench::KVPool(args.memory, args.device, args.layers, kPoolBlocks, block_tokens) {}
};

KVStoreServer::TransferFactory ucx(const Args& args, bool client) {
  std::function<void()> init;
#ifdef RTPLLM_BENCH_CUDA
  if (client && args.memory == MemoryKind::CUDA) init = [device = args.device] { cudaSetDevice(device); };
#endif
  (void)args;
  (void)client;
  return [init](const TransferOptions& o) { return std::make_unique<UcxTransfer>(o, init); };
}

// The store: serves until the parent closes the pipe.
[[noreturn]] void run_store(int64_t capacity_bytes, int port_fd, int quit_fd, const Args& args) {
  KVStoreServerOptions options;
  options.capacity_bytes = capacity_bytes;
  options.transfer_timeout_s = 60;
  KVStoreServer server(options, ucx(args, false), [](const std::string&) {});
  const int32_t port = server.port();
  if (write(port_fd, &port, sizeof(port)) != sizeof(port)) die("pipe");
  char byte;
  while (read(quit_fd, &byte, 1) > 0) {
  }
  std::exit(0);
}

// Runs `total` blocks through `start` in operations of `per_op` blocks, at most in_flight at once;
// returns seconds, or -1 if an operation failed.
template <typename Start>
double run_ops(RemoteStoreTier& tier, int64_t total, int32_t per_op, int32_t in_flight, Start start) {
  std::deque<TransferHandle> pending;
  int64_t issued = 0;
  bool failed = false;
  const Clock::time_point begin = Clock::now();
  while (issued < total || !pending.empty()) {
    while (issued < total && static_cast<int32_t>(pending.size()) < in_flight) {
      pending.push_back(start(issued, per_op));
      issued += per_op;
    }
    for (size_t i = 0; i < pending.size();) {
      const TransferState state = tier.poll(pending[i]);
      if (state == TransferState::PENDING) {
        ++i;
        continue;
      }
      failed = failed || state == TransferState::FAILED;
      pending.erase(pending.begin() + static_cast<std::ptrdiff_t>(i));
    }
  }
  return failed ? -1 : std::chrono::duration<double>(Clock::now() - begin).count();
}

void bench(const Args& args, int32_t block_tokens) {
  // Forked before anything touches CUDA or UCX: the child is a plain host-memory store.
  const int64_t block_bytes = 2LL * args.layers * block_tokens * kHeads * kHeadDim * kElementBytes;
  const int64_t total = std::max<int64_t>(256, (args.mib << 20) / block_bytes);
  const int64_t capacity = 4 * total * block_bytes;  // every config's blocks fit: loads never miss

  int port_pipe[2], quit_pipe[2];
  if (pipe(port_pipe) != 0 || pipe(quit_pipe) != 0) die("pipe");
  const pid_t child = fork();
  if (child == 0) {
    close(port_pipe[0]);
    close(quit_pipe[1]);
    run_store(capacity, port_pipe[1], quit_pipe[0], args);
  }
  close(port_pipe[1]);
  close(quit_pipe[0]);
  int32_t port = 0;
  if (read(port_pipe[0], &port, sizeof(port)) != sizeof(port)) die("the store did not start");
  Pool pool(args, block_tokens);

  RemoteStoreOptions options;
  options.port = port;
  options.identity = kIdentity;
  options.request_timeout_s = 30;
  RemoteStoreTier tier(pool.layout, options, ucx(args, true), [](const std::string&) {});
  if (!tier.wait_connected(30)) die("no connection to the store");

  // The ceiling: memcpy of the same bytes between two host buffers.
  std::vector<uint8_t> a(static_cast<size_t>(block_bytes) * 64, 1), b(a.size());
  const Clock::time_point t0 = Clock::now();
  for (int64_t done = 0; done < total; done += 64) std::memcpy(b.data(), a.data(), a.size());
  const double memcpy_gbs = static_cast<double>(total * block_bytes) / std::chrono::duration<double>(Clock::now() - t0).count() / 1e9;

  std::printf("\nblock %d tokens, %lld KiB per block (%d layers), %lld blocks per run; memcpy %.2f GB/s\n", block_tokens,
              static_cast<long long>(block_bytes >> 10), args.layers, static_cast<long long>(total), memcpy_gbs);
  std::printf("%14s %14s %14s %14s %14s\n", "blocks/op", "save GB/s", "load GB/s", "save ops/s", "load ops/s");
  uint64_t next_hash = 1;
  for (int32_t per_op : {1, 4, 16, 64, 256}) {
    const uint64_t first_hash = next_hash;
    auto blocks_of = [&](int64_t first, int32_t n) {
      std::vector<BlockId> blocks;
      for (int32_t i = 0; i < n; ++i) blocks.push_back(static_cast<BlockId>((first + i) % kPoolBlocks));
      return blocks;
    };
    auto hashes_of = [&](int64_t first, int32_t n) {
      std::vector<BlockHash> hashes;
      for (int32_t i = 0; i < n; ++i) hashes.push_back(first_hash + static_cast<uint64_t>(first + i));
      return hashes;
    };
    const double save_s = run_ops(tier, total, per_op, args.in_flight, [&](int64_t first, int32_t n) {
      return tier.save(hashes_of(first, n), blocks_of(first, n));
    });
    next_hash += static_cast<uint64_t>(total) + 1;
    // The view catches up with the store's index updates before loads ask for the blocks.
    for (int i = 0; i < 2000 && !tier.contains(first_hash + static_cast<uint64_t>(total) - 1); ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    const double load_s = run_ops(tier, total, per_op, args.in_flight, [&](int64_t first, int32_t n) {
      return tier.load(hashes_of(first, n), blocks_of(first, n));
    });
    const double bytes = static_cast<double>(total * block_bytes);
    const double ops = static_cast<double>(total) / per_op;
    auto rate = [&](double s, double amount) { return s > 0 ? amount / s : 0.0; };
    std::printf("%14d %14.2f %14.2f %14.0f %14.0f%s\n", per_op, rate(save_s, bytes) / 1e9, rate(load_s, bytes) / 1e9,
                rate(save_s, ops), rate(load_s, ops), save_s < 0 || load_s < 0 ? "  (FAILED operations)" : "");
  }
  close(quit_pipe[1]);
  waitpid(child, nullptr, 0);
}

Args parse(int argc, char** argv) {
  Args args;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) die(a + " needs a value");
      return argv[++i];
    };
    if (a == "--memory") {
      const std::string m = value();
      if (m != "host" && m != "cuda") die("--memory: host or cuda");
      args.memory = m == "cuda" ? MemoryKind::CUDA : MemoryKind::HOST;
    } else if (a == "--device") {
      args.device = std::atoi(value().c_str());
    } else if (a == "--layers") {
      args.layers = std::atoi(value().c_str());
    } else if (a == "--mib") {
      args.mib = std::atoll(value().c_str());
    } else if (a == "--in-flight") {
      args.in_flight = std::atoi(value().c_str());
    } else {
      die("unknown option " + a + " (see the comment at the top of kv_store_bench.cc)");
    }
  }
  if (args.layers <= 0 || args.mib <= 0 || args.in_flight <= 0) die("--layers, --mib and --in-flight must be positive");
  return args;
}

}  // namespace
}  // namespace rtpllm

int main(int argc, char** argv) {
  const rtpllm::Args args = rtpllm::parse(argc, argv);
  const char* tls = std::getenv("UCX_TLS");
  std::printf("kv_store_bench: memory %s, UCX_TLS=%s\n", args.memory == rtpllm::MemoryKind::CUDA ? "cuda" : "host",
              tls ? tls : "(UCX's choice)");
  for (int32_t block_tokens : {16, 64}) rtpllm::bench(args, block_tokens);
  return 0;
}

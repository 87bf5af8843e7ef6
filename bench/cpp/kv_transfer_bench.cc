// KV transfer bandwidth: UcxTransfer put and get of block lists between two processes, against a
// local copy of the same bytes in the same pattern (memcpy on host memory, cudaMemcpy D2D on GPU
// memory) measured in the same run: the ceiling a transfer could reach on this machine.
//
//   kv_transfer_bench [--memory host|cuda] [--device D] [--layers L] [--iters N] [--grants] [--churn]
//                     [--data-path auto|rma|messages|direct] [--head-split N]
//
// --data-path: how the sender moves bytes (kv_transfer.h DataPath; default auto: RMA where a
// transport does it in hardware, messages otherwise, e.g. over TCP; direct: with --memory cuda in a
// CUDA build, our copy kernel into the receiver's pool mapped over CUDA IPC).
// --grants: the receiver requires write grants (as a decode instance does): every put first asks
// it (one control-channel round trip), so "put us" shows what that check costs.
// The receiver is a forked child (so CUDA IPC and shared memory are on the table, as between a
// prefill and a decode process); UCX picks the transports (UCX_TLS). KV shape: Llama-3-8B's
// 8 KV heads x 128 dims in bf16 (2 KiB per token per plane), L layers (default 4). Block ids are
// random on both sides (a long-running pool's worst case).
// --head-split N: the receiver holds 8 / N of the KV heads (a rank of a decode instance at TP=N) and
// every put or get moves that slice of each token (a prefill at TP=1): one copy per token and plane.
// --churn: instead, 16-token blocks in pools of 2048, both sides' lists as a pool hands them out
// after a decode instance's churn (bench_churn.h): the free list BlockPool replaced ("old pool")
// against BlockPool (free runs, run-aware eviction), 64 and 256 blocks.
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "rtpllm/transfer/transfer_plan.h"
#include "rtpllm/transfer/ucx/ucx_transfer.h"
#include "bench_churn.h"
#include "bench_kv_pool.h"
#ifdef RTPLLM_BENCH_CUDA
#include <cuda_runtime_api.h>

#include "cuda/transfer/cuda_peer_memory.h"
#endif

namespace rtpllm {
namespace {

using Clock = std::chrono::steady_clock;


struct Args {
  MemoryKind memory = MemoryKind::HOST;
  int device = 0;
  int32_t layers = 4;
  int iters = 0;  // 0: enough to move ~512 MiB per measurement
  bool grants = false;  // the receiver requires write grants (kv_transfer.h)
  bool churn = false;   // block lists after churn instead of random ones
  DataPath data_path = DataPath::AUTO;
  int32_t head_split = 1;  // the receiver holds kHeads / head_split heads; transfers move that slice
  int32_t pool_blocks() const { return churn ? 2048 : 256; }
  int32_t receiver_heads() const { return kvbench::kHeads / head_split; }
};

void die(const std::string& message) {
  std::fprintf(stderr, "kv_transfer_bench: %s\n", message.c_str());
  std::exit(1);
}

#ifdef RTPLLM_BENCH_CUDA
using kvbench::cuda_check;
#endif

// The pool blocks move out of and into (bench_kv_pool.h).
struct Pool : kvbench::KVPool {
  Pool(const Args& args, int32_t block_tokens, int32_t heads = kvbench::kHeads)
      : kvbench::KVPool(args.memory, args.device, args.layers, args.pool_blocks(), block_tokens, heads) {}
};

std::function<void()> device_init(const Args& args) {
#ifdef RTPLLM_BENCH_CUDA
  if (args.memory == MemoryKind::CUDA) return [device = args.device] { cudaSetDevice(device); };
#endif
  (void)args;
  return {};
}

#ifdef RTPLLM_BENCH_CUDA
constexpr bool kCudaBuild = true;
#else
constexpr bool kCudaBuild = false;
#endif

// --data-path direct: both sides get a CudaPeerMemory (the receiver exports, the sender maps).
std::shared_ptr<PeerMemory> peer_memory(const Args& args) {
  if (args.data_path != DataPath::DIRECT) return nullptr;
#ifdef RTPLLM_BENCH_CUDA
  return cuda::make_cuda_peer_memory(args.device);
#else
  return nullptr;
#endif
}

TransferOptions bench_options(const char* name, const Args& args) {
  TransferOptions options;
  options.data_path = args.data_path;
  options.name = name;
  options.identity = "bench";
  options.timeout_s = 60;
  return options;
}

// The receiver: registers its pool, reports its port, serves until the parent closes the pipe.
[[noreturn]] void run_receiver(const Args& args, int32_t block_tokens, int port_fd, int quit_fd) {
  Pool pool(args, block_tokens, args.receiver_heads());
  TransferOptions options = bench_options("receiver", args);
  options.require_write_grants = args.grants;
  UcxTransfer engine(options, device_init(args), peer_memory(args));
  engine.register_kv(pool.layout);
  std::vector<BlockId> every(static_cast<size_t>(args.pool_blocks()));
  std::iota(every.begin(), every.end(), 0);
  engine.grant_writes(1, every);  // the sender's request id
  const int32_t port = engine.listen_port();
  if (write(port_fd, &port, sizeof(port)) != sizeof(port)) die("pipe");
  char byte;
  while (read(quit_fd, &byte, 1) > 0) {
  }
  for (const PeerInfo& peer : engine.peers()) {  // why a run died, from this side
    if (peer.state == PeerState::FAILED && peer.error != "connection closed by peer") {  // not the sender's close
      std::fprintf(stderr, "kv_transfer_bench receiver: %s\n", peer.error.c_str());
    }
  }
  std::exit(0);
}

std::vector<BlockId> random_blocks(int32_t pool_blocks, int32_t count, std::mt19937& rng) {
  std::vector<BlockId> all(static_cast<size_t>(pool_blocks));
  std::iota(all.begin(), all.end(), 0);
  std::shuffle(all.begin(), all.end(), rng);
  all.resize(count);
  return all;
}

double seconds(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

double time_transfers(UcxTransfer& engine, PeerId peer, const TransferRequest& request, bool is_put, int iters) {
  auto once = [&] {
    const TransferHandle handle = is_put ? engine.put(peer, request) : engine.get(peer, request);
    const TransferStatus status = engine.wait(handle, 120);
    if (status.state != TransferState::DONE) die("transfer failed: " + status.error);
  };
  once();  // warm-up: endpoint wire-up, rkey caches
  const auto start = Clock::now();
  for (int i = 0; i < iters; ++i) once();
  return seconds(start) / iters;
}

// The same copies a transfer makes, done locally: the ceiling.
double time_local_copies(const std::vector<CopyOp>& copies, MemoryKind memory, int iters) {
  auto once = [&] {
    if (memory == MemoryKind::CUDA) {
#ifdef RTPLLM_BENCH_CUDA
      for (const CopyOp& c : copies) {
        cuda_check(cudaMemcpyAsync(reinterpret_cast<void*>(c.dst), reinterpret_cast<const void*>(c.src), c.bytes,
                                   cudaMemcpyDeviceToDevice),
                   "cudaMemcpyAsync");
      }
      cuda_check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
#endif
    } else {
      for (const CopyOp& c : copies) {
        std::memcpy(reinterpret_cast<void*>(c.dst), reinterpret_cast<const void*>(c.src), c.bytes);
      }
    }
  };
  once();
  const auto start = Clock::now();
  for (int i = 0; i < iters; ++i) once();
  return seconds(start) / iters;
}

void bench_block_size(const Args& args, int32_t block_tokens) {
  int port_pipe[2], quit_pipe[2];
  if (pipe(port_pipe) != 0 || pipe(quit_pipe) != 0) die("pipe");
  const pid_t child = fork();  // before this process touches CUDA or UCX
  if (child == 0) {
    close(port_pipe[0]);
    close(quit_pipe[1]);
    run_receiver(args, block_tokens, port_pipe[1], quit_pipe[0]);
  }
  close(port_pipe[1]);
  close(quit_pipe[0]);
  int32_t port = 0;
  if (read(port_pipe[0], &port, sizeof(port)) != sizeof(port)) die("the receiver did not start");
  {
    Pool local(args, block_tokens);
    Pool baseline(args, block_tokens, args.receiver_heads());
    UcxTransfer engine(bench_options("sender", args), device_init(args), peer_memory(args));
    engine.register_kv(local.layout);
    const PeerId peer = engine.connect("127.0.0.1", port);
    const DataPath path = engine.peers().front().data_path;
    std::printf("# data path to the receiver: %s\n",
                path == DataPath::RMA ? "rma" : path == DataPath::DIRECT ? "direct" : "messages");
    std::mt19937 rng(7);
    // (label, source blocks, destination blocks) per row.
    struct Lists {
      const char* label;
      std::vector<BlockId> src, dst;
    };
    std::vector<Lists> rows;
    if (args.churn) {
      for (int32_t count : {64, 256}) {
        using kvbench::reservation_after_churn;
        rows.push_back({"old pool", reservation_after_churn<kvbench::LegacyFreeList>(args.pool_blocks(), count, 1),
                        reservation_after_churn<kvbench::LegacyFreeList>(args.pool_blocks(), count, 2)});
        rows.push_back({"BlockPool", reservation_after_churn<kvbench::ChurnPool>(args.pool_blocks(), count, 1),
                        reservation_after_churn<kvbench::ChurnPool>(args.pool_blocks(), count, 2)});
      }
    } else {
      for (int32_t count : {1, 4, 16, 64, 256}) {
        std::vector<BlockId> src = random_blocks(args.pool_blocks(), count, rng);
        rows.push_back({"random", src, random_blocks(args.pool_blocks(), count, rng)});
      }
    }
    for (const Lists& lists : rows) {
      const std::vector<BlockId>& src = lists.src;
      const std::vector<BlockId>& dst = lists.dst;
      const auto count = static_cast<int32_t>(src.size());
      const int64_t tokens = static_cast<int64_t>(count) * block_tokens;
      TransferRequest request{1, src, dst, tokens, -1, true};
      request.num_heads = args.receiver_heads();
      const HeadSlice heads{0, 0, request.num_heads};
      const auto copies = plan_copies(local.layout, baseline.layout,
                                      plan_transfer(local.layout, src, baseline.layout, dst, tokens), -1, heads);
      uint64_t bytes = 0;
      for (const CopyOp& c : copies) bytes += c.bytes;
      const int iters = args.iters > 0 ? args.iters : static_cast<int>(std::clamp<uint64_t>((512u << 20) / bytes, 3, 200));
      const double put_s = time_transfers(engine, peer, request, true, iters);
      const double get_s = time_transfers(engine, peer, request, false, iters);
      const double copy_s = time_local_copies(copies, args.memory, iters);
      const double gb = static_cast<double>(bytes) / 1e9;
      std::printf("%-5s %-10s %6d %6d %9.2f %8zu %9.2f %9.2f %9.2f %8.2f %8.2f %9.1f\n",
                  args.memory == MemoryKind::CUDA ? "cuda" : "host", lists.label, block_tokens, count, bytes / 1048576.0,
                  copies.size(), gb / put_s, gb / get_s, gb / copy_s, copy_s / put_s, copy_s / get_s, put_s * 1e6);
      std::fflush(stdout);
    }
  }
  close(quit_pipe[1]);
  int status = 0;
  waitpid(child, &status, 0);
}

Args parse(int argc, char** argv) {
  Args args;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) die("missing value for " + flag);
      return argv[++i];
    };
    if (flag == "--memory") {
      const std::string m = value();
      if (m != "host" && m != "cuda") die("--memory: host or cuda");
      args.memory = m == "cuda" ? MemoryKind::CUDA : MemoryKind::HOST;
    } else if (flag == "--device") {
      args.device = std::atoi(value().c_str());
    } else if (flag == "--layers") {
      args.layers = std::max(1, std::atoi(value().c_str()));
    } else if (flag == "--iters") {
      args.iters = std::max(1, std::atoi(value().c_str()));
    } else if (flag == "--grants") {
      args.grants = true;
    } else if (flag == "--churn") {
      args.churn = true;
    } else if (flag == "--data-path") {
      const std::string p = value();
      if (p != "auto" && p != "rma" && p != "messages" && p != "direct") die("--data-path: auto, rma, messages or direct");
      args.data_path = p == "rma"        ? DataPath::RMA
                       : p == "messages" ? DataPath::MESSAGES
                       : p == "direct"   ? DataPath::DIRECT
                                         : DataPath::AUTO;
    } else if (flag == "--head-split") {
      args.head_split = std::atoi(value().c_str());
      if (args.head_split < 1 || kvbench::kHeads % args.head_split) die("--head-split: 1, 2, 4 or 8");
    } else {
      die("unknown flag " + flag +
          " (--memory host|cuda, --device D, --layers L, --iters N, --grants, --churn, --data-path auto|rma|messages|direct, "
          "--head-split N)");
    }
  }
  // Checked here, before the receiver forks (and before anything touches CUDA).
  if (args.data_path == DataPath::DIRECT && (!kCudaBuild || args.memory != MemoryKind::CUDA)) {
    die("--data-path direct: needs --memory cuda in a CUDA build");
  }
  return args;
}

}  // namespace
}  // namespace rtpllm

int main(int argc, char** argv) {
  using namespace rtpllm;
  const Args args = parse(argc, argv);
  const char* tls = std::getenv("UCX_TLS");
  std::printf("# KV transfer between two processes, UCX_TLS=%s, %d layers, 2 KiB per token per plane%s\n",
              tls ? tls : "(UCX default)", args.layers, args.grants ? ", receiver requires write grants" : "");
  if (args.head_split > 1) {
    std::printf("# head split %d: the receiver holds %d of the 8 KV heads; each transfer moves that slice\n",
                args.head_split, args.receiver_heads());
  }
  std::printf("# copy = the same copies done locally (%s); ratio = transfer rate / copy rate\n",
              args.memory == MemoryKind::CUDA ? "cudaMemcpyAsync D2D" : "memcpy");
  std::printf("%-5s %-10s %6s %6s %9s %8s %9s %9s %9s %8s %8s %9s\n", "mem", "lists", "block", "blocks", "MiB", "copies",
              "put GB/s", "get GB/s", "copy GB/s", "put/cp", "get/cp", "put us");
  for (int32_t block_tokens : {16, 64}) {
    if (block_tokens == 16 || !args.churn) bench_block_size(args, block_tokens);
  }
  return 0;
}

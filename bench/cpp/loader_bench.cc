// Read throughput of the weight loader on one or more files: O_DIRECT against buffered reads, over
// reader-thread counts. Build with -DRTPLLM_BUILD_BENCH=ON, then
//   build/<dir>/bench/cpp/loader_bench [--threads 1,2,4,8,16] [--chunk-mb 16] [--repeat 2] FILE...
// Each buffered run first reads the files once (so they are cached); each O_DIRECT run first asks
// the kernel to drop their pages (posix_fadvise DONTNEED), so it measures the disk. Bytes are read
// into the staging ring and dropped (a sink that copies nothing), so only the reads are timed.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

#include "rtpllm/core/host_allocator.h"
#include "rtpllm/loader/chunk_sink.h"
#include "rtpllm/loader/weight_loader.h"

namespace {

using namespace rtpllm::loader;
using rtpllm::AlignedHostAllocator;

// Reads only: the chunks are dropped once read.
class DiscardSink final : public ChunkSink {
 public:
  void prepare(size_t) override {}
  void submit(size_t, const ReadChunk&, const uint8_t*) override {}
  void wait(size_t) override {}
  void finish() override {}
};

uint64_t file_size(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    std::perror(path.c_str());
    std::exit(1);
  }
  return static_cast<uint64_t>(st.st_size);
}

void drop_page_cache(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) return;
  ::fdatasync(fd);
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
}

double run(const std::vector<std::string>& files, size_t threads, uint64_t chunk_bytes, DirectIo mode,
           uint64_t* bytes_out, size_t* direct_files) {
  AlignedHostAllocator allocator;
  DiscardSink sink;
  LoaderOptions options;
  options.num_threads = threads;
  options.plan.chunk_bytes = chunk_bytes;
  options.direct_io = mode;
  WeightLoader loader(options, allocator, sink);
  std::vector<TensorRequest> requests;
  uint64_t bytes = 0;
  for (const std::string& path : files) {
    TensorRequest request;  // the whole file as raw bytes
    request.file = path;
    request.row_bytes = request.dst_bytes = file_size(path);
    request.dst = 1;  // never written: the sink drops the chunks
    requests.push_back(request);
    bytes += request.row_bytes;
  }
  const auto start = std::chrono::steady_clock::now();
  const LoadStats stats = loader.start(requests)->finish();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  *bytes_out = bytes;
  *direct_files = stats.direct_files;
  return seconds;
}

std::vector<size_t> parse_list(const std::string& text) {
  std::vector<size_t> out;
  std::stringstream stream(text);
  std::string item;
  while (std::getline(stream, item, ',')) out.push_back(std::stoul(item));
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<size_t> thread_counts = {1, 2, 4, 8, 16};
  uint64_t chunk_mb = 16;
  int repeat = 2;
  std::vector<std::string> files;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--threads" && i + 1 < argc) thread_counts = parse_list(argv[++i]);
    else if (arg == "--chunk-mb" && i + 1 < argc) chunk_mb = std::stoull(argv[++i]);
    else if (arg == "--repeat" && i + 1 < argc) repeat = std::stoi(argv[++i]);
    else files.push_back(arg);
  }
  if (files.empty()) {
    std::fprintf(stderr, "usage: loader_bench [--threads 1,2,4] [--chunk-mb 16] [--repeat 2] FILE...\n");
    return 2;
  }
  std::printf("%-9s %8s %10s %9s %8s\n", "mode", "threads", "GB", "seconds", "GB/s");
  for (const DirectIo mode : {DirectIo::kAlways, DirectIo::kNever}) {
    const char* name = mode == DirectIo::kAlways ? "o_direct" : "buffered";
    for (const size_t threads : thread_counts) {
      double best = 1e30;
      uint64_t bytes = 0;
      size_t direct_files = 0;
      for (int r = 0; r < repeat; ++r) {
        for (const std::string& path : files) {
          if (mode == DirectIo::kAlways) drop_page_cache(path);
        }
        if (mode == DirectIo::kNever && r == 0) run(files, threads, chunk_mb << 20, mode, &bytes, &direct_files);
        best = std::min(best, run(files, threads, chunk_mb << 20, mode, &bytes, &direct_files));
      }
      std::printf("%-9s %8zu %10.2f %9.3f %8.2f%s\n", name, threads, bytes / 1e9, best, bytes / 1e9 / best,
                  mode == DirectIo::kAlways && direct_files < files.size() ? "  (O_DIRECT unsupported: buffered)" : "");
    }
  }
  return 0;
}

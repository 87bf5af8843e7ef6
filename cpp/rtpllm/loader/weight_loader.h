// The pipelined checkpoint reader: several reader threads pull chunks in file order, read each
// with one large aligned read (O_DIRECT or buffered, per file) into a staging buffer of their own
// ring, and hand it to the sink, which copies the pieces to their destinations while the thread
// reads the next chunk into its next buffer.
//
//   WeightLoader loader(options, allocator, sink);
//   auto job = loader.start(requests);   // validates everything, then returns at once
//   while (!job->wait_for(0.1)) report(job->bytes_done(), job->total_bytes());
//   job->finish();                        // rethrows the first error
//
// The loader knows nothing of models: which tensor goes where is the caller's business.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "rtpllm/loader/chunk_file.h"
#include "rtpllm/loader/chunk_sink.h"
#include "rtpllm/core/host_allocator.h"
#include "rtpllm/loader/read_planner.h"
#include "rtpllm/loader/safetensors_header.h"
#include "rtpllm/loader/tensor_request.h"

namespace rtpllm::loader {

struct LoaderOptions {
  size_t num_threads = 8;         // reader threads (fewer when there are fewer chunks)
  size_t buffers_per_thread = 2;  // the ring: one being read while the other is copied out
  ReadPlanOptions plan;
  DirectIo direct_io = DirectIo::kAuto;
};

struct LoadStats {
  uint64_t bytes_copied = 0;   // bytes that reached a destination
  uint64_t bytes_read = 0;     // bytes read from files (holes and alignment included)
  size_t num_chunks = 0;
  size_t num_threads = 0;
  size_t direct_files = 0;     // files read with O_DIRECT (the rest through the page cache)
  size_t num_files = 0;
  double seconds = 0.0;        // from start() to finish()
};

class LoadJob {
 public:
  ~LoadJob();  // stops the readers and waits for them: destinations are never written afterwards
  LoadJob(const LoadJob&) = delete;
  LoadJob& operator=(const LoadJob&) = delete;

  // True once every reader has stopped (done or failed); waits at most `seconds`.
  bool wait_for(double seconds);
  // Waits for the readers and the sink's copies; rethrows the first error (LoadError). Call once.
  LoadStats finish();

  uint64_t bytes_done() const { return bytes_done_.load(std::memory_order_relaxed); }
  uint64_t total_bytes() const { return total_bytes_; }

 private:
  friend class WeightLoader;
  LoadJob() = default;
  void run_reader(size_t thread);
  void fail(std::exception_ptr error);

  LoaderOptions options_;
  ChunkSink* sink_ = nullptr;
  std::vector<uint8_t*> buffers_;  // owned by the WeightLoader, reused by its next job
  std::vector<std::unique_ptr<ChunkFile>> files_;
  std::vector<TensorRequest> requests_;
  std::vector<ReadChunk> chunks_;
  uint64_t total_bytes_ = 0;
  std::atomic<size_t> next_chunk_{0};
  std::atomic<uint64_t> bytes_done_{0};
  std::atomic<uint64_t> bytes_read_{0};
  std::atomic<bool> failed_{false};
  std::mutex mutex_;
  std::condition_variable stopped_cv_;
  size_t stopped_ = 0;
  std::exception_ptr error_;
  std::vector<std::thread> threads_;
  bool finished_ = false;
  double started_ = 0.0;
  std::atomic<bool>* active_ = nullptr;  // the loader's one-job-at-a-time flag, cleared on destruction
};

class WeightLoader {
 public:
  // `allocator` and `sink` must outlive the loader; the loader must outlive its jobs.
  WeightLoader(LoaderOptions options, HostAllocator& allocator, ChunkSink& sink);
  ~WeightLoader();
  WeightLoader(const WeightLoader&) = delete;
  WeightLoader& operator=(const WeightLoader&) = delete;

  // The validated header of a file (read once, then cached). Throws LoadError.
  const SafetensorsHeader& header(const std::string& path);

  // Validates every request against its file's header (throwing LoadError naming the file and
  // the tensor before any byte moves), plans the reads and starts the readers. One job at a time:
  // the previous job must be finished first (its staging buffers are reused).
  std::unique_ptr<LoadJob> start(const std::vector<TensorRequest>& requests);

  const LoaderOptions& options() const { return options_; }

 private:
  LoaderOptions options_;
  HostAllocator& allocator_;
  ChunkSink& sink_;
  std::unordered_map<std::string, SafetensorsHeader> headers_;
  std::vector<uint8_t*> buffers_;
  std::atomic<bool> active_{false};
};

}  // namespace rtpllm::loader

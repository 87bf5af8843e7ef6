#include "rtpllm/loader/weight_loader.h"

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <chrono>
#include <stdexcept>

#include "rtpllm/loader/load_error.h"

namespace rtpllm::loader {
namespace {

uint64_t file_size(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) throw LoadError(LoadErrorKind::kNotFound, path + ": no such file");
    throw LoadError(LoadErrorKind::kIo, path + ": cannot stat (" + std::strerror(errno) + ")");
  }
  return static_cast<uint64_t>(st.st_size);
}

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace

WeightLoader::WeightLoader(LoaderOptions options, HostAllocator& allocator, ChunkSink& sink)
    : options_(options), allocator_(allocator), sink_(sink) {
  if (options_.num_threads == 0) throw std::invalid_argument("num_threads must be at least 1");
  if (options_.buffers_per_thread == 0) throw std::invalid_argument("buffers_per_thread must be at least 1");
  // Staging buffers come aligned to kHostBufferAlignment; O_DIRECT reads need the plan's alignment.
  if (options_.plan.alignment > kHostBufferAlignment)
    throw std::invalid_argument("alignment must be at most " + std::to_string(kHostBufferAlignment) + ", got " +
                                std::to_string(options_.plan.alignment));
  // plan_reads checks the rest of the plan options; fail here rather than at the first load.
  plan_reads({}, options_.plan);
}

WeightLoader::~WeightLoader() {
  for (uint8_t* buffer : buffers_) allocator_.deallocate(buffer);
}

const SafetensorsHeader& WeightLoader::header(const std::string& path) {
  auto it = headers_.find(path);
  if (it == headers_.end()) it = headers_.emplace(path, SafetensorsHeader::read(path)).first;
  return it->second;
}

std::unique_ptr<LoadJob> WeightLoader::start(const std::vector<TensorRequest>& requests) {
  if (active_.load()) throw std::logic_error("WeightLoader: a load is still in progress");
  std::unique_ptr<LoadJob> job(new LoadJob());
  job->options_ = options_;
  job->sink_ = &sink_;
  job->requests_ = requests;
  job->started_ = now_seconds();

  // Files in order of first appearance; spans validated against their headers (or, for raw
  // requests, against the file's size).
  std::unordered_map<std::string, uint32_t> file_index;
  std::vector<TensorInfo> extents;  // per file: the whole file as one raw extent
  std::vector<const SafetensorsHeader*> headers;  // per file; nullptr for files read raw only
  std::vector<ReadSpan> spans;
  for (size_t r = 0; r < requests.size(); ++r) {
    const TensorRequest& request = requests[r];
    auto [it, added] = file_index.emplace(request.file, static_cast<uint32_t>(headers.size()));
    const uint32_t f = it->second;
    if (added) {
      headers.push_back(request.tensor.empty() ? nullptr : &header(request.file));
      TensorInfo whole;
      whole.offset = 0;
      whole.nbytes = headers.back() ? headers.back()->file_size() : file_size(request.file);
      extents.push_back(whole);
    } else if (!request.tensor.empty() && headers[f] == nullptr) {
      headers[f] = &header(request.file);
    }
    if (request.tensor.empty()) append_spans(request, extents[f], f, static_cast<uint32_t>(r), spans);
    else append_spans(request, *headers[f], f, static_cast<uint32_t>(r), spans);
  }
  for (const ReadSpan& span : spans) job->total_bytes_ += span.bytes;
  job->chunks_ = plan_reads(std::move(spans), options_.plan);
  std::vector<std::string> paths(file_index.size());
  for (const auto& [path, f] : file_index) paths[f] = path;
  for (uint32_t f = 0; f < paths.size(); ++f)
    job->files_.push_back(std::make_unique<ChunkFile>(paths[f], extents[f].nbytes, options_.direct_io));

  const size_t threads = std::max<size_t>(1, std::min(options_.num_threads, job->chunks_.size()));
  const size_t slots = threads * options_.buffers_per_thread;
  while (buffers_.size() < slots)
    buffers_.push_back(static_cast<uint8_t*>(allocator_.allocate(options_.plan.chunk_bytes)));
  job->buffers_.assign(buffers_.begin(), buffers_.begin() + static_cast<std::ptrdiff_t>(slots));
  sink_.prepare(slots);

  active_.store(true);
  job->active_ = &active_;
  if (job->chunks_.empty()) {
    return job;  // nothing to read: finish() returns at once
  }
  for (size_t t = 0; t < threads; ++t) job->threads_.emplace_back([raw = job.get(), t] { raw->run_reader(t); });
  return job;
}

void LoadJob::fail(std::exception_ptr error) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!error_) error_ = error;
  failed_.store(true);
}

void LoadJob::run_reader(size_t thread) {
  const size_t depth = options_.buffers_per_thread;
  size_t used = 0;  // chunks this thread has read (selects the ring slot)
  try {
    while (!failed_.load(std::memory_order_relaxed)) {
      const size_t index = next_chunk_.fetch_add(1);
      if (index >= chunks_.size()) break;
      const ReadChunk& chunk = chunks_[index];
      const size_t slot = thread * depth + used % depth;
      sink_->wait(slot);  // the copy out of this buffer (two chunks ago) has finished
      try {
        files_[chunk.file]->read(chunk.offset, chunk.bytes, chunk.needed, buffers_[slot]);
      } catch (const LoadError& e) {
        const std::string& tensor = requests_[chunk.pieces.front().request].tensor;
        throw LoadError(e.kind(), std::string(e.what()) + " (while reading tensor " + tensor + ")");
      }
      sink_->submit(slot, chunk, buffers_[slot]);
      uint64_t copied = 0;
      for (const CopyPiece& piece : chunk.pieces) copied += piece.bytes;
      bytes_done_.fetch_add(copied, std::memory_order_relaxed);
      bytes_read_.fetch_add(chunk.bytes, std::memory_order_relaxed);
      ++used;
    }
  } catch (...) {
    fail(std::current_exception());
  }
  // The buffers are reused by the next job (or freed): no copy may still read them.
  for (size_t k = 0; k < std::min(used, depth); ++k) {
    try {
      sink_->wait(thread * depth + k);
    } catch (...) {
      fail(std::current_exception());
    }
  }
  std::lock_guard<std::mutex> lock(mutex_);
  ++stopped_;
  stopped_cv_.notify_all();
}

bool LoadJob::wait_for(double seconds) {
  std::unique_lock<std::mutex> lock(mutex_);
  return stopped_cv_.wait_for(lock, std::chrono::duration<double>(seconds),
                              [this] { return stopped_ == threads_.size(); });
}

LoadStats LoadJob::finish() {
  if (finished_) throw std::logic_error("LoadJob::finish called twice");
  finished_ = true;
  for (std::thread& t : threads_) t.join();
  if (!error_) {
    try {
      sink_->finish();
    } catch (...) {
      fail(std::current_exception());
    }
  }
  if (active_ != nullptr) active_->store(false);
  active_ = nullptr;
  if (error_) std::rethrow_exception(error_);
  LoadStats stats;
  stats.bytes_copied = bytes_done_.load();
  stats.bytes_read = bytes_read_.load();
  stats.num_chunks = chunks_.size();
  stats.num_threads = threads_.size();
  stats.num_files = files_.size();
  for (const auto& file : files_) stats.direct_files += file->direct() ? 1 : 0;
  stats.seconds = now_seconds() - started_;
  return stats;
}

LoadJob::~LoadJob() {
  failed_.store(true);  // readers stop after their current chunk
  for (std::thread& t : threads_)
    if (t.joinable()) t.join();
  if (!finished_) {
    try {
      sink_->finish();  // destinations may be freed after this: no copy may still be in flight
    } catch (...) {
    }
  }
  if (active_ != nullptr) active_->store(false);
}

}  // namespace rtpllm::loader

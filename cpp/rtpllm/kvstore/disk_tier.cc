#include "rtpllm/kvstore/disk_tier.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <utility>

#include "rtpllm/kvstore/disk_block_file.h"

namespace rtpllm {
namespace {

constexpr size_t kMaxPendingLatencies = 4096;
constexpr size_t kMaxRecentWarnings = 64;

}  // namespace

void DiskTierOptions::validate() const {
  if (directory.empty()) throw std::invalid_argument("DiskTierOptions.directory must not be empty");
  if (capacity_bytes <= 0) throw std::invalid_argument("DiskTierOptions.capacity_bytes must be positive");
  if (writer_threads < 1) throw std::invalid_argument("DiskTierOptions.writer_threads must be at least 1");
  if (reader_threads < 1) throw std::invalid_argument("DiskTierOptions.reader_threads must be at least 1");
  if (max_queued_writes < 1) throw std::invalid_argument("DiskTierOptions.max_queued_writes must be at least 1");
  if (load_chunk_blocks < 1) throw std::invalid_argument("DiskTierOptions.load_chunk_blocks must be at least 1");
}

DiskTier::DiskTier(std::shared_ptr<KVCopyEngine> engine, DiskTierOptions options, KVStoreLogger logger)
    : engine_(std::move(engine)),
      options_(std::move(options)),
      logger_(logger ? std::move(logger) : default_kvstore_logger()),
      payload_bytes_(engine_ ? static_cast<size_t>(engine_->layout().bytes_per_block()) : 0),
      file_bytes_(disk_block_file_bytes(payload_bytes_)) {
  if (!engine_) throw std::invalid_argument("DiskTier: null copy engine");
  options_.validate();
  stats_.name = name();
  stats_.capacity_blocks = static_cast<uint64_t>(options_.capacity_bytes) / file_bytes_;
  scan_directory();
  if (static_cast<size_t>(options_.capacity_bytes) < file_bytes_) {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_writes("capacity_bytes " + std::to_string(options_.capacity_bytes) + " is less than one block file (" +
                std::to_string(file_bytes_) + " bytes)");
  }
  for (int32_t i = 0; i < options_.writer_threads; ++i) write_staging_.emplace_back(engine_->host_allocator(), file_bytes_);
  for (int32_t i = 0; i < 2 * options_.reader_threads * options_.load_chunk_blocks; ++i) {
    read_staging_.emplace_back(engine_->host_allocator(), file_bytes_);
    free_staging_.push_back(read_staging_.back().data());
  }
  for (HostBuffer& staging : write_staging_) threads_.emplace_back([this, data = staging.data()] { writer_loop(data); });
  for (int32_t i = 0; i < options_.reader_threads; ++i) threads_.emplace_back([this] { reader_loop(); });
  completion_thread_ = std::thread([this] { completion_loop(); });
}

DiskTier::~DiskTier() {
  std::deque<WriteJob> dropped;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
    dropped.swap(write_queue_);
    for (WriteJob& job : dropped) {
      writing_.erase(job.hash);
      if (job.save) finish_save_copy(job.save, false);
    }
    for (LoadJob& job : load_queue_) finish_chunk(job, false);
    load_queue_.clear();
    queued_load_blocks_ = 0;
  }
  for (WriteJob& job : dropped) {
    if (job.release) job.release();
  }
  write_cv_.notify_all();
  load_cv_.notify_all();
  staging_cv_.notify_all();
  for (std::thread& thread : threads_) thread.join();
  {
    // Readers are gone: the completion thread waits for the copies they submitted, then ends.
    std::lock_guard<std::mutex> lock(mutex_);
    readers_stopped_ = true;
  }
  copies_cv_.notify_all();
  completion_thread_.join();
}

void DiskTier::warn(const std::string& message) {
  logger_(message);
  std::lock_guard<std::mutex> lock(warnings_mutex_);
  if (recent_warnings_.size() == kMaxRecentWarnings) recent_warnings_.pop_front();
  recent_warnings_.push_back(message);
}

std::vector<std::string> DiskTier::take_warnings() {
  std::lock_guard<std::mutex> lock(warnings_mutex_);
  std::vector<std::string> warnings(recent_warnings_.begin(), recent_warnings_.end());
  recent_warnings_.clear();
  return warnings;
}

std::string DiskTier::path_of(BlockHash hash) const { return options_.directory + "/" + block_file_name(hash); }

TransferHandle DiskTier::add_handle(std::shared_ptr<Status> status) {
  const TransferHandle handle = next_handle_++;
  handles_.emplace(handle, std::move(status));
  return handle;
}

int32_t DiskTier::match(const std::vector<BlockHash>& hashes) {
  std::lock_guard<std::mutex> lock(mutex_);
  int32_t hits = 0;
  while (hits < static_cast<int32_t>(hashes.size()) && index_.count(hashes[static_cast<size_t>(hits)]) != 0) ++hits;
  ++stats_.queries;
  stats_.query_blocks += hashes.size();
  stats_.hit_blocks += static_cast<uint64_t>(hits);
  return hits;
}

bool DiskTier::contains(BlockHash hash) {
  std::lock_guard<std::mutex> lock(mutex_);
  return index_.count(hash) != 0;
}

TransferHandle DiskTier::load(const std::vector<BlockHash>& hashes, const std::vector<BlockId>& gpu_blocks) {
  if (hashes.size() != gpu_blocks.size()) {
    throw std::invalid_argument("DiskTier: " + std::to_string(hashes.size()) + " hashes but " +
                                std::to_string(gpu_blocks.size()) + " gpu_blocks");
  }
  check_pool_blocks(engine_->layout(), gpu_blocks);

  auto status = std::make_shared<Status>();
  status->is_load = true;
  status->start = std::chrono::steady_clock::now();
  std::lock_guard<std::mutex> lock(mutex_);
  bool all_present = true;
  for (BlockHash hash : hashes) all_present = all_present && index_.count(hash) != 0;
  if (!all_present || stopping_) {
    status->state = TransferState::FAILED;  // evicted since match(): the caller recomputes
  } else if (hashes.empty()) {
    status->state = TransferState::DONE;
  } else {
    for (BlockHash hash : hashes) ++index_.at(hash).readers;
    auto group = std::make_shared<LoadGroup>();
    group->hashes = hashes;
    group->gpu_blocks = gpu_blocks;
    group->status = status;
    const size_t chunk = static_cast<size_t>(options_.load_chunk_blocks);
    for (size_t first = 0; first < hashes.size(); first += chunk) {
      load_queue_.push_back(LoadJob{group, first, std::min(chunk, hashes.size() - first)});
      ++group->chunks_left;
    }
    queued_load_blocks_ += hashes.size();
    load_cv_.notify_all();
  }
  return add_handle(std::move(status));
}

TransferHandle DiskTier::save(const std::vector<BlockHash>& hashes, const std::vector<BlockId>& gpu_blocks) {
  if (hashes.size() != gpu_blocks.size()) {
    throw std::invalid_argument("DiskTier: " + std::to_string(hashes.size()) + " hashes but " +
                                std::to_string(gpu_blocks.size()) + " gpu_blocks");
  }
  check_pool_blocks(engine_->layout(), gpu_blocks);

  auto status = std::make_shared<Status>();
  status->start = std::chrono::steady_clock::now();
  std::lock_guard<std::mutex> lock(mutex_);
  for (size_t i = 0; i < hashes.size(); ++i) {
    if (!writes_enabled_ || static_cast<int32_t>(write_queue_.size()) >= options_.max_queued_writes) break;
    if (index_.count(hashes[i]) != 0 || !writing_.insert(hashes[i]).second) continue;
    WriteJob job;
    job.hash = hashes[i];
    job.pool_block = gpu_blocks[i];
    job.save = status;
    write_queue_.push_back(std::move(job));
    ++status->remaining;
  }
  if (status->remaining == 0) status->state = TransferState::DONE;
  write_cv_.notify_all();
  return add_handle(std::move(status));
}

bool DiskTier::offer(BlockHash hash, const uint8_t* data, std::function<void()> release) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!writes_enabled_ || stopping_ || static_cast<int32_t>(write_queue_.size()) >= options_.max_queued_writes) return false;
    if (index_.count(hash) != 0 || !writing_.insert(hash).second) return false;
    WriteJob job;
    job.hash = hash;
    job.host = data;
    job.release = std::move(release);
    write_queue_.push_back(std::move(job));
  }
  write_cv_.notify_one();
  return true;
}

TransferState DiskTier::poll(TransferHandle handle) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = handles_.find(handle);
  if (it == handles_.end()) throw std::invalid_argument("DiskTier: unknown transfer handle " + std::to_string(handle));
  const Status& status = *it->second;
  const TransferState state = status.state;
  if (state == TransferState::PENDING) return state;
  if (status.is_load && state == TransferState::FAILED) ++stats_.failed_loads;
  if (status.is_load && state == TransferState::DONE && stats_.load_latency_s.size() < kMaxPendingLatencies) {
    stats_.load_latency_s.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - status.start).count());
  }
  handles_.erase(it);
  return state;
}

void DiskTier::cancel(TransferHandle handle) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = handles_.find(handle);
  if (it != handles_.end() && it->second->is_load) it->second->cancelled = true;
}

std::vector<KVTierStats> DiskTier::stats() {
  std::lock_guard<std::mutex> lock(mutex_);
  KVTierStats stats = stats_;
  stats.used_blocks = index_.size();
  stats.enabled = writes_enabled_;
  stats_.load_latency_s.clear();
  return {stats};
}

void DiskTier::flush() {
  std::unique_lock<std::mutex> lock(mutex_);
  idle_cv_.wait(lock, [&] { return write_queue_.empty() && writes_in_progress_ == 0; });
}

int64_t DiskTier::used_bytes() {
  std::lock_guard<std::mutex> lock(mutex_);
  return used_bytes_;
}

void DiskTier::set_event_log(KVEventLog* log) {
  std::lock_guard<std::mutex> lock(mutex_);
  events_ = log;
}

void DiskTier::held_blocks(std::vector<KVEvent>& out) {
  std::lock_guard<std::mutex> lock(mutex_);
  for (const auto& [hash, entry] : index_) out.push_back(KVEvent{hash, KVEventKind::kStored, KVTier::kDisk});
}

// ---- index (mutex_ held) ----

void DiskTier::insert_entry(BlockHash hash) {
  Entry entry;
  entry.lru_pos = lru_.insert(lru_.end(), hash);
  index_.emplace(hash, entry);
  if (events_ != nullptr) events_->record(KVEventKind::kStored, KVTier::kDisk, hash);
}

void DiskTier::remove_entry(BlockHash hash, bool delete_file) {
  auto it = index_.find(hash);
  if (it == index_.end()) return;
  lru_.erase(it->second.lru_pos);
  index_.erase(it);
  if (events_ != nullptr) events_->record(KVEventKind::kRemoved, KVTier::kDisk, hash);
  used_bytes_ -= static_cast<int64_t>(file_bytes_);
  // Under the lock, so that a writer cannot put a new file under this name in between.
  if (delete_file) ::unlink(path_of(hash).c_str());
}

bool DiskTier::reserve_bytes(std::unique_lock<std::mutex>&) {
  auto candidate = lru_.begin();
  while (used_bytes_ + static_cast<int64_t>(file_bytes_) > options_.capacity_bytes && candidate != lru_.end()) {
    const BlockHash hash = *candidate++;
    if (index_.at(hash).readers > 0) continue;  // a pending load will read it
    remove_entry(hash, true);
    ++stats_.evicted_blocks;
  }
  if (used_bytes_ + static_cast<int64_t>(file_bytes_) > options_.capacity_bytes) return false;
  used_bytes_ += static_cast<int64_t>(file_bytes_);
  return true;
}

void DiskTier::stop_writes(const std::string& why) {
  if (!writes_enabled_) return;
  writes_enabled_ = false;
  warn("disk tier " + options_.directory + ": writes stopped (" + why + "); cached blocks are still served");
}

void DiskTier::finish_save_copy(const std::shared_ptr<Status>& save, bool ok) {
  if (!ok) save->state = TransferState::FAILED;
  if (--save->remaining == 0 && save->state == TransferState::PENDING) save->state = TransferState::DONE;
}

// ---- writers ----

bool DiskTier::writers_may_run() const {
  const bool reading = !load_queue_.empty() || reads_in_progress_ > 0;
  return !reading || 2 * static_cast<int32_t>(write_queue_.size()) >= options_.max_queued_writes;
}

void DiskTier::writer_loop(uint8_t* staging) {
  std::unique_lock<std::mutex> lock(mutex_);
  while (true) {
    write_cv_.wait(lock, [&] { return stopping_ || (!write_queue_.empty() && writers_may_run()); });
    if (stopping_) return;
    WriteJob job = std::move(write_queue_.front());
    write_queue_.pop_front();
    ++writes_in_progress_;
    lock.unlock();
    write_block(job, staging);
    lock.lock();
    --writes_in_progress_;
    idle_cv_.notify_all();
  }
}

void DiskTier::write_block(WriteJob& job, uint8_t* staging) {
  uint8_t* payload = staging + kDiskBlockHeaderBytes;
  bool copied = true;
  if (job.host != nullptr) {
    std::memcpy(payload, job.host, payload_bytes_);
    job.release();  // the host tier may evict or reuse its buffer from here on
  } else {
    const CopyTicket ticket = engine_->submit(CopyDirection::POOL_TO_HOST, {BlockCopy{job.pool_block, payload}});
    copied = engine_->wait(ticket) == TransferState::DONE;
    std::lock_guard<std::mutex> lock(mutex_);
    finish_save_copy(job.save, copied);  // the caller may now reuse its GPU block
  }
  std::unique_lock<std::mutex> lock(mutex_);
  if (!copied || !writes_enabled_ || !reserve_bytes(lock)) {
    writing_.erase(job.hash);
    return;
  }
  const std::string path = path_of(job.hash);
  const std::string temp = path + "." + std::to_string(::getpid()) + "." + std::to_string(write_sequence_++) + ".tmp";
  lock.unlock();

  seal_block_file(staging, options_.cache_identity, job.hash, payload_bytes_);
  int error = write_whole_file(temp, staging, file_bytes_);
  if (error == 0 && ::rename(temp.c_str(), path.c_str()) != 0) error = errno;
  if (error != 0) ::unlink(temp.c_str());

  lock.lock();
  writing_.erase(job.hash);
  if (error != 0) {
    used_bytes_ -= static_cast<int64_t>(file_bytes_);
    const bool full = error == ENOSPC || error == EDQUOT;
    stop_writes(std::string(full ? "disk full: " : "write error: ") + std::strerror(error));
    return;
  }
  insert_entry(job.hash);
  ++stats_.saved_blocks;
  stats_.save_bytes += payload_bytes_;
}

void DiskTier::check_invariants() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (index_.size() != lru_.size()) throw std::logic_error("DiskTier: index and LRU list sizes differ");
  for (BlockHash hash : lru_) {
    if (index_.count(hash) == 0) throw std::logic_error("DiskTier: LRU list names a block missing from the index");
  }
  const int64_t in_progress_bytes = used_bytes_ - static_cast<int64_t>(index_.size() * file_bytes_);
  if (in_progress_bytes < 0 || in_progress_bytes > static_cast<int64_t>(writes_in_progress_) * static_cast<int64_t>(file_bytes_)) {
    throw std::logic_error("DiskTier: used bytes disagree with the index");
  }
  if (used_bytes_ > options_.capacity_bytes) throw std::logic_error("DiskTier: over capacity");
}

}  // namespace rtpllm

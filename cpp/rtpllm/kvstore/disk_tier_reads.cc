// DiskTier's read path: reader threads read and verify chunks of loads into staging buffers and
// submit their copies into the pool; one completion thread waits for those copies in order and
// ends the chunks (see disk_tier.h).
#include <algorithm>
#include <cstring>
#include <exception>
#include <string>
#include <utility>

#include "rtpllm/kvstore/disk_block_file.h"
#include "rtpllm/kvstore/disk_tier.h"

namespace rtpllm {
namespace {

constexpr double kReadTimeWeight = 0.2;  // of the newest chunk in the moving average

}  // namespace

void DiskTier::reader_loop() {
  std::unique_lock<std::mutex> lock(mutex_);
  while (true) {
    load_cv_.wait(lock, [&] { return stopping_ || !load_queue_.empty(); });
    if (stopping_) return;
    LoadJob job = std::move(load_queue_.front());
    load_queue_.pop_front();
    queued_load_blocks_ -= job.count;
    ++reads_in_progress_;
    // Staging buffers come back as copies end; a reader never holds more than one chunk's worth.
    staging_cv_.wait(lock, [&] { return stopping_ || free_staging_.size() >= job.count; });
    if (stopping_) {
      --reads_in_progress_;
      finish_chunk(job, false);
      return;
    }
    std::vector<uint8_t*> staging(free_staging_.end() - static_cast<std::ptrdiff_t>(job.count), free_staging_.end());
    free_staging_.resize(free_staging_.size() - job.count);
    lock.unlock();

    const auto start = std::chrono::steady_clock::now();
    std::vector<BlockCopy> copies;
    bool ok = read_chunk(job, staging, copies);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    CopyTicket ticket = 0;
    if (ok) {
      try {
        ticket = engine_->submit(CopyDirection::HOST_TO_POOL, copies);
      } catch (const std::exception& e) {
        warn(std::string("disk tier: copy into the pool refused: ") + e.what());
        ok = false;
      }
    }

    lock.lock();
    --reads_in_progress_;
    if (ok) {
      const double per_block = seconds / static_cast<double>(job.count);
      read_seconds_per_block_ = read_seconds_per_block_ == 0
                                    ? per_block
                                    : (1 - kReadTimeWeight) * read_seconds_per_block_ + kReadTimeWeight * per_block;
      copies_in_flight_.push_back(ChunkCopy{std::move(job), ticket, std::move(staging)});
      copies_cv_.notify_one();
    } else {
      free_staging_.insert(free_staging_.end(), staging.begin(), staging.end());
      staging_cv_.notify_all();
      finish_chunk(job, false);
    }
    if (load_queue_.empty() && reads_in_progress_ == 0) write_cv_.notify_all();  // writers yielded to us
  }
}

void DiskTier::completion_loop() {
  std::unique_lock<std::mutex> lock(mutex_);
  while (true) {
    copies_cv_.wait(lock, [&] { return readers_stopped_ || !copies_in_flight_.empty(); });
    if (copies_in_flight_.empty()) return;  // readers_stopped_ and nothing left to wait for
    ChunkCopy copy = std::move(copies_in_flight_.front());
    copies_in_flight_.pop_front();
    lock.unlock();
    const bool ok = engine_->wait(copy.ticket) == TransferState::DONE;  // copies end in submission order
    lock.lock();
    free_staging_.insert(free_staging_.end(), copy.staging.begin(), copy.staging.end());
    staging_cv_.notify_all();
    finish_chunk(copy.job, ok);
  }
}

void DiskTier::finish_chunk(const LoadJob& job, bool ok) {
  LoadGroup& group = *job.group;
  if (!ok) group.failed = true;
  if (--group.chunks_left > 0) return;
  // The last chunk: nothing copies into the load's GPU blocks any more.
  for (BlockHash hash : group.hashes) {
    auto it = index_.find(hash);
    if (it == index_.end()) continue;  // dropped as broken meanwhile
    if (it->second.readers > 0) --it->second.readers;
    if (!group.failed) lru_.splice(lru_.end(), lru_, it->second.lru_pos);  // most recently used
  }
  if (!group.failed) {
    stats_.loaded_blocks += group.hashes.size();
    stats_.load_bytes += group.hashes.size() * payload_bytes_;
  }
  group.status->state = group.failed ? TransferState::FAILED : TransferState::DONE;
}

bool DiskTier::read_chunk(const LoadJob& job, const std::vector<uint8_t*>& staging, std::vector<BlockCopy>& copies) {
  const LoadGroup& group = *job.group;
  for (size_t i = 0; i < job.count; ++i) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (group.failed || group.status->cancelled || stopping_) return false;  // nothing touched the GPU yet
    }
    const BlockHash hash = group.hashes[job.first + i];
    uint8_t* file = staging[i];
    size_t file_size = 0;
    const int error = read_file_prefix(path_of(hash), file, file_bytes_, &file_size);
    const DiskBlockCheck check =
        error != 0 ? DiskBlockCheck::TRUNCATED : check_block_file(file, file_size, options_.cache_identity, hash, payload_bytes_);
    if (check != DiskBlockCheck::OK) {
      const std::string why = error != 0 ? std::string("cannot read: ") + std::strerror(error) : to_string(check);
      warn("disk tier: block file " + path_of(hash) + " is unusable (" + why + "); treated as a miss");
      std::lock_guard<std::mutex> lock(mutex_);
      // Ours and broken: delete it. A foreign file under our name is left alone.
      remove_entry(hash, check != DiskBlockCheck::FOREIGN && error == 0);
      return false;
    }
    copies.push_back(BlockCopy{group.gpu_blocks[job.first + i], file + kDiskBlockHeaderBytes});
  }
  return true;
}

double DiskTier::expected_load_seconds(int32_t num_blocks) {
  std::lock_guard<std::mutex> lock(mutex_);
  // Readers share the queue: blocks ahead of ours and ours are read reader_threads at a time. The
  // per-block time was measured under whatever concurrency (and disk contention) reads saw.
  const double blocks = static_cast<double>(queued_load_blocks_) + std::max(num_blocks, 0);
  return blocks * read_seconds_per_block_ / static_cast<double>(options_.reader_threads);
}

}  // namespace rtpllm

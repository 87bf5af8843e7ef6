// The local-disk tier: one file per block (disk_block_file.h) in a directory, within a byte
// capacity, evicted least recently used first. Survives restarts: the index is rebuilt at
// construction by scanning the directory.
//
// Writes come from the host tier (offer(): write-through of every block it saved) or straight from
// the GPU pool (save(), for a disk-only setup), and run on writer threads: a block is copied into
// a page-aligned staging buffer, sealed with its header and checksum and written as one large
// O_DIRECT write (buffered where the file system refuses O_DIRECT, e.g. tmpfs) under a temporary
// name, then renamed. Writers yield to loads: while a load is being read they wait, unless the
// write queue is half full (then writing is the lesser evil than refusing blocks).
//
// Loads are cut into chunks that reader threads serve in parallel (one block file is one O_DIRECT
// read; several readers keep several reads in flight, and each verifies the blocks it read, so
// verification runs in parallel too). A chunk is read into staging buffers from a shared pool,
// verified (header, size, checksum), and its copy into the GPU blocks is submitted without waiting:
// the reader goes on with the next chunk while a completion thread waits for the copies (which on
// CUDA also wait for the forward pass in flight) and hands their staging buffers back. A disk hit
// goes disk -> staging -> GPU, never through the host tier. A truncated, corrupt or foreign file is
// a miss (at the scan) or a FAILED load (found at load time: the scheduler recomputes), with one
// warning, and our broken files are deleted.
//
// The tier measures its reads (seconds per block, per reader, under the load it saw) and offers an
// estimate of how long a new load would take behind the loads already queued
// (expected_load_seconds), so that the coordinator can skip the disk when recomputing is faster.
//
// A full disk (ENOSPC, EDQUOT), any other write error, or a capacity below one block file stops
// writes for good, with one warning; stats().enabled then reads false. The tier keeps serving
// the blocks it holds (match and load still work): `enabled` means "accepting writes".
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "rtpllm/kvstore/copy_engine.h"
#include "rtpllm/kvstore/kv_store_tier.h"

namespace rtpllm {

struct DiskTierOptions {
  std::string directory;         // created if missing
  int64_t capacity_bytes = 0;    // of block files, headers and padding included
  uint64_t cache_identity = 0;   // every file carries it; files of another identity are ignored
  int32_t writer_threads = 2;
  int32_t reader_threads = 8;       // chunks of loads read (and verified) in parallel (NVMe wants several in flight)
  int32_t max_queued_writes = 256;  // offers and saves beyond this many waiting writes are refused
  int32_t load_chunk_blocks = 2;    // blocks read (and staged in host memory) per copy into the pool

  // Throws std::invalid_argument naming the bad field.
  void validate() const;
};

class DiskTier final : public KVStoreTier, public KVBlockSink {
 public:
  // Scans options.directory (see above). Throws std::invalid_argument for bad options and
  // std::runtime_error if the directory cannot be created or read. logger: nullptr for stderr.
  DiskTier(std::shared_ptr<KVCopyEngine> engine, DiskTierOptions options, KVStoreLogger logger = nullptr);
  // Drops queued writes (releasing their host buffers), fails queued loads, finishes the I/O in
  // progress (one block per writer, one chunk per reader) and joins the threads.
  ~DiskTier() override;

  std::string name() const override { return "disk"; }
  int32_t match(const std::vector<BlockHash>& hashes) override;
  TransferHandle load(const std::vector<BlockHash>& hashes, const std::vector<BlockId>& gpu_blocks) override;
  TransferHandle save(const std::vector<BlockHash>& hashes, const std::vector<BlockId>& gpu_blocks) override;
  TransferState poll(TransferHandle handle) override;
  std::vector<KVTierStats> stats() override;
  bool contains(BlockHash hash) override;
  void cancel(TransferHandle handle) override;
  bool offer(BlockHash hash, const uint8_t* data, std::function<void()> release) override;
  // Stored: a block whose file is written (or was found on disk at start); removed: one evicted or
  // dropped (corrupt, unreadable).
  void set_event_log(KVEventLog* log) override;
  void held_blocks(std::vector<KVEvent>& out) override;

  // Blocks until every accepted write has been written (or dropped). For tests and shutdown paths.
  void flush();
  int64_t used_bytes();
  // The warnings logged since the last call (at most the latest 64), for callers that report them
  // their own way (the Python engine's logger).
  std::vector<std::string> take_warnings();
  int64_t file_bytes_per_block() const { return static_cast<int64_t>(file_bytes_); }
  // How long a load of num_blocks submitted now would take, behind the blocks already queued for
  // reading, from the read times measured so far (0 before the first read: optimistic).
  double expected_load_seconds(int32_t num_blocks) override;
  // Index, LRU list and byte count agree; throws std::logic_error otherwise. For tests.
  void check_invariants();

 private:
  struct Status {  // of one load or save handle; guarded by mutex_
    bool is_load = false;
    TransferState state = TransferState::PENDING;
    int32_t remaining = 0;  // saves: blocks not yet copied out of the pool
    bool cancelled = false;
    std::chrono::steady_clock::time_point start;
  };
  struct Entry {
    std::list<BlockHash>::iterator lru_pos;
    int32_t readers = 0;  // pending loads that will read the file: not evictable meanwhile
  };
  struct WriteJob {
    BlockHash hash = 0;
    const uint8_t* host = nullptr;  // offer(): the upper tier's buffer, until release()
    std::function<void()> release;
    BlockId pool_block = -1;  // save(): copied out of the pool by the writer
    std::shared_ptr<Status> save;
  };
  struct LoadGroup {  // one load(); its chunks are read by any reader thread, in parallel
    std::vector<BlockHash> hashes;
    std::vector<BlockId> gpu_blocks;
    std::shared_ptr<Status> status;
    size_t chunks_left = 0;  // guarded by mutex_
    bool failed = false;     // guarded by mutex_: a chunk failed or was cancelled; skip the rest
  };
  struct LoadJob {  // one chunk: at most load_chunk_blocks blocks, one copy into the pool
    std::shared_ptr<LoadGroup> group;
    size_t first = 0;
    size_t count = 0;
  };
  struct ChunkCopy {  // a verified chunk whose copy into the pool was submitted
    LoadJob job;
    CopyTicket ticket = 0;
    std::vector<uint8_t*> staging;  // back to free_staging_ once the copy ended
  };

  void scan_directory();
  void writer_loop(uint8_t* staging);
  void reader_loop();
  void completion_loop();
  void write_block(WriteJob& job, uint8_t* staging);
  bool read_chunk(const LoadJob& job, const std::vector<uint8_t*>& staging, std::vector<BlockCopy>& copies);
  void finish_chunk(const LoadJob& job, bool ok);                       // mutex_ held
  bool writers_may_run() const;                                         // mutex_ held
  void finish_save_copy(const std::shared_ptr<Status>& save, bool ok);  // mutex_ held
  bool reserve_bytes(std::unique_lock<std::mutex>& lock);               // mutex_ held
  void insert_entry(BlockHash hash);                                    // mutex_ held
  void remove_entry(BlockHash hash, bool delete_file);                  // mutex_ held
  void stop_writes(const std::string& why);                             // mutex_ held
  std::string path_of(BlockHash hash) const;
  void warn(const std::string& message);  // to the logger and take_warnings()
  TransferHandle add_handle(std::shared_ptr<Status> status);

  const std::shared_ptr<KVCopyEngine> engine_;
  const DiskTierOptions options_;
  const KVStoreLogger logger_;
  const size_t payload_bytes_;
  const size_t file_bytes_;

  std::mutex mutex_;  // guards everything below
  std::condition_variable write_cv_;
  std::condition_variable load_cv_;
  std::condition_variable idle_cv_;
  KVEventLog* events_ = nullptr;
  std::unordered_map<BlockHash, Entry> index_;
  std::list<BlockHash> lru_;                 // every indexed block; front = least recently used
  std::unordered_set<BlockHash> writing_;    // accepted writes not yet in the index
  std::deque<WriteJob> write_queue_;
  std::deque<LoadJob> load_queue_;
  size_t queued_load_blocks_ = 0;  // blocks of load_queue_
  int32_t reads_in_progress_ = 0;  // chunks being read and verified
  std::vector<uint8_t*> free_staging_;  // file images for readers
  std::condition_variable staging_cv_;
  std::deque<ChunkCopy> copies_in_flight_;  // submitted copies, oldest first
  std::condition_variable copies_cv_;
  bool readers_stopped_ = false;  // the completion thread drains copies_in_flight_, then ends
  double read_seconds_per_block_ = 0;  // moving average of one reader's time per block (read + verify)
  std::unordered_map<TransferHandle, std::shared_ptr<Status>> handles_;
  int32_t writes_in_progress_ = 0;
  int64_t used_bytes_ = 0;  // indexed files + writes in progress
  bool writes_enabled_ = true;
  bool stopping_ = false;
  TransferHandle next_handle_ = 1;
  uint64_t write_sequence_ = 0;  // names temporary files
  KVTierStats stats_;

  // Allocated up front (pinned on CUDA builds), so that running out of memory is an error of the
  // constructor and never of a background thread.
  std::vector<HostBuffer> write_staging_;  // one file image per writer thread
  std::vector<HostBuffer> read_staging_;  // 2 x load_chunk_blocks file images per reader: one chunk read while one copies
  std::vector<std::thread> threads_;      // writers and readers
  std::thread completion_thread_;

  std::mutex warnings_mutex_;  // separate: warn() runs with or without mutex_ held
  std::deque<std::string> recent_warnings_;
};

}  // namespace rtpllm

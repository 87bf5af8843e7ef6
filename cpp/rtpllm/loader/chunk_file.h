// One checkpoint file opened for chunked reads, with the I/O mode chosen for it.
//
// O_DIRECT skips the page cache: for a file that is not cached it reads at the disk's speed with
// no extra copy and without evicting the cache of others. For a file already in the page cache,
// buffered reads are memory copies and much faster than going back to the disk. `kAuto` asks
// the kernel which pages are resident (mincore) and picks per file. Where O_DIRECT cannot be
// used (tmpfs, some network file systems, unaligned chunks) the file falls back to buffered reads.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>

namespace rtpllm::loader {

enum class DirectIo { kAuto, kAlways, kNever };

class ChunkFile {
 public:
  // Throws LoadError (kNotFound, kIo). `expected_size` is the size the header was validated
  // against; a file that has shrunk since is reported as truncated.
  ChunkFile(const std::string& path, uint64_t expected_size, DirectIo mode);
  ~ChunkFile();
  ChunkFile(const ChunkFile&) = delete;
  ChunkFile& operator=(const ChunkFile&) = delete;

  // Reads [offset, offset + bytes) into `buffer` (aligned as O_DIRECT needs, `bytes` long) and
  // checks that at least `needed` bytes came back. Thread-safe. Throws LoadError.
  void read(uint64_t offset, uint64_t bytes, uint64_t needed, uint8_t* buffer);

  const std::string& path() const { return path_; }
  bool direct() const { return direct_fd_ >= 0 && !direct_failed_.load(); }
  double resident_fraction() const { return resident_fraction_; }

 private:
  uint64_t read_fd(int fd, uint64_t offset, uint64_t bytes, uint8_t* buffer);

  std::string path_;
  uint64_t size_ = 0;
  int fd_ = -1;         // buffered
  int direct_fd_ = -1;  // O_DIRECT, or -1
  std::atomic<bool> direct_failed_{false};
  double resident_fraction_ = 0.0;
};

// Fraction (0..1) of the file's pages in the page cache; 0 when the kernel cannot tell.
double page_cache_fraction(int fd, uint64_t size);

}  // namespace rtpllm::loader

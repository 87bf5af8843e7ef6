#include "rtpllm/loader/chunk_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <vector>

#include "rtpllm/loader/load_error.h"

namespace rtpllm::loader {
namespace {

// Above this fraction of cached pages a file is read through the cache.
constexpr double kBufferedAbove = 0.5;

std::string errno_text() { return std::strerror(errno); }

}  // namespace

double page_cache_fraction(int fd, uint64_t size) {
  if (size == 0) return 1.0;
  const long page = ::sysconf(_SC_PAGESIZE);
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
  if (map == MAP_FAILED) return 0.0;
  const uint64_t pages = (size + static_cast<uint64_t>(page) - 1) / static_cast<uint64_t>(page);
  std::vector<unsigned char> resident(pages);
  double fraction = 0.0;
  if (::mincore(map, size, resident.data()) == 0) {
    uint64_t count = 0;
    for (unsigned char r : resident) count += r & 1;
    fraction = static_cast<double>(count) / static_cast<double>(pages);
  }
  ::munmap(map, size);
  return fraction;
}

ChunkFile::ChunkFile(const std::string& path, uint64_t expected_size, DirectIo mode) : path_(path) {
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) {
    if (errno == ENOENT) throw LoadError(LoadErrorKind::kNotFound, path + ": no such file");
    throw LoadError(LoadErrorKind::kIo, path + ": cannot open (" + errno_text() + ")");
  }
  struct stat st {};
  if (::fstat(fd_, &st) != 0) {
    const std::string why = errno_text();
    ::close(fd_);
    throw LoadError(LoadErrorKind::kIo, path + ": cannot stat (" + why + ")");
  }
  size_ = static_cast<uint64_t>(st.st_size);
  if (size_ < expected_size) {
    ::close(fd_);
    throw LoadError(LoadErrorKind::kInvalidFile, path + ": shrank from " + std::to_string(expected_size) +
                                                     " to " + std::to_string(size_) + " bytes while loading");
  }
  bool want_direct = mode == DirectIo::kAlways;
  if (mode == DirectIo::kAuto) {
    resident_fraction_ = page_cache_fraction(fd_, size_);
    want_direct = resident_fraction_ <= kBufferedAbove;
  }
  if (want_direct) direct_fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT);  // -1: buffered
}

ChunkFile::~ChunkFile() {
  if (direct_fd_ >= 0) ::close(direct_fd_);
  if (fd_ >= 0) ::close(fd_);
}

uint64_t ChunkFile::read_fd(int fd, uint64_t offset, uint64_t bytes, uint8_t* buffer) {
  uint64_t done = 0;
  while (done < bytes) {
    const ssize_t got = ::pread(fd, buffer + done, bytes - done, static_cast<off_t>(offset + done));
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) return done == 0 ? UINT64_MAX : done;  // errno tells why
    if (got == 0) break;  // end of file
    done += static_cast<uint64_t>(got);
  }
  return done;
}

void ChunkFile::read(uint64_t offset, uint64_t bytes, uint64_t needed, uint8_t* buffer) {
  uint64_t got;
  if (direct()) {
    got = read_fd(direct_fd_, offset, bytes, buffer);
    // EINVAL: this file system (or this buffer's alignment) does not take O_DIRECT after all.
    if (got == UINT64_MAX && errno == EINVAL) {
      direct_failed_.store(true);
      got = read_fd(fd_, offset, bytes, buffer);
    }
  } else {
    got = read_fd(fd_, offset, bytes, buffer);
  }
  if (got == UINT64_MAX)
    throw LoadError(LoadErrorKind::kIo, path_ + ": read of " + std::to_string(bytes) + " bytes at offset " +
                                            std::to_string(offset) + " failed (" + errno_text() + ")");
  if (got < needed)
    throw LoadError(LoadErrorKind::kInvalidFile,
                    path_ + ": file ends at byte " + std::to_string(offset + got) + ", but its header places data up "
                    "to byte " + std::to_string(offset + needed) + " (the file is truncated)");
}

}  // namespace rtpllm::loader

#include "rtpllm/kvstore/disk_block_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstring>

#include "rtpllm/kvstore/checksum.h"

namespace rtpllm {
namespace {

constexpr size_t kPage = 4096;
constexpr size_t kHashedHeaderBytes = offsetof(DiskBlockHeader, header_checksum);

uint64_t header_checksum(const DiskBlockHeader& header) { return checksum64(&header, kHashedHeaderBytes); }

// open() with O_DIRECT, or without it where the file system (or the alignment) does not allow it.
int open_maybe_direct(const std::string& path, int flags, bool direct_possible) {
  if (direct_possible) {
    const int fd = ::open(path.c_str(), flags | O_DIRECT | O_CLOEXEC, 0644);
    if (fd >= 0 || errno != EINVAL) return fd;
  }
  return ::open(path.c_str(), flags | O_CLOEXEC, 0644);
}

bool direct_io_possible(const void* buffer, size_t bytes) {
  return reinterpret_cast<uintptr_t>(buffer) % kPage == 0 && bytes % kPage == 0;
}

}  // namespace

const char* to_string(DiskBlockCheck check) {
  switch (check) {
    case DiskBlockCheck::OK: return "ok";
    case DiskBlockCheck::NOT_A_BLOCK_FILE: return "not a block file (bad magic, version or header checksum)";
    case DiskBlockCheck::FOREIGN: return "written by another cache identity";
    case DiskBlockCheck::WRONG_BLOCK: return "header names another block or block size";
    case DiskBlockCheck::TRUNCATED: return "truncated";
    case DiskBlockCheck::BAD_CHECKSUM: return "payload checksum mismatch";
  }
  return "unknown";
}

size_t disk_block_file_bytes(size_t payload_bytes) {
  return kDiskBlockHeaderBytes + (payload_bytes + kPage - 1) / kPage * kPage;
}

std::string block_file_name(BlockHash hash) {
  char name[32];
  std::snprintf(name, sizeof(name), "%016" PRIx64 ".kvb", hash);
  return name;
}

bool parse_block_file_name(const std::string& name, BlockHash* hash) {
  if (name.size() != 20 || name.compare(16, 4, ".kvb") != 0) return false;
  uint64_t value = 0;
  for (size_t i = 0; i < 16; ++i) {
    const char c = name[i];
    int digit;
    if (c >= '0' && c <= '9') {
      digit = c - '0';
    } else if (c >= 'a' && c <= 'f') {
      digit = c - 'a' + 10;
    } else {
      return false;
    }
    value = value << 4 | static_cast<uint64_t>(digit);
  }
  *hash = value;
  return true;
}

void seal_block_file(uint8_t* file, uint64_t cache_identity, BlockHash hash, size_t payload_bytes) {
  const size_t file_bytes = disk_block_file_bytes(payload_bytes);
  std::memset(file + kDiskBlockHeaderBytes + payload_bytes, 0, file_bytes - kDiskBlockHeaderBytes - payload_bytes);
  DiskBlockHeader header;
  header.cache_identity = cache_identity;
  header.block_hash = hash;
  header.payload_bytes = payload_bytes;
  header.payload_checksum = checksum64(file + kDiskBlockHeaderBytes, payload_bytes);
  header.header_checksum = header_checksum(header);
  std::memset(file, 0, kDiskBlockHeaderBytes);
  std::memcpy(file, &header, sizeof(header));
}

DiskBlockCheck check_block_header(const uint8_t* header_page, uint64_t cache_identity, BlockHash hash, size_t payload_bytes) {
  DiskBlockHeader header;
  std::memcpy(&header, header_page, sizeof(header));
  if (header.magic != kDiskBlockMagic || header.version != kDiskBlockVersion ||
      header.header_bytes != kDiskBlockHeaderBytes || header.header_checksum != header_checksum(header)) {
    return DiskBlockCheck::NOT_A_BLOCK_FILE;
  }
  if (header.cache_identity != cache_identity) return DiskBlockCheck::FOREIGN;
  if (header.block_hash != hash || header.payload_bytes != payload_bytes) return DiskBlockCheck::WRONG_BLOCK;
  return DiskBlockCheck::OK;
}

DiskBlockCheck check_block_file(const uint8_t* file, size_t file_size, uint64_t cache_identity, BlockHash hash,
                                size_t payload_bytes) {
  if (file_size < kDiskBlockHeaderBytes) return DiskBlockCheck::TRUNCATED;
  const DiskBlockCheck header = check_block_header(file, cache_identity, hash, payload_bytes);
  if (header != DiskBlockCheck::OK) return header;
  if (file_size < kDiskBlockHeaderBytes + payload_bytes) return DiskBlockCheck::TRUNCATED;
  DiskBlockHeader fields;
  std::memcpy(&fields, file, sizeof(fields));
  if (checksum64(file + kDiskBlockHeaderBytes, payload_bytes) != fields.payload_checksum) return DiskBlockCheck::BAD_CHECKSUM;
  return DiskBlockCheck::OK;
}

namespace {

// One pass of a whole-file write or read on an open descriptor; 0 or an errno value.
int write_all(int fd, const uint8_t* buffer, size_t bytes) {
  size_t done = 0;
  while (done < bytes) {
    const ssize_t n = ::pwrite(fd, buffer + done, bytes - done, static_cast<off_t>(done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno;
    if (n == 0) return ENOSPC;  // a zero-length write means no room
    done += static_cast<size_t>(n);
  }
  return 0;
}

int read_upto(int fd, uint8_t* buffer, size_t bytes, size_t want) {
  size_t done = 0;
  while (done < want) {
    // O_DIRECT reads must be whole pages: ask for the rest of the buffer, the file's end stops it.
    const ssize_t n = ::pread(fd, buffer + done, bytes - done, static_cast<off_t>(done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno;
    if (n == 0) break;
    done += static_cast<size_t>(n);
  }
  return 0;
}

}  // namespace

int write_whole_file(const std::string& path, const uint8_t* buffer, size_t bytes) {
  bool direct = direct_io_possible(buffer, bytes);
  while (true) {
    const int fd = open_maybe_direct(path, O_WRONLY | O_CREAT | O_TRUNC, direct);
    if (fd < 0) return errno;
    int error = write_all(fd, buffer, bytes);
    if (::close(fd) != 0 && error == 0) error = errno;
    // Some file systems accept O_DIRECT at open() and refuse it at the first write.
    if (error == EINVAL && direct) {
      direct = false;
      continue;
    }
    return error;
  }
}

int read_file_prefix(const std::string& path, uint8_t* buffer, size_t bytes, size_t* file_size) {
  bool direct = direct_io_possible(buffer, bytes);
  while (true) {
    const int fd = open_maybe_direct(path, O_RDONLY, direct);
    if (fd < 0) return errno;
    struct stat st;
    if (::fstat(fd, &st) != 0) {
      const int error = errno;
      ::close(fd);
      return error;
    }
    *file_size = static_cast<size_t>(st.st_size);
    const int error = read_upto(fd, buffer, bytes, bytes < *file_size ? bytes : *file_size);
    ::close(fd);
    if (error == EINVAL && direct) {
      direct = false;
      continue;
    }
    return error;
  }
}

}  // namespace rtpllm

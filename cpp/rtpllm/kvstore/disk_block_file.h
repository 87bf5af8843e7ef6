// The on-disk form of one KV block: `<block hash as 16 hex digits>.kvb` in the tier's directory.
//
//   [0, 4096)              header (DiskBlockHeader, little-endian, zero padded)
//   [4096, 4096 + payload) the block: bytes_per_block bytes, layer-major, K then V
//   then zeros up to a multiple of 4096, so that the whole file is one O_DIRECT write and read.
//
// The header names the cache identity (model, dtype, block size and layout: a directory shared by
// two models never mixes them), the block hash and the payload's size and checksum, and checks
// itself. Files are written under a temporary name and renamed, so a reader never sees a
// half-written file under a block's name (a crash can still leave a torn file behind, e.g. after a
// power loss, which the checksum catches).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "rtpllm/core/types.h"

namespace rtpllm {

inline constexpr uint64_t kDiskBlockMagic = 0x4B4C42564B505452ULL;  // "RTPKVBLK"
inline constexpr uint32_t kDiskBlockVersion = 1;
inline constexpr size_t kDiskBlockHeaderBytes = 4096;

struct DiskBlockHeader {
  uint64_t magic = kDiskBlockMagic;
  uint32_t version = kDiskBlockVersion;
  uint32_t header_bytes = kDiskBlockHeaderBytes;
  uint64_t cache_identity = 0;
  uint64_t block_hash = 0;
  uint64_t payload_bytes = 0;
  uint64_t payload_checksum = 0;
  uint64_t header_checksum = 0;  // checksum64 of the fields above
};

// Why a file cannot be used, or OK.
enum class DiskBlockCheck : uint8_t {
  OK,
  NOT_A_BLOCK_FILE,  // bad magic, version or header checksum: corrupt, or not ours
  FOREIGN,           // a valid block file of another cache identity
  WRONG_BLOCK,       // our identity, but another hash or payload size than expected
  TRUNCATED,         // shorter than its header says
  BAD_CHECKSUM,      // payload does not match its checksum
};
const char* to_string(DiskBlockCheck check);

// Whole file size for a payload: header + payload rounded up to 4096.
size_t disk_block_file_bytes(size_t payload_bytes);

// "00000000deadbeef.kvb"; parse_block_file_name returns false for any other name.
std::string block_file_name(BlockHash hash);
bool parse_block_file_name(const std::string& name, BlockHash* hash);

// Fills the header page of `file` (disk_block_file_bytes(payload_bytes) bytes, the payload already
// at file + kDiskBlockHeaderBytes) and zeroes the padding after the payload.
void seal_block_file(uint8_t* file, uint64_t cache_identity, BlockHash hash, size_t payload_bytes);

// Checks a header page against what the reader expects.
DiskBlockCheck check_block_header(const uint8_t* header_page, uint64_t cache_identity, BlockHash hash, size_t payload_bytes);
// Checks a whole file image of `file_size` bytes: header, size and payload checksum.
DiskBlockCheck check_block_file(const uint8_t* file, size_t file_size, uint64_t cache_identity, BlockHash hash,
                                size_t payload_bytes);

// File I/O. Return 0 or an errno value. Each tries O_DIRECT first and falls back to buffered I/O
// where the file system refuses it (tmpfs); `buffer` must be 4096-aligned and `bytes` a multiple
// of 4096 for O_DIRECT to be possible.
int write_whole_file(const std::string& path, const uint8_t* buffer, size_t bytes);
// Reads up to `bytes` bytes; *file_size gets the file's size (a short file is not an error here).
int read_file_prefix(const std::string& path, uint8_t* buffer, size_t bytes, size_t* file_size);

}  // namespace rtpllm

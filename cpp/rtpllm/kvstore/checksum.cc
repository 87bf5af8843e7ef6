#include "rtpllm/kvstore/checksum.h"

#include <cstring>

namespace rtpllm {
namespace {

// Odd multipliers with well-spread bits; the lanes run independently so that the four multiplies
// of a 32-byte stripe overlap in the pipeline (several GB/s per core).
constexpr uint64_t kLaneMul = 0xC2B2AE3D27D4EB4FULL;
constexpr uint64_t kMixMul = 0x9E3779B97F4A7C15ULL;
constexpr uint64_t kTailMul = 0xFF51AFD7ED558CCDULL;
constexpr uint64_t kLaneSeeds[4] = {0x243F6A8885A308D3ULL, 0x13198A2E03707344ULL, 0xA4093822299F31D0ULL,
                                    0x082EFA98EC4E6C89ULL};

inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

inline uint64_t read_u64(const unsigned char* p) {
  uint64_t v;
  std::memcpy(&v, p, sizeof(v));  // the format is little-endian; so is every platform we build for
  return v;
}

inline uint64_t lane_step(uint64_t lane, uint64_t word) { return rotl(lane ^ (word * kLaneMul), 27) * kMixMul; }

// Spreads every input bit over the whole output (a murmur-style finalizer).
inline uint64_t avalanche(uint64_t x) {
  x ^= x >> 33;
  x *= kTailMul;
  x ^= x >> 29;
  x *= kLaneMul;
  x ^= x >> 32;
  return x;
}

}  // namespace

uint64_t checksum64(const void* data, size_t size, uint64_t seed) {
  const auto* p = static_cast<const unsigned char*>(data);
  uint64_t lanes[4];
  for (int i = 0; i < 4; ++i) lanes[i] = kLaneSeeds[i] ^ seed;
  size_t offset = 0;
  for (; offset + 32 <= size; offset += 32) {
    for (int i = 0; i < 4; ++i) lanes[i] = lane_step(lanes[i], read_u64(p + offset + 8 * i));
  }
  uint64_t hash = rotl(lanes[0], 1) + rotl(lanes[1], 7) + rotl(lanes[2], 12) + rotl(lanes[3], 18);
  for (; offset + 8 <= size; offset += 8) hash = lane_step(hash, read_u64(p + offset));
  uint64_t tail = 0;
  for (size_t i = 0; offset + i < size; ++i) tail |= static_cast<uint64_t>(p[offset + i]) << (8 * i);
  hash = lane_step(hash, tail ^ (static_cast<uint64_t>(size) * kMixMul));
  return avalanche(hash ^ size);
}

}  // namespace rtpllm

#include "rtpllm/cache/block_hash.h"

namespace rtpllm {
namespace {

// Odd constants with well-spread bits (fractional parts of sqrt(2), sqrt(3), golden ratio, pi).
constexpr uint64_t kKeyA = 0x6a09e667f3bcc909ULL;
constexpr uint64_t kKeyB = 0xbb67ae8584caa73bULL;
constexpr uint64_t kKeyC = 0x9e3779b97f4a7c15ULL;
constexpr uint64_t kKeyD = 0x243f6a8885a308d3ULL;

// Full 64x64->128 multiply folded back to 64 bits: every input bit reaches every output bit.
inline uint64_t fold_multiply(uint64_t a, uint64_t b) {
  const __uint128_t product = static_cast<__uint128_t>(a) * b;
  return static_cast<uint64_t>(product) ^ static_cast<uint64_t>(product >> 64);
}

inline uint64_t absorb(uint64_t state, uint64_t word) { return fold_multiply(state ^ word ^ kKeyA, kKeyB); }

}  // namespace

BlockHash hash_block_tokens(BlockHash parent_hash, const TokenId* token_ids, size_t num_tokens, uint64_t extra_key) {
  uint64_t state = fold_multiply(parent_hash ^ kKeyC, extra_key ^ kKeyD);
  size_t i = 0;
  // Two 32-bit tokens per 64-bit word, read value by value so the result is endian-independent.
  for (; i + 1 < num_tokens; i += 2) {
    const uint64_t word = static_cast<uint64_t>(static_cast<uint32_t>(token_ids[i])) |
                          (static_cast<uint64_t>(static_cast<uint32_t>(token_ids[i + 1])) << 32);
    state = absorb(state, word);
  }
  if (i < num_tokens) state = absorb(state, static_cast<uint64_t>(static_cast<uint32_t>(token_ids[i])) | (1ULL << 63));
  // The length goes in last so that blocks which differ only by trailing zero tokens differ.
  return fold_multiply(state ^ static_cast<uint64_t>(num_tokens), kKeyC ^ kKeyB);
}

}  // namespace rtpllm

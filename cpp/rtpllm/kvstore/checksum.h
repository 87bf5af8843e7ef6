// A fast 64-bit checksum for KV block files: catches torn writes, bit rot and truncation before
// a block reaches the GPU. Not cryptographic. Stable across builds and machines (little-endian
// reads, fixed constants), since files outlive the process that wrote them.
#pragma once

#include <cstddef>
#include <cstdint>

namespace rtpllm {

uint64_t checksum64(const void* data, size_t size, uint64_t seed = 0);

}  // namespace rtpllm

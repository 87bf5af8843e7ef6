#include "rtpllm/loader/gguf_dequantize.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace rtpllm::loader {
namespace {

constexpr uint64_t kBlockValues = 32;
// Below this many values one thread decodes the whole tensor (thread start-up costs more).
constexpr uint64_t kValuesPerThread = 1 << 20;

float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  uint32_t bits;
  if (exponent == 0x1fu) {
    bits = sign | 0x7f800000u | (mantissa << 13);  // inf / nan
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;  // +-0
  } else {  // subnormal: normalize
    exponent = 113;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    bits = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
  }
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Per type: values and bytes per block, and the decoder of blocks [first, last).
struct Codec {
  uint64_t block_values;
  uint64_t block_bytes;
  void (*decode)(const uint8_t* src, float* dst, uint64_t first, uint64_t last);
};

void decode_f32(const uint8_t* src, float* dst, uint64_t first, uint64_t last) {
  std::memcpy(dst + first, src + first * 4, (last - first) * 4);
}

void decode_f16(const uint8_t* src, float* dst, uint64_t first, uint64_t last) {
  for (uint64_t i = first; i < last; ++i) dst[i] = half_to_float(load_u16(src + 2 * i));
}

void decode_bf16(const uint8_t* src, float* dst, uint64_t first, uint64_t last) {
  for (uint64_t i = first; i < last; ++i) {
    const uint32_t bits = static_cast<uint32_t>(load_u16(src + 2 * i)) << 16;
    std::memcpy(dst + i, &bits, sizeof(float));
  }
}

// Q8_0 (34 bytes): f16 scale d, 32 x int8 q -> d * q.
void decode_q8_0(const uint8_t* src, float* dst, uint64_t first, uint64_t last) {
  for (uint64_t b = first; b < last; ++b) {
    const uint8_t* block = src + b * 34;
    const float d = half_to_float(load_u16(block));
    const int8_t* q = reinterpret_cast<const int8_t*>(block + 2);
    float* out = dst + b * kBlockValues;
    for (int j = 0; j < 32; ++j) out[j] = d * static_cast<float>(q[j]);
  }
}

// Q4_0 (18 bytes): f16 scale d, 16 bytes; byte j holds value j (low nibble) and j + 16 (high):
// d * (q - 8).
void decode_q4_0(const uint8_t* src, float* dst, uint64_t first, uint64_t last) {
  for (uint64_t b = first; b < last; ++b) {
    const uint8_t* block = src + b * 18;
    const float d = half_to_float(load_u16(block));
    const uint8_t* qs = block + 2;
    float* out = dst + b * kBlockValues;
    for (int j = 0; j < 16; ++j) {
      out[j] = d * static_cast<float>(static_cast<int>(qs[j] & 0x0f) - 8);
      out[j + 16] = d * static_cast<float>(static_cast<int>(qs[j] >> 4) - 8);
    }
  }
}

// Q4_1 (20 bytes): f16 scale d, f16 min m, 16 bytes of nibbles as Q4_0: d * q + m.
void decode_q4_1(const uint8_t* src, float* dst, uint64_t first, uint64_t last) {
  for (uint64_t b = first; b < last; ++b) {
    const uint8_t* block = src + b * 20;
    const float d = half_to_float(load_u16(block));
    const float m = half_to_float(load_u16(block + 2));
    const uint8_t* qs = block + 4;
    float* out = dst + b * kBlockValues;
    for (int j = 0; j < 16; ++j) {
      out[j] = d * static_cast<float>(qs[j] & 0x0f) + m;
      out[j + 16] = d * static_cast<float>(qs[j] >> 4) + m;
    }
  }
}

const Codec* codec_for(uint32_t ggml_type) {
  static const Codec kF32{1, 4, decode_f32}, kF16{1, 2, decode_f16}, kBF16{1, 2, decode_bf16},
      kQ8{kBlockValues, 34, decode_q8_0}, kQ40{kBlockValues, 18, decode_q4_0}, kQ41{kBlockValues, 20, decode_q4_1};
  switch (static_cast<GgmlType>(ggml_type)) {
    case GgmlType::kF32: return &kF32;
    case GgmlType::kF16: return &kF16;
    case GgmlType::kBF16: return &kBF16;
    case GgmlType::kQ8_0: return &kQ8;
    case GgmlType::kQ4_0: return &kQ40;
    case GgmlType::kQ4_1: return &kQ41;
  }
  return nullptr;
}

}  // namespace

bool gguf_type_supported(uint32_t ggml_type) { return codec_for(ggml_type) != nullptr; }

uint64_t gguf_bytes_for(GgmlType type, uint64_t num_values) {
  const Codec* codec = codec_for(static_cast<uint32_t>(type));
  if (codec == nullptr) throw std::invalid_argument("ggml type " + std::to_string(static_cast<uint32_t>(type)) +
                                                    " is not supported");
  if (num_values % codec->block_values != 0) {
    throw std::invalid_argument(std::to_string(num_values) + " values are not a whole number of " +
                                std::to_string(codec->block_values) + "-value blocks");
  }
  return num_values / codec->block_values * codec->block_bytes;
}

void dequantize_gguf(uint32_t ggml_type, const uint8_t* src, uint64_t src_bytes, float* dst, uint64_t num_values,
                     size_t num_threads, const uint64_t* row_order, uint64_t row_values) {
  const Codec* codec = codec_for(ggml_type);
  if (codec == nullptr) throw std::invalid_argument("ggml type " + std::to_string(ggml_type) + " is not supported");
  const uint64_t expected = gguf_bytes_for(static_cast<GgmlType>(ggml_type), num_values);
  if (src_bytes != expected) {
    throw std::invalid_argument(std::to_string(src_bytes) + " bytes do not hold " + std::to_string(num_values) +
                                " values of ggml type " + std::to_string(ggml_type) + " (" + std::to_string(expected) +
                                " expected)");
  }
  // The unit of work: a row (blocks never straddle rows), or the whole tensor as one "row".
  if (row_order != nullptr && (row_values == 0 || row_values % codec->block_values != 0 || num_values % row_values)) {
    throw std::invalid_argument("row_values: " + std::to_string(row_values) + " does not split " +
                                std::to_string(num_values) + " values into whole rows of blocks");
  }
  const uint64_t rows = row_order != nullptr ? num_values / row_values : 1;
  const uint64_t row_len = row_order != nullptr ? row_values : num_values;
  const uint64_t row_blocks = row_len / codec->block_values, row_bytes = row_blocks * codec->block_bytes;
  if (row_order != nullptr) {
    for (uint64_t r = 0; r < rows; ++r) {
      if (row_order[r] >= rows) throw std::invalid_argument("row_order: entry out of range");
    }
  }
  // Blocks [first, last) of the tensor, in source order, each written to its row's destination.
  auto decode_range = [&](uint64_t first, uint64_t last) {
    while (first < last) {
      const uint64_t row = first / row_blocks, row_end = std::min(last, (row + 1) * row_blocks);
      const uint64_t dst_row = row_order != nullptr ? row_order[row] : row;
      const uint64_t in_row = first - row * row_blocks;
      codec->decode(src + row * row_bytes, dst + dst_row * row_len, in_row, row_end - row * row_blocks);
      first = row_end;
    }
  };
  const uint64_t blocks = num_values / codec->block_values;
  const uint64_t threads =
      std::max<uint64_t>(1, std::min<uint64_t>(std::max<size_t>(num_threads, 1), num_values / kValuesPerThread));
  if (threads == 1) {
    decode_range(0, blocks);
    return;
  }
  std::vector<std::thread> workers;
  workers.reserve(threads - 1);
  const uint64_t per_thread = (blocks + threads - 1) / threads;
  for (uint64_t t = 1; t < threads; ++t) {
    const uint64_t first = std::min(blocks, t * per_thread), last = std::min(blocks, first + per_thread);
    workers.emplace_back(decode_range, first, last);
  }
  decode_range(0, std::min(blocks, per_thread));
  for (auto& worker : workers) worker.join();
}

}  // namespace rtpllm::loader

// The host GGUF decoder: each block type against values worked out by hand, the row order that
// undoes llama.cpp's q/k permutation, thread splits that agree with one thread, and bad sizes.
#include "rtpllm/loader/gguf_dequantize.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

namespace rtpllm::loader {
namespace {

constexpr uint16_t kHalfOne = 0x3c00, kHalfTwo = 0x4000, kHalfMinusHalf = 0xb800;

void put_u16(std::vector<uint8_t>& out, uint16_t v) {
  out.push_back(static_cast<uint8_t>(v & 0xff));
  out.push_back(static_cast<uint8_t>(v >> 8));
}

// One Q4_1 block: scale d, min m, nibble j = low half of byte j, nibble j + 16 = high half.
std::vector<uint8_t> q4_1_block(uint16_t d, uint16_t m, uint8_t low, uint8_t high) {
  std::vector<uint8_t> block;
  put_u16(block, d);
  put_u16(block, m);
  for (int j = 0; j < 16; ++j) block.push_back(static_cast<uint8_t>(low | (high << 4)));
  return block;
}

TEST(GgufDequantize, Q4_1BlockIsScaleTimesNibblePlusMin) {
  const auto block = q4_1_block(kHalfTwo, kHalfMinusHalf, 3, 15);
  std::vector<float> out(32);
  dequantize_gguf(static_cast<uint32_t>(GgmlType::kQ4_1), block.data(), block.size(), out.data(), 32, 1);
  for (int j = 0; j < 16; ++j) EXPECT_EQ(out[j], 2.0f * 3 - 0.5f);
  for (int j = 16; j < 32; ++j) EXPECT_EQ(out[j], 2.0f * 15 - 0.5f);
}

TEST(GgufDequantize, Q8_0AndQ4_0) {
  std::vector<uint8_t> q8;
  put_u16(q8, kHalfTwo);
  for (int j = 0; j < 32; ++j) q8.push_back(static_cast<uint8_t>(static_cast<int8_t>(j - 16)));
  std::vector<float> out(32);
  dequantize_gguf(static_cast<uint32_t>(GgmlType::kQ8_0), q8.data(), q8.size(), out.data(), 32, 1);
  for (int j = 0; j < 32; ++j) EXPECT_EQ(out[j], 2.0f * (j - 16));

  std::vector<uint8_t> q4;
  put_u16(q4, kHalfOne);
  for (int j = 0; j < 16; ++j) q4.push_back(static_cast<uint8_t>(j | ((15 - j) << 4)));
  dequantize_gguf(static_cast<uint32_t>(GgmlType::kQ4_0), q4.data(), q4.size(), out.data(), 32, 1);
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(out[j], static_cast<float>(j - 8));
    EXPECT_EQ(out[j + 16], static_cast<float>(15 - j - 8));
  }
}

TEST(GgufDequantize, RowOrderPlacesEachSourceRow) {
  // Three rows of one block each, with distinct values; row r goes to row order[r].
  std::vector<uint8_t> src;
  for (uint8_t r = 0; r < 3; ++r) {
    const auto block = q4_1_block(kHalfOne, 0, r, r);
    src.insert(src.end(), block.begin(), block.end());
  }
  const std::vector<uint64_t> order = {2, 0, 1};
  std::vector<float> out(96, -1.0f);
  dequantize_gguf(static_cast<uint32_t>(GgmlType::kQ4_1), src.data(), src.size(), out.data(), 96, 1, order.data(), 32);
  for (int r = 0; r < 3; ++r) {
    for (int j = 0; j < 32; ++j) EXPECT_EQ(out[order[r] * 32 + j], static_cast<float>(r)) << "row " << r;
  }
}

TEST(GgufDequantize, ThreadsAgreeWithOneThread) {
  const uint64_t values = 3u << 20;  // enough for several threads, rows split across them
  std::vector<uint8_t> src;
  for (uint64_t b = 0; b < values / 32; ++b) {
    const auto block = q4_1_block(static_cast<uint16_t>(0x3000 + (b % 512)), kHalfMinusHalf, b % 16, (b / 16) % 16);
    src.insert(src.end(), block.begin(), block.end());
  }
  std::vector<uint64_t> order(values / 4096);
  for (uint64_t r = 0; r < order.size(); ++r) order[r] = order.size() - 1 - r;
  std::vector<float> one(values), many(values);
  const auto type = static_cast<uint32_t>(GgmlType::kQ4_1);
  dequantize_gguf(type, src.data(), src.size(), one.data(), values, 1, order.data(), 4096);
  dequantize_gguf(type, src.data(), src.size(), many.data(), values, 4, order.data(), 4096);
  EXPECT_EQ(0, std::memcmp(one.data(), many.data(), values * sizeof(float)));
}

TEST(GgufDequantize, BadSizesAndTypesThrow) {
  std::vector<uint8_t> src(34);
  std::vector<float> out(64);
  const auto q8 = static_cast<uint32_t>(GgmlType::kQ8_0);
  EXPECT_THROW(dequantize_gguf(q8, src.data(), 33, out.data(), 32, 1), std::invalid_argument);
  EXPECT_THROW(dequantize_gguf(q8, src.data(), 34, out.data(), 31, 1), std::invalid_argument);
  EXPECT_THROW(dequantize_gguf(14 /* Q6_K */, src.data(), 34, out.data(), 32, 1), std::invalid_argument);
  const std::vector<uint64_t> out_of_range = {1};
  EXPECT_THROW(dequantize_gguf(q8, src.data(), 34, out.data(), 32, 1, out_of_range.data(), 32), std::invalid_argument);
  EXPECT_FALSE(gguf_type_supported(14));
  EXPECT_TRUE(gguf_type_supported(static_cast<uint32_t>(GgmlType::kBF16)));
}

}  // namespace
}  // namespace rtpllm::loader

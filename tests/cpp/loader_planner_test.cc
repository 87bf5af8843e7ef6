// The read planner: chunks in file order, aligned, never larger than a buffer, and every requested
// byte covered by exactly one piece with the right destination.
#include <gtest/gtest.h>

#include <map>
#include <random>
#include <vector>

#include "rtpllm/loader/load_error.h"
#include "rtpllm/loader/read_planner.h"

namespace rtpllm::loader {
namespace {

ReadSpan span(uint32_t file, uint64_t offset, uint64_t bytes, uintptr_t dst, uint32_t request = 0) {
  return ReadSpan{file, offset, bytes, dst, request};
}

ReadPlanOptions small_options() {
  ReadPlanOptions options;
  options.chunk_bytes = 64;
  options.alignment = 16;
  options.max_gap = 8;
  return options;
}

// dst address -> file byte it receives, from the plan; fails on a byte written twice.
std::map<uintptr_t, std::pair<uint32_t, uint64_t>> destinations(const std::vector<ReadChunk>& chunks) {
  std::map<uintptr_t, std::pair<uint32_t, uint64_t>> out;
  for (const ReadChunk& chunk : chunks)
    for (const CopyPiece& piece : chunk.pieces)
      for (uint64_t b = 0; b < piece.bytes; ++b) {
        const bool added = out.emplace(piece.dst + b, std::make_pair(chunk.file, chunk.offset + piece.chunk_offset + b)).second;
        EXPECT_TRUE(added) << "destination byte " << piece.dst + b << " written twice";
      }
  return out;
}

void expect_well_formed(const std::vector<ReadChunk>& chunks, const ReadPlanOptions& options) {
  for (size_t i = 0; i < chunks.size(); ++i) {
    const ReadChunk& c = chunks[i];
    EXPECT_EQ(c.offset % options.alignment, 0u);
    EXPECT_EQ(c.bytes % options.alignment, 0u);
    EXPECT_LE(c.bytes, options.chunk_bytes);
    EXPECT_LE(c.needed, c.bytes);
    EXPECT_FALSE(c.pieces.empty());
    for (const CopyPiece& p : c.pieces) EXPECT_LE(p.chunk_offset + p.bytes, c.needed);
    if (i > 0) {
      const ReadChunk& prev = chunks[i - 1];
      EXPECT_TRUE(prev.file < c.file || (prev.file == c.file && prev.offset < c.offset)) << "not in file order";
    }
  }
}

TEST(LoaderPlanner, AdjacentSpansShareOneAlignedRead) {
  const auto options = small_options();
  const auto chunks = plan_reads({span(0, 20, 10, 1000), span(0, 30, 6, 2000)}, options);
  ASSERT_EQ(chunks.size(), 1u);
  EXPECT_EQ(chunks[0].offset, 16u);
  EXPECT_EQ(chunks[0].needed, 20u);  // up to byte 36
  EXPECT_EQ(chunks[0].bytes, 32u);
  ASSERT_EQ(chunks[0].pieces.size(), 2u);
  EXPECT_EQ(chunks[0].pieces[0].chunk_offset, 4u);
  EXPECT_EQ(chunks[0].pieces[1].chunk_offset, 14u);
}

TEST(LoaderPlanner, SortsByFileThenOffsetAndSplitsAtLargeGaps) {
  const auto options = small_options();
  const auto chunks =
      plan_reads({span(1, 0, 4, 100), span(0, 40, 4, 200), span(0, 0, 4, 300), span(0, 20, 4, 400)}, options);
  ASSERT_EQ(chunks.size(), 4u);
  EXPECT_EQ(chunks[0].file, 0u);
  EXPECT_EQ(chunks[0].offset, 0u);   // byte 0..4
  EXPECT_EQ(chunks[1].offset, 16u);  // byte 20: 16 bytes past the first span's end, beyond max_gap
  EXPECT_EQ(chunks[2].offset, 32u);  // byte 40
  EXPECT_EQ(chunks[3].file, 1u);
  expect_well_formed(chunks, options);
}

TEST(LoaderPlanner, SplitsLongSpansAtChunkBoundaries) {
  const auto options = small_options();
  const auto chunks = plan_reads({span(0, 10, 200, 5000)}, options);
  expect_well_formed(chunks, options);
  ASSERT_EQ(chunks.size(), 4u);  // bytes 10..210 over cells [0,64) [64,128) [128,192) [192,256)
  EXPECT_EQ(chunks[1].offset, 64u);
  EXPECT_EQ(chunks[1].pieces[0].dst, 5000u + 54u);
  const auto dst = destinations(chunks);
  EXPECT_EQ(dst.size(), 200u);
  for (uint64_t b = 0; b < 200; ++b) EXPECT_EQ(dst.at(5000 + b).second, 10 + b);
}

TEST(LoaderPlanner, OverlappingSpansGoToBothDestinations) {
  const auto options = small_options();
  const auto chunks = plan_reads({span(0, 0, 100, 10000), span(0, 50, 100, 20000)}, options);
  expect_well_formed(chunks, options);
  const auto dst = destinations(chunks);
  EXPECT_EQ(dst.size(), 200u);
  EXPECT_EQ(dst.at(20000).second, 50u);
  EXPECT_EQ(dst.at(10000 + 99).second, 99u);
}

TEST(LoaderPlanner, RandomSpansAreCoveredExactly) {
  std::mt19937_64 rng(7);
  for (int trial = 0; trial < 50; ++trial) {
    ReadPlanOptions options;
    options.alignment = 1u << (rng() % 6);
    options.chunk_bytes = options.alignment * (1 + rng() % 8);
    options.max_gap = rng() % 40;
    std::vector<ReadSpan> spans;
    uintptr_t next_dst = 1 << 20;
    uint64_t total = 0;
    for (int i = 0; i < 20; ++i) {
      const uint64_t bytes = 1 + rng() % 90;
      spans.push_back(span(static_cast<uint32_t>(rng() % 3), rng() % 500, bytes, next_dst, i));
      next_dst += bytes + 7;
      total += bytes;
    }
    const auto chunks = plan_reads(spans, options);
    expect_well_formed(chunks, options);
    const auto dst = destinations(chunks);
    ASSERT_EQ(dst.size(), total);
    for (const ReadSpan& s : spans)
      for (uint64_t b = 0; b < s.bytes; ++b) {
        const auto& where = dst.at(s.dst + b);
        EXPECT_EQ(where.first, s.file);
        EXPECT_EQ(where.second, s.offset + b);
      }
  }
}

TEST(LoaderPlanner, RejectsBadOptions) {
  ReadPlanOptions options;
  options.alignment = 3;
  EXPECT_THROW(plan_reads({}, options), std::invalid_argument);
  options.alignment = 4096;
  options.chunk_bytes = 1000;
  EXPECT_THROW(plan_reads({}, options), std::invalid_argument);
}

TEST(LoaderRequest, StridedRequestBecomesOneSpanPerRow) {
  const std::string json = R"({"w":{"dtype":"F32","shape":[3,4],"data_offsets":[0,48]}})";
  const auto header = SafetensorsHeader::parse(json, 8 + json.size() + 48, "f.safetensors");
  TensorRequest request;  // columns 1..3 of a [3, 4] float matrix
  request.file = "f.safetensors";
  request.tensor = "w";
  request.begin = 4;
  request.row_bytes = 8;
  request.rows = 3;
  request.src_stride = 16;
  request.dst = 1000;
  request.dst_bytes = 24;
  request.dst_stride = 8;
  std::vector<ReadSpan> spans;
  append_spans(request, header, 0, 5, spans);
  ASSERT_EQ(spans.size(), 3u);
  EXPECT_EQ(spans[2].offset, header.data_offset() + 4 + 32);
  EXPECT_EQ(spans[2].dst, 1016u);
  EXPECT_EQ(spans[2].request, 5u);
}

TEST(LoaderRequest, RejectsRequestsThatDoNotFitNamingFileAndTensor) {
  const std::string json = R"({"w":{"dtype":"F32","shape":[3,4],"data_offsets":[0,48]}})";
  const auto header = SafetensorsHeader::parse(json, 8 + json.size() + 48, "f.safetensors");
  std::vector<ReadSpan> spans;
  auto message = [&](TensorRequest request) -> std::string {
    try {
      append_spans(request, header, 0, 0, spans);
    } catch (const LoadError& e) {
      EXPECT_EQ(e.kind(), LoadErrorKind::kBadRequest);
      return e.what();
    }
    return "no error";
  };
  EXPECT_NE(message(TensorRequest::whole("f.safetensors", "nope", 64, 48)).find("f.safetensors: tensor nope: not in"),
            std::string::npos);
  EXPECT_NE(message(TensorRequest::whole("f.safetensors", "w", 64, 52)).find("reach past"), std::string::npos);
  TensorRequest small = TensorRequest::whole("f.safetensors", "w", 64, 48);
  small.dst_bytes = 40;
  EXPECT_NE(message(small).find("destination holds 40"), std::string::npos);
  TensorRequest strided;
  strided.file = "f.safetensors";
  strided.tensor = "w";
  strided.begin = 8;
  strided.row_bytes = 12;  // runs past the last row
  strided.rows = 3;
  strided.src_stride = 16;
  strided.dst = 64;
  strided.dst_bytes = 36;
  strided.dst_stride = 12;
  EXPECT_NE(message(strided).find("reach past"), std::string::npos);
  EXPECT_TRUE(spans.empty());
}

}  // namespace
}  // namespace rtpllm::loader

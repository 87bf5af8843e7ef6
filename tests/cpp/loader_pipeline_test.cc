// The whole pipeline on real files: every requested byte lands where asked, with one and many
// reader threads, O_DIRECT and buffered, and a file that shrinks after its header was read fails
// naming the tensor.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "rtpllm/core/host_allocator.h"
#include "rtpllm/loader/load_error.h"
#include "rtpllm/loader/memcpy_sink.h"
#include "rtpllm/loader/weight_loader.h"

namespace rtpllm::loader {
namespace {

struct TestFile {
  std::string path;
  std::vector<std::vector<uint8_t>> tensors;  // contents, in header order "t0", "t1", ...
};

// Writes a safetensors file of U8 tensors with the given sizes and random contents.
TestFile write_file(const std::string& name, const std::vector<size_t>& sizes, uint32_t seed) {
  TestFile file;
  file.path = ::testing::TempDir() + "/" + name + "-" + std::to_string(::getpid()) + ".safetensors";
  std::mt19937 rng(seed);
  std::string json = "{";
  uint64_t offset = 0;
  for (size_t i = 0; i < sizes.size(); ++i) {
    json += (i ? "," : "") + std::string("\"t") + std::to_string(i) + "\":{\"dtype\":\"U8\",\"shape\":[" +
            std::to_string(sizes[i]) + "],\"data_offsets\":[" + std::to_string(offset) + "," +
            std::to_string(offset + sizes[i]) + "]}";
    offset += sizes[i];
    std::vector<uint8_t> data(sizes[i]);
    for (auto& b : data) b = static_cast<uint8_t>(rng());
    file.tensors.push_back(std::move(data));
  }
  json += "}";
  std::ofstream out(file.path, std::ios::binary);
  const uint64_t n = json.size();
  for (int i = 0; i < 8; ++i) out.put(static_cast<char>((n >> (8 * i)) & 0xFF));
  out << json;
  for (const auto& t : file.tensors) out.write(reinterpret_cast<const char*>(t.data()), static_cast<std::streamsize>(t.size()));
  return file;
}

LoaderOptions options(size_t threads, DirectIo mode) {
  LoaderOptions o;
  o.num_threads = threads;
  o.direct_io = mode;
  o.plan.chunk_bytes = 64 << 10;  // many chunks even for small files
  return o;
}

class LoaderPipeline : public ::testing::TestWithParam<std::tuple<size_t, DirectIo>> {};

TEST_P(LoaderPipeline, EveryTensorLandsBitExact) {
  const auto [threads, mode] = GetParam();
  const std::vector<TestFile> files = {write_file("a", {1, 300000, 4096, 77, 200001}, 1),
                                       write_file("b", {65536, 3, 123457}, 2)};
  AlignedHostAllocator allocator;
  MemcpySink sink;
  WeightLoader loader(options(threads, mode), allocator, sink);
  std::vector<std::vector<uint8_t>> out;
  std::vector<TensorRequest> requests;
  for (const auto& f : files)
    for (size_t i = 0; i < f.tensors.size(); ++i) out.emplace_back(f.tensors[i].size(), 0);
  size_t k = 0;
  for (const auto& f : files)
    for (size_t i = 0; i < f.tensors.size(); ++i, ++k)
      requests.push_back(TensorRequest::whole(f.path, "t" + std::to_string(i),
                                              reinterpret_cast<uintptr_t>(out[k].data()), out[k].size()));
  auto job = loader.start(requests);
  while (!job->wait_for(0.01)) {
  }
  const LoadStats stats = job->finish();
  k = 0;
  for (const auto& f : files)
    for (size_t i = 0; i < f.tensors.size(); ++i, ++k) EXPECT_EQ(out[k], f.tensors[i]) << f.path << " t" << i;
  EXPECT_EQ(stats.bytes_copied, job->total_bytes());
  EXPECT_EQ(stats.num_files, 2u);
  // A second load through the same loader reuses its staging buffers.
  std::vector<uint8_t> again(files[1].tensors[2].size());
  loader.start({TensorRequest::whole(files[1].path, "t2", reinterpret_cast<uintptr_t>(again.data()), again.size())})
      ->finish();
  EXPECT_EQ(again, files[1].tensors[2]);
  for (const auto& f : files) std::remove(f.path.c_str());
}

INSTANTIATE_TEST_SUITE_P(ThreadsAndModes, LoaderPipeline,
                         ::testing::Combine(::testing::Values(size_t{1}, size_t{4}),
                                            ::testing::Values(DirectIo::kAuto, DirectIo::kAlways, DirectIo::kNever)));

TEST(LoaderPipelineErrors, AFileThatShrankAfterItsHeaderNamesTheTensor) {
  const TestFile file = write_file("shrink", {100000, 100000}, 3);
  AlignedHostAllocator allocator;
  MemcpySink sink;
  WeightLoader loader(options(2, DirectIo::kNever), allocator, sink);
  loader.header(file.path);  // validated while whole
  ASSERT_EQ(::truncate(file.path.c_str(), 8 + 150000), 0);
  std::vector<uint8_t> out(200000);
  try {
    loader.start({TensorRequest::whole(file.path, "t1", reinterpret_cast<uintptr_t>(out.data()), 100000)})->finish();
    FAIL() << "expected a LoadError";
  } catch (const LoadError& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find(file.path), std::string::npos) << message;
  }
  std::remove(file.path.c_str());
}

TEST(LoaderPipelineErrors, OneJobAtATime) {
  const TestFile file = write_file("busy", {10}, 4);
  AlignedHostAllocator allocator;
  MemcpySink sink;
  WeightLoader loader(options(1, DirectIo::kNever), allocator, sink);
  std::vector<uint8_t> out(10);
  const auto request = TensorRequest::whole(file.path, "t0", reinterpret_cast<uintptr_t>(out.data()), 10);
  auto job = loader.start({request});
  EXPECT_THROW(loader.start({request}), std::logic_error);
  job->finish();
  loader.start({request})->finish();
  std::remove(file.path.c_str());
}

}  // namespace
}  // namespace rtpllm::loader

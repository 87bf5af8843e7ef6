// The safetensors header parser: what it accepts, and that each kind of bad header fails with a
// message naming the file and the tensor.
#include <gtest/gtest.h>

#include <string>

#include "rtpllm/loader/json_value.h"
#include "rtpllm/loader/load_error.h"
#include "rtpllm/loader/safetensors_header.h"

namespace rtpllm::loader {
namespace {

// The file size a header of `json` describes when `data_bytes` of tensor data follow it.
uint64_t file_size_for(const std::string& json, uint64_t data_bytes) { return 8 + json.size() + data_bytes; }

std::string error_of(const std::string& json, uint64_t data_bytes) {
  try {
    SafetensorsHeader::parse(json, file_size_for(json, data_bytes), "shard-1.safetensors");
  } catch (const LoadError& e) {
    EXPECT_EQ(e.kind(), LoadErrorKind::kInvalidFile);
    return e.what();
  }
  ADD_FAILURE() << "expected a LoadError for " << json;
  return "";
}

TEST(LoaderHeader, ParsesTensorsInFileOrderWithAbsoluteOffsets) {
  const std::string json =
      R"({"__metadata__":{"format":"pt"},)"
      R"("b.weight":{"dtype":"F32","shape":[3],"data_offsets":[8,20]},)"
      R"("a.weight":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,8]},)"
      R"("empty":{"dtype":"F16","shape":[0,7],"data_offsets":[20,20]}})";
  const auto header = SafetensorsHeader::parse(json, file_size_for(json, 20), "model.safetensors");
  ASSERT_EQ(header.tensors().size(), 3u);
  EXPECT_EQ(header.tensors()[0].name, "a.weight");
  EXPECT_EQ(header.tensors()[1].name, "b.weight");
  EXPECT_EQ(header.data_offset(), 8 + json.size());
  const TensorInfo* b = header.find("b.weight");
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->dtype, "F32");
  EXPECT_EQ(b->shape, (std::vector<uint64_t>{3}));
  EXPECT_EQ(b->offset, header.data_offset() + 8);
  EXPECT_EQ(b->nbytes, 12u);
  EXPECT_EQ(header.find("missing"), nullptr);
  EXPECT_EQ(header.find("empty")->nbytes, 0u);
}

TEST(LoaderHeader, KeepsLargeOffsetsExact) {
  // 2^53 + 1 does not survive a double; offsets past 9 PB are absurd but must not be rounded.
  const std::string json = R"({"x":{"dtype":"U8","shape":[1],"data_offsets":[9007199254740993,9007199254740994]}})";
  const std::string message = error_of(json, 16);
  EXPECT_NE(message.find("9007199254740993"), std::string::npos) << message;
}

TEST(LoaderHeader, RejectsDataPastTheEndOfTheFileNamingTheTensor) {
  const std::string json = R"({"layers.0.w":{"dtype":"F16","shape":[4],"data_offsets":[0,8]}})";
  const std::string message = error_of(json, 6);  // truncated: 6 of 8 bytes present
  EXPECT_NE(message.find("shard-1.safetensors"), std::string::npos) << message;
  EXPECT_NE(message.find("layers.0.w"), std::string::npos) << message;
  EXPECT_NE(message.find("truncated"), std::string::npos) << message;
}

TEST(LoaderHeader, RejectsASizeThatIsNotShapeTimesDtype) {
  const std::string json = R"({"w":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,8]}})";
  const std::string message = error_of(json, 8);
  EXPECT_NE(message.find("tensor w"), std::string::npos) << message;
  EXPECT_NE(message.find("needs 12"), std::string::npos) << message;
}

TEST(LoaderHeader, RejectsOverlappingTensors) {
  const std::string json =
      R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
      R"("b":{"dtype":"F32","shape":[4],"data_offsets":[12,28]}})";
  const std::string message = error_of(json, 28);
  EXPECT_NE(message.find("a and b overlap"), std::string::npos) << message;
}

TEST(LoaderHeader, RejectsOverlapHiddenBehindAnEmptyTensor) {
  const std::string json =
      R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
      R"("z":{"dtype":"F32","shape":[0],"data_offsets":[8,8]},)"
      R"("b":{"dtype":"F32","shape":[1],"data_offsets":[12,16]}})";
  EXPECT_NE(error_of(json, 16).find("a and b overlap"), std::string::npos);
}

TEST(LoaderHeader, RejectsMalformedEntries) {
  EXPECT_NE(error_of("[1,2]", 0).find("not a JSON object"), std::string::npos);
  EXPECT_NE(error_of(R"({"w":{"dtype":"F32","shape":[1]})", 4).find("not valid JSON"), std::string::npos);
  EXPECT_NE(error_of(R"({"w":{"dtype":"Q4","shape":[1],"data_offsets":[0,1]}})", 4).find("unknown dtype 'Q4'"),
            std::string::npos);
  EXPECT_NE(error_of(R"({"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4).find("tensor w"),
            std::string::npos);
  EXPECT_NE(error_of(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}})", 4).find("end before"),
            std::string::npos);
  EXPECT_NE(error_of(R"({"w":{"dtype":"F32","shape":[1]}})", 4).find("data_offsets"), std::string::npos);
  EXPECT_NE(error_of(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8)
                .find("listed twice"),
            std::string::npos);
}

TEST(LoaderHeader, ReadingAMissingFileIsNotFound) {
  try {
    SafetensorsHeader::read("/nonexistent/rtpllm/model.safetensors");
    FAIL() << "expected LoadError";
  } catch (const LoadError& e) {
    EXPECT_EQ(e.kind(), LoadErrorKind::kNotFound);
    EXPECT_NE(std::string(e.what()).find("/nonexistent/rtpllm/model.safetensors"), std::string::npos);
  }
}

TEST(LoaderJson, ParsesEscapesNestingAndNumbers) {
  const auto value = JsonValue::parse(R"( {"a\"b": [1, 2.5e3, true, null, "x\u00e9\ud83d\ude00"], "c": {}} )");
  const auto& members = value.as_object();
  ASSERT_EQ(members.size(), 2u);
  EXPECT_EQ(members[0].first, "a\"b");
  const auto& items = members[0].second.as_array();
  EXPECT_EQ(items[0].as_uint(), 1u);
  EXPECT_EQ(items[1].type(), JsonValue::Type::kNumber);
  EXPECT_EQ(items[2].type(), JsonValue::Type::kBool);
  EXPECT_EQ(items[3].type(), JsonValue::Type::kNull);
  EXPECT_EQ(items[4].as_string(), "x\xc3\xa9\xf0\x9f\x98\x80");
  EXPECT_TRUE(members[1].second.as_object().empty());
  EXPECT_THROW(JsonValue::parse("{\"a\":1,}"), std::invalid_argument);
  EXPECT_THROW(JsonValue::parse("{\"a\":1} x"), std::invalid_argument);
  EXPECT_THROW(JsonValue::parse(std::string(200, '[')), std::invalid_argument);
  EXPECT_THROW(JsonValue::parse("-3").as_uint(), std::invalid_argument);
}

}  // namespace
}  // namespace rtpllm::loader

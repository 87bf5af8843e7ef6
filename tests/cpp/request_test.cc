#include <gtest/gtest.h>

#include <stdexcept>
#include <string>

#include "rtpllm/core/request.h"

namespace rtpllm {
namespace {

RequestSpec valid_spec() {
  RequestSpec spec;
  spec.request_id = 1;
  spec.prompt_token_ids = {5, 6, 7};
  spec.max_new_tokens = 4;
  return spec;
}

void expect_rejected(const RequestSpec& spec, const std::string& field) {
  try {
    Request r(spec);
    FAIL() << "accepted a spec with a bad " << field;
  } catch (const std::invalid_argument& e) {
    EXPECT_EQ(std::string(e.what()).rfind(field + ":", 0), 0u) << e.what();
  }
}

TEST(Request, BuildsFromSpec) {
  RequestSpec spec = valid_spec();
  spec.stop_token_ids = {9, 2, 9, 4};
  spec.priority = 3;
  const Request r(spec);
  EXPECT_EQ(r.id, 1);
  EXPECT_EQ(r.num_tokens(), 3);
  EXPECT_EQ(r.num_prompt_tokens, 3);
  EXPECT_EQ(r.num_output_tokens(), 0);
  EXPECT_EQ(r.num_computed_tokens, 0);
  EXPECT_EQ(r.status, RequestStatus::WAITING);
  EXPECT_EQ(r.finish_reason, FinishReason::NONE);
  EXPECT_EQ(r.stop_token_ids, (std::vector<TokenId>{2, 4, 9}));  // sorted, duplicates dropped
  EXPECT_TRUE(r.is_stop_token(9));
  EXPECT_FALSE(r.is_stop_token(5));
}

TEST(Request, StopLookupWorksForLongLists) {
  RequestSpec spec = valid_spec();
  for (TokenId t = 100; t > 0; t -= 7) spec.stop_token_ids.push_back(t);
  const Request r(spec);
  EXPECT_TRUE(r.is_stop_token(2));
  EXPECT_TRUE(r.is_stop_token(100));
  EXPECT_FALSE(r.is_stop_token(3));
}

TEST(Request, RejectsBadSpecsNamingTheField) {
  RequestSpec spec = valid_spec();
  spec.prompt_token_ids.clear();
  expect_rejected(spec, "prompt_token_ids");

  spec = valid_spec();
  spec.prompt_token_ids[1] = -3;
  expect_rejected(spec, "prompt_token_ids");

  spec = valid_spec();
  spec.max_new_tokens = 0;
  expect_rejected(spec, "max_new_tokens");

  spec = valid_spec();
  spec.min_new_tokens = 5;  // > max_new_tokens
  expect_rejected(spec, "min_new_tokens");

  spec = valid_spec();
  spec.min_new_tokens = -1;
  expect_rejected(spec, "min_new_tokens");

  spec = valid_spec();
  spec.stop_token_ids = {-1};
  expect_rejected(spec, "stop_token_ids");

  spec = valid_spec();
  spec.arrival_time = 1.0 / 0.0;
  expect_rejected(spec, "arrival_time");
}

}  // namespace
}  // namespace rtpllm

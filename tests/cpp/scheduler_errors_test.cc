// Bad input raises std::invalid_argument naming the field and leaves the scheduler unchanged.
#include <gtest/gtest.h>

#include <string>

#include "scheduler_harness.h"

namespace rtpllm::testing {
namespace {

template <typename F>
void expect_invalid(F&& f, const std::string& field) {
  try {
    f();
    FAIL() << "no error for a bad " << field;
  } catch (const std::invalid_argument& e) {
    EXPECT_EQ(std::string(e.what()).rfind(field + ":", 0), 0u) << e.what();
  }
}

TEST(SchedulerErrors, RejectsBadOptions) {
  const CacheOptions cache{16, 4, true};
  expect_invalid([&] { Scheduler s({0, 8, true, 64}, cache); }, "max_num_batched_tokens");
  expect_invalid([&] { Scheduler s({-5, 8, true, 64}, cache); }, "max_num_batched_tokens");
  expect_invalid([&] { Scheduler s({64, 0, true, 64}, cache); }, "max_num_seqs");
  expect_invalid([&] { Scheduler s({64, 8, true, 0}, cache); }, "max_model_len");
  expect_invalid([&] { Scheduler s({64, 8, true, 64}, {16, 0, true}); }, "block_size");
  expect_invalid([&] { Scheduler s({64, 8, true, 64}, {0, 4, true}); }, "num_blocks");
}

TEST(SchedulerErrors, RejectsBadRequestsWithoutChangingState) {
  Scheduler s({32, 8, false, 64}, {8, 4, true});  // pool: 32 tokens; no chunked prefill
  s.add_request(make_spec(1, iota_tokens(4), 4));
  expect_invalid([&] { s.add_request(make_spec(1, iota_tokens(4), 4)); }, "request_id");
  expect_invalid([&] { s.add_request(make_spec(2, {}, 4)); }, "prompt_token_ids");
  expect_invalid([&] { s.add_request(make_spec(2, iota_tokens(65), 4)); }, "prompt_token_ids");  // > max_model_len
  expect_invalid([&] { s.add_request(make_spec(2, iota_tokens(33), 4)); }, "prompt_token_ids");  // > the pool
  Scheduler chunkless({16, 8, false, 64}, {64, 4, true});
  expect_invalid([&] { chunkless.add_request(make_spec(2, iota_tokens(17), 4)); }, "prompt_token_ids");  // > budget
  expect_invalid([&] { s.add_request(make_spec(2, iota_tokens(4), 0)); }, "max_new_tokens");
  expect_invalid([&] { s.add_request(make_spec(2, {1, -2}, 4)); }, "prompt_token_ids");
  EXPECT_EQ(s.num_waiting(), 1);
  EXPECT_EQ(s.num_free_blocks(), 8);
  s.check_invariants();
  ScheduledBatch b;
  s.schedule(b);
  EXPECT_EQ(b.request_ids, std::vector<int64_t>{1});
}

}  // namespace
}  // namespace rtpllm::testing

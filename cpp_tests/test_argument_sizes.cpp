// Sizes past any memory on the CPU entry points: an error naming the argument, nothing read
// (the CUDA entry points, which share the checks, in test_cuda_emulated.cpp).
#include <gtest/gtest.h>

#include "huge_sizes.h"
#include "latro/latro.h"
#include "test_util.h"

namespace {

using latro_test::HugeSizes;

TEST(ArgumentSizes, PastAnyMemoryAreRefusedNamingTheArgument) {
  HugeSizes h;
  EXPECT_LATRO_ERROR(latro::token_logprobs(h.token_logprobs()), "logits is too large");
  EXPECT_LATRO_ERROR(latro::token_logprobs_backward(h.token_logprobs_backward()),
                     "logits is too large");
  EXPECT_LATRO_ERROR(latro::sample(h.sample()), "logits is too large");
  EXPECT_LATRO_ERROR(latro::decode_attention(h.decode_attention(true)), "cache_k is too large");
  EXPECT_LATRO_ERROR(latro::decode_attention(h.decode_attention(false)),
                     "a cache row is too large");
  EXPECT_LATRO_ERROR(latro::rms_norm(h.rms_norm()), "x is too large");
  const latro::StopSequences none;
  EXPECT_LATRO_ERROR(latro::stop_positions(h.ints(), HugeSizes::kHuge, HugeSizes::kHuge,
                                           HugeSizes::kHuge, none, 0, h.ints()),
                     "tokens is too large");
  EXPECT_LATRO_ERROR(latro::rloo_advantages(h.floats(), HugeSizes::kHuge, HugeSizes::kHuge,
                                            h.floats()),
                     "rewards is too large");
}

// The largest sizes that still fit pass the size check (and fail later for what they are).
TEST(ArgumentSizes, TheCheckIsExactAtTheLimit) {
  HugeSizes h;
  latro::RmsNormArgs at_limit = h.rms_norm();
  at_limit.rows = int64_t{1} << 30;
  at_limit.dim = int64_t{1} << 30;  // 2^60 elements: allowed by the size check
  at_limit.x = nullptr;             // ... and refused for the pointer, checked after the sizes
  EXPECT_LATRO_ERROR(latro::rms_norm(at_limit), "x is a null pointer");
  at_limit.dim += 1;
  EXPECT_LATRO_ERROR(latro::rms_norm(at_limit), "x is too large");
}

}  // namespace

// latro::decode_attention on the CPU against a float64 reference: grouped heads, masks, the
// newest key and value written into the cache, row ranges, and bad arguments.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "decode_attention_reference.h"
#include "latro/latro.h"
#include "test_util.h"

namespace {

using namespace latro_test;

class DecodeAttention : public ::testing::TestWithParam<AttentionShape> {};

TEST_P(DecodeAttention, MatchesTheFloat64Reference) {
  std::mt19937 rng(17);
  const AttentionCase c(GetParam(), rng);
  Matrix k = c.cache_k, v = c.cache_v, out = c.output();
  latro::decode_attention(c.args(k, v, out));
  EXPECT_TRUE(all_close(matrix_values(out), c.reference(), attention_tolerance(c.shape.dtype)));
  expect_caches_written(c, k, v);
}

TEST_P(DecodeAttention, RowRangesGiveTheSameResults) {
  std::mt19937 rng(18);
  const AttentionCase c(GetParam(), rng);
  Matrix k = c.cache_k, v = c.cache_v, out = c.output();
  latro::decode_attention(c.args(k, v, out));
  Matrix k2 = c.cache_k, v2 = c.cache_v, split = c.output();
  const latro::DecodeAttentionArgs args = c.args(k2, v2, split);
  for (int64_t r = 0; r < c.shape.rows; ++r) latro::decode_attention(args, r, r + 1);
  EXPECT_TRUE(split.storage == out.storage);
  EXPECT_TRUE(k2.storage == k.storage && v2.storage == v.storage);
}

// NaN and infinity in the query, a key or a value come out as the float64 reference has them
// (NaN where a score is NaN, not the zeros of a head with no allowed slot).
TEST_P(DecodeAttention, NonFiniteInputsGiveTheReferencesNaNAndInfinity) {
  std::mt19937 rng(19);
  AttentionCase c(GetParam(), rng);
  put_non_finite_inputs(c);
  const std::vector<double> want = c.reference();
  ASSERT_TRUE(std::any_of(want.begin(), want.end(), [](double x) { return std::isnan(x); }));
  Matrix k = c.cache_k, v = c.cache_v, out = c.output();
  latro::decode_attention(c.args(k, v, out));
  EXPECT_TRUE(all_close(matrix_values(out), want, attention_tolerance(c.shape.dtype)));
  expect_caches_written(c, k, v);
}

INSTANTIATE_TEST_SUITE_P(Shapes, DecodeAttention, ::testing::ValuesIn(attention_shapes()),
                         attention_name);

TEST(DecodeAttentionErrors, NameTheArgument) {
  std::mt19937 rng(19);
  const AttentionCase c({latro::DType::Float32, 2, 4, 2, 9, 8, 5, true, true}, rng);
  Matrix k = c.cache_k, v = c.cache_v, out = c.output();
  const latro::DecodeAttentionArgs good = c.args(k, v, out);
  auto with = [&](auto change) {
    latro::DecodeAttentionArgs a = good;
    change(a);
    return a;
  };
  EXPECT_LATRO_ERROR(latro::decode_attention(with([](auto& a) { a.heads = 3; })),
                     "heads must be a positive multiple of kv_heads");
  EXPECT_LATRO_ERROR(latro::decode_attention(with([](auto& a) { a.kv_heads = 0; })), "kv_heads");
  EXPECT_LATRO_ERROR(latro::decode_attention(with([](auto& a) { a.head_dim = 257; })),
                     "head_dim must be in [1, 256]");
  EXPECT_LATRO_ERROR(latro::decode_attention(with([](auto& a) { a.slots = 0; })), "slots");
  EXPECT_LATRO_ERROR(latro::decode_attention(with([](auto& a) { a.cache_row_stride = 10; })),
                     "cache_row_stride");
  EXPECT_LATRO_ERROR(latro::decode_attention(with([](auto& a) { a.mask_row_stride = 3; })),
                     "mask_row_stride");
  EXPECT_LATRO_ERROR(latro::decode_attention(with([](auto& a) { a.new_v = nullptr; })),
                     "new_k and new_v");
  const std::vector<float> angles(16, 0.5f);
  EXPECT_LATRO_ERROR(
      latro::decode_attention(with([&](auto& a) { a.rotary_cos = angles.data(); })),
      "rotary_cos and rotary_sin must be given together");
  EXPECT_LATRO_ERROR(latro::decode_attention(with([&](auto& a) {
                       a.rotary_cos = a.rotary_sin = angles.data();
                       a.head_dim = 7;
                     })),
                     "head_dim must be even for a rotary embedding, got 7");
  EXPECT_LATRO_ERROR(latro::decode_attention(with([&](auto& a) {  // float32 query, bf16 tables
                       a.rotary_cos = a.rotary_sin = angles.data();
                       a.rotary_dtype = latro::DType::BFloat16;
                     })),
                     "rotary_dtype must be float32 or the query's dtype");
  EXPECT_LATRO_ERROR(latro::decode_attention(with([](auto& a) { a.query = nullptr; })), "query");
  EXPECT_LATRO_ERROR(latro::decode_attention(with([](auto& a) { a.out = nullptr; })), "out");
  EXPECT_LATRO_ERROR(latro::decode_attention(with([](auto& a) { a.length = nullptr; })),
                     "length");
  EXPECT_LATRO_ERROR(latro::decode_attention(with([](auto& a) { a.scale = NAN; })), "scale");
  for (int64_t bad : {int64_t{0}, int64_t{10}, int64_t{-3}}) {
    EXPECT_LATRO_ERROR(latro::decode_attention(with([&](auto& a) { a.length = &bad; })),
                       "length must be in [1, slots = 9]");
  }
  EXPECT_LATRO_ERROR(latro::decode_attention(good, 1, 3), "row range");
  EXPECT_TRUE(out.storage == c.output().storage) << "a rejected call wrote its output";
}

}  // namespace

// Host-side argument checks of the core's entry points, shared by the CPU (*.cpp) and CUDA
// (*_kernels.cu) implementations so both reject the same arguments with the same message.
// What only one backend needs (a row range on the CPU, row groups or index limits on CUDA,
// reads of host memory) stays with it. Not installed.
#pragma once

#include <cmath>
#include <cstdint>
#include <initializer_list>

#include "latro/error.h"
#include "latro/latro.h"

namespace latro::detail {

// No array holds more elements: 2^60 of them, 8 bytes each, still have byte offsets in int64.
constexpr int64_t kMaxElements = int64_t{1} << 60;

// The product of `sizes` (each already checked >= 0), the elements an argument spans. Sizes
// whose product passes kMaxElements describe no array in memory, and the index arithmetic over
// them would overflow: an error naming the argument, before anything is read.
inline int64_t checked_elements(const char* name, std::initializer_list<int64_t> sizes) {
  int64_t product = 1;
  for (const int64_t n : sizes) {
    LATRO_CHECK(n == 0 || product <= kMaxElements / n, name,
                " is too large: its sizes multiply past 2^60 elements");
    product *= n;
  }
  return product;
}

// row_stride -1 means dense rows (vocab); anything shorter than a row is an error.
inline int64_t resolve_row_stride(int64_t row_stride, int64_t vocab, const char* name) {
  if (row_stride == -1) return vocab;
  LATRO_CHECK(row_stride >= vocab, name, " = ", row_stride,
              " is smaller than the row length (vocab = ", vocab, ")");
  return row_stride;
}

inline void check_matrix(const void* data, int64_t rows, int64_t vocab, const char* name) {
  LATRO_CHECK(rows >= 0, "rows must be >= 0, got ", rows);
  LATRO_CHECK(vocab > 0, "vocab must be > 0, got ", vocab);
  LATRO_CHECK(data != nullptr || rows == 0, name, " is a null pointer");
}

// token_logprobs: returns the resolved row stride.
inline int64_t check_token_logprobs_args(const TokenLogprobsArgs& args) {
  check_matrix(args.logits, args.rows, args.vocab, "logits");
  const int64_t stride = resolve_row_stride(args.row_stride, args.vocab, "row_stride");
  checked_elements("logits", {args.rows, stride});
  LATRO_CHECK(args.targets != nullptr || args.rows == 0, "targets is a null pointer");
  LATRO_CHECK(args.logprobs != nullptr || args.rows == 0, "logprobs (output) is a null pointer");
  return stride;
}

struct BackwardStrides {
  int64_t logits;
  int64_t grad;
};

// token_logprobs_backward: the resolved strides of the logits and of their gradient (whether
// the two may alias depends on the backend's row layouts, so each backend checks that).
inline BackwardStrides check_token_logprobs_backward_args(const TokenLogprobsBackwardArgs& args) {
  check_matrix(args.logits, args.rows, args.vocab, "logits");
  const BackwardStrides strides{
      resolve_row_stride(args.row_stride, args.vocab, "row_stride"),
      resolve_row_stride(args.grad_row_stride, args.vocab, "grad_row_stride")};
  checked_elements("logits", {args.rows, strides.logits});
  checked_elements("grad_logits", {args.rows, strides.grad});
  LATRO_CHECK(args.targets != nullptr || args.rows == 0, "targets is a null pointer");
  LATRO_CHECK(args.lse != nullptr || args.rows == 0, "lse is a null pointer");
  LATRO_CHECK(args.grad_logprobs != nullptr || args.rows == 0, "grad_logprobs is a null pointer");
  LATRO_CHECK(args.grad_logits != nullptr || args.rows == 0,
              "grad_logits (output) is a null pointer");
  return strides;
}

// sample: returns the resolved row stride. The offset's value is checked where it is read.
inline int64_t check_sample_args(const SampleArgs& args) {
  check_matrix(args.logits, args.rows, args.vocab, "logits");
  const int64_t stride = resolve_row_stride(args.row_stride, args.vocab, "row_stride");
  checked_elements("logits", {args.rows, stride});
  check_sampling_options(args.temperature, args.top_k, args.top_p, args.min_p);
  // The noise of token v comes from Philox blocks v / 8 and 2^31 + v / 16, 32-bit counters
  // (latro/philox.h).
  LATRO_CHECK(args.vocab <= int64_t{0xFFFFFFFF}, "vocab must be below 2^32 for sampling, got ",
              args.vocab);
  LATRO_CHECK(args.seeds != nullptr, "seeds is a null pointer");
  LATRO_CHECK(args.offset != nullptr, "offset is a null pointer");
  LATRO_CHECK(args.ids != nullptr || args.rows == 0, "ids (output) is a null pointer");
  LATRO_CHECK(args.logprobs != nullptr || args.rows == 0, "logprobs (output) is a null pointer");
  return stride;
}

inline void check_rloo_args(const float* rewards, int64_t groups, int64_t k, const float* out) {
  LATRO_CHECK(k >= 2, "k must be >= 2 for a leave-one-out baseline, got ", k);
  LATRO_CHECK(groups >= 1, "rewards must hold at least one group of k = ", k, ", got ", groups,
              " groups");
  checked_elements("rewards", {groups, k});
  LATRO_CHECK(rewards != nullptr, "rewards is a null pointer");
  LATRO_CHECK(out != nullptr, "out is a null pointer");
}

inline void check_latro_rewards_args(const float* answer_logp, const float* rationale_logp,
                                     const float* ref_rationale_logp, const bool* finished,
                                     int64_t n, float kl_coef, float nonstop_penalty,
                                     const float* out) {
  LATRO_CHECK(n >= 1, "answer_logp must not be empty");
  LATRO_CHECK(answer_logp && rationale_logp && ref_rationale_logp && finished && out,
              "latro_rewards got a null pointer");
  LATRO_CHECK(std::isfinite(kl_coef), "kl_coef must be finite, got ", kl_coef);
  LATRO_CHECK(std::isfinite(nonstop_penalty), "nonstop_penalty must be finite, got ",
              nonstop_penalty);
}

struct DecodeAttentionStrides {
  int64_t cache_row;
  int64_t mask_row;
};

// decode_attention: sizes, strides and pointers (the length's value is checked where it is
// read). Returns the resolved row strides.
inline DecodeAttentionStrides check_decode_attention_args(const DecodeAttentionArgs& args) {
  LATRO_CHECK(args.rows >= 0, "rows must be >= 0, got ", args.rows);
  LATRO_CHECK(args.kv_heads > 0, "kv_heads must be > 0, got ", args.kv_heads);
  LATRO_CHECK(args.heads > 0 && args.heads % args.kv_heads == 0,
              "heads must be a positive multiple of kv_heads = ", args.kv_heads, ", got ",
              args.heads);
  LATRO_CHECK(args.slots > 0, "slots must be > 0, got ", args.slots);
  LATRO_CHECK(args.head_dim > 0 && args.head_dim <= kMaxDecodeHeadDim, "head_dim must be in [1, ",
              kMaxDecodeHeadDim, "], got ", args.head_dim);
  LATRO_CHECK(std::isfinite(args.scale), "scale must be finite, got ", args.scale);
  const int64_t row_elements =
      checked_elements("a cache row", {args.kv_heads, args.slots, args.head_dim});
  const DecodeAttentionStrides strides{
      resolve_row_stride(args.cache_row_stride, row_elements, "cache_row_stride"),
      args.slot_mask == nullptr ? 0
                                : resolve_row_stride(args.mask_row_stride, args.slots,
                                                     "mask_row_stride")};
  checked_elements("query", {args.rows, args.heads, args.head_dim});
  checked_elements("cache_k", {args.rows, strides.cache_row});
  checked_elements("slot_mask", {args.rows, strides.mask_row});
  LATRO_CHECK((args.new_k == nullptr) == (args.new_v == nullptr),
              "new_k and new_v must be given together");
  LATRO_CHECK((args.rotary_cos == nullptr) == (args.rotary_sin == nullptr),
              "rotary_cos and rotary_sin must be given together");
  LATRO_CHECK(args.rotary_cos == nullptr || args.head_dim % 2 == 0,
              "head_dim must be even for a rotary embedding, got ", args.head_dim);
  LATRO_CHECK(args.rotary_dtype == DType::Float32 || args.rotary_dtype == args.dtype,
              "rotary_dtype must be float32 or the query's dtype");
  LATRO_CHECK(args.length != nullptr, "length is a null pointer");
  const bool empty = args.rows == 0;
  LATRO_CHECK(args.query != nullptr || empty, "query is a null pointer");
  LATRO_CHECK(args.cache_k != nullptr || empty, "cache_k is a null pointer");
  LATRO_CHECK(args.cache_v != nullptr || empty, "cache_v is a null pointer");
  LATRO_CHECK(args.out != nullptr || empty, "out (output) is a null pointer");
  return strides;
}

// rms_norm: sizes, pointers and eps.
inline void check_rms_norm_args(const RmsNormArgs& args) {
  LATRO_CHECK(args.rows >= 0, "rows must be >= 0, got ", args.rows);
  LATRO_CHECK(args.dim > 0, "dim must be > 0, got ", args.dim);
  LATRO_CHECK(std::isfinite(args.eps) && args.eps >= 0.0f, "eps must be finite and >= 0, got ",
              args.eps);
  checked_elements("x", {args.rows, args.dim});
  const bool empty = args.rows == 0;
  LATRO_CHECK(args.x != nullptr || empty, "x is a null pointer");
  LATRO_CHECK(args.weight != nullptr, "weight is a null pointer");
  LATRO_CHECK(args.out != nullptr || empty, "out (output) is a null pointer");
  LATRO_CHECK(args.residual == nullptr || args.sum != nullptr || empty,
              "sum (output) is a null pointer, but residual is given");
}

// stop_positions(_step): the token rows (the stop table's checks differ: the CPU reads it, the
// CUDA kernels check it on the device).
inline void check_stop_rows(const int64_t* tokens, int64_t rows, int64_t len, int64_t row_stride,
                            int64_t start) {
  LATRO_CHECK(rows >= 0, "rows must be >= 0, got ", rows);
  LATRO_CHECK(len >= 0, "len must be >= 0, got ", len);
  LATRO_CHECK(tokens != nullptr || rows == 0 || len == 0, "tokens is a null pointer");
  LATRO_CHECK(row_stride >= len, "row_stride = ", row_stride, " is smaller than len = ", len);
  LATRO_CHECK(start >= 0 && start <= len, "start must be in [0, ", len, "], got ", start);
  checked_elements("tokens", {rows, row_stride});
}

// A stop table's sizes and pointers: what the host can check without reading the table (the
// CPU then reads its offsets; the CUDA kernels check them on the device).
inline void check_stop_table_fields(const StopSequences& stops) {
  LATRO_CHECK(stops.count >= 0, "stop_sequences count must be >= 0, got ", stops.count);
  LATRO_CHECK(stops.token_count >= 0, "stop_sequences token_count must be >= 0, got ",
              stops.token_count);
  if (stops.count == 0) return;
  LATRO_CHECK(stops.offsets != nullptr, "stop_sequences offsets is a null pointer");
  LATRO_CHECK(stops.tokens != nullptr, "stop_sequences tokens is a null pointer");
}

// silu_mul: the element count and pointers.
inline void check_silu_mul_args(const SiluMulArgs& args) {
  LATRO_CHECK(args.count >= 0, "count must be >= 0, got ", args.count);
  const bool empty = args.count == 0;
  LATRO_CHECK(args.gate != nullptr || empty, "gate is a null pointer");
  LATRO_CHECK(args.up != nullptr || empty, "up is a null pointer");
  LATRO_CHECK(args.out != nullptr || empty, "out (output) is a null pointer");
}

}  // namespace latro::detail

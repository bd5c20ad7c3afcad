// Decode attention on the CPU: one query token per row against a static KV cache.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu_common.h"
#include "latro/latro.h"
#include "decode_elements.h"

namespace latro {
namespace {

template <typename T>
void to_floats(const T* in, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = to_float(in[i]);
}

// Row r's rotary table as floats: stored as float32, or in T (a half model's own tables).
template <typename T>
void table_row(const void* table, int64_t r, int64_t d, bool in_t, float* out) {
  if (in_t) {
    to_floats(static_cast<const T*>(table) + r * d, d, out);
  } else {
    std::copy_n(static_cast<const float*>(table) + r * d, d, out);
  }
}

// A head's vector as floats, rotated when `cos` is given (then rounded to T, as stored), its
// products and sum rounded to T too where `round_in_t` (rotary_dtype = dtype).
template <typename T>
void head_floats(const T* in, int64_t d, const float* cos, const float* sin, bool round_in_t,
                 float* out) {
  to_floats(in, d, out);
  if (cos == nullptr) return;
  const std::vector<float> raw(out, out + d);
  const auto round = [round_in_t](float x) { return round_in_t ? detail::rounded_to<T>(x) : x; };
  for (int64_t i = 0; i < d; ++i) {
    out[i] = detail::rounded_to<T>(detail::rotary_element(raw.data(), i, d, cos[i], sin[i], round));
  }
}

template <typename T>
void attend_rows(const DecodeAttentionArgs& args, const detail::DecodeAttentionStrides& strides,
                 int64_t length, int64_t row_begin, int64_t row_end) {
  const int64_t d = args.head_dim, slots = args.slots;
  const int64_t groups = args.heads / args.kv_heads;
  const T* query = static_cast<const T*>(args.query);
  T* cache_k = static_cast<T*>(args.cache_k);
  T* cache_v = static_cast<T*>(args.cache_v);
  const T* new_k = static_cast<const T*>(args.new_k);
  const T* new_v = static_cast<const T*>(args.new_v);
  T* out = static_cast<T*>(args.out);
  const int64_t newest = length - 1;
  const bool round_in_t = args.rotary_dtype != DType::Float32;  // then it is dtype (checked)
  std::vector<float> q(static_cast<size_t>(d)), kv(static_cast<size_t>(d)),
      acc(static_cast<size_t>(d)), weights(static_cast<size_t>(length)),
      cos_row(static_cast<size_t>(d)), sin_row(static_cast<size_t>(d));
  const bool rotary = args.rotary_cos != nullptr;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const bool* allowed = args.slot_mask ? args.slot_mask + r * strides.mask_row : nullptr;
    if (rotary) {
      table_row<T>(args.rotary_cos, r, d, round_in_t, cos_row.data());
      table_row<T>(args.rotary_sin, r, d, round_in_t, sin_row.data());
    }
    const float* cos = rotary ? cos_row.data() : nullptr;
    const float* sin = rotary ? sin_row.data() : nullptr;
    for (int64_t g = 0; g < args.kv_heads; ++g) {
      T* keys = cache_k + r * strides.cache_row + g * slots * d;
      T* values = cache_v + r * strides.cache_row + g * slots * d;
      if (new_k != nullptr) {  // the caller's newest key and value go into the cache first
        const int64_t from = (r * args.kv_heads + g) * d;
        if (cos == nullptr) {
          std::copy(new_k + from, new_k + from + d, keys + newest * d);
        } else {
          head_floats(new_k + from, d, cos, sin, round_in_t, kv.data());
          for (int64_t i = 0; i < d; ++i) keys[newest * d + i] = from_float<T>(kv[i]);
        }
        std::copy(new_v + from, new_v + from + d, values + newest * d);
      }
      for (int64_t h = g * groups; h < (g + 1) * groups; ++h) {
        // The scale goes on the query, as in the CUDA kernel (the same roundings).
        head_floats(query + (r * args.heads + h) * d, d, cos, sin, round_in_t, q.data());
        for (float& x : q) x *= args.scale;
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t s = 0; s < length; ++s) {
          float score = -std::numeric_limits<float>::infinity();
          if (allowed == nullptr || allowed[s]) {
            to_floats(keys + s * d, d, kv.data());
            float dot = 0.0f;
            for (int64_t i = 0; i < d; ++i) dot += q[i] * kv[i];
            score = dot;
          }
          weights[s] = score;
          top = std::max(top, score);
        }
        std::fill(acc.begin(), acc.end(), 0.0f);
        float total = 0.0f;
        // With no allowed slot every score is -inf: a shift of 0 gives them all weight 0 and
        // the head zeros (top = -inf would make exp(-inf + inf)). A NaN score (a NaN or an
        // infinity in the query or a key) is passed over by the max but gives a NaN weight,
        // so the head's output is NaN, as in torch, not the zeros of a head with no slot.
        const float shift = top == -std::numeric_limits<float>::infinity() ? 0.0f : top;
        for (int64_t s = 0; s < length; ++s) {
          const float w = std::exp(weights[s] - shift);
          if (w == 0.0f) continue;  // masked or negligible: no read, and stale NaN stays out
          total += w;
          to_floats(values + s * d, d, kv.data());
          for (int64_t i = 0; i < d; ++i) acc[i] += w * kv[i];
        }
        const float inverse = total == 0.0f ? 0.0f : 1.0f / total;  // NaN stays NaN
        T* o = out + (r * args.heads + h) * d;
        for (int64_t i = 0; i < d; ++i) o[i] = from_float<T>(acc[i] * inverse);
      }
    }
  }
}

}  // namespace

void decode_attention(const DecodeAttentionArgs& args, int64_t row_begin, int64_t row_end) {
  const detail::DecodeAttentionStrides strides = detail::check_decode_attention_args(args);
  detail::resolve_row_range(args.rows, row_begin, row_end);
  const int64_t length = *args.length;
  LATRO_CHECK(length >= 1 && length <= args.slots, "length must be in [1, slots = ", args.slots,
              "], got ", length);
  LATRO_DISPATCH_DTYPE(args.dtype, T,
                       [&] { attend_rows<T>(args, strides, length, row_begin, row_end); });
}

}  // namespace latro

// Random decode-attention problems and their float64 reference, shared by the CPU suite
// (test_decode_attention.cpp) and the emulated CUDA kernels (test_cuda_emulated.cpp).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "latro/latro.h"
#include "test_util.h"

namespace latro_test {

struct AttentionShape {
  DType dtype;
  int64_t rows, heads, kv_heads, slots, head_dim, length;
  bool fresh;   // new_k / new_v given (written to slot length - 1)
  bool masked;  // a slot mask with holes (a left-padded prompt) and one row with none allowed
  bool rotary = false;  // a rotary embedding of the query and new_k (even head_dim)
  bool rotary_in_dtype = false;  // ... rounded in dtype, as a bf16 / fp16 model's own tables
};

inline std::string attention_name(const ::testing::TestParamInfo<AttentionShape>& info) {
  const AttentionShape& s = info.param;
  return dtype_str(s.dtype) + "_rows" + std::to_string(s.rows) + "_heads" +
         std::to_string(s.heads) + "_kv" + std::to_string(s.kv_heads) + "_slots" +
         std::to_string(s.slots) + "_dim" + std::to_string(s.head_dim) + "_len" +
         std::to_string(s.length) + (s.fresh ? "_fresh" : "") + (s.masked ? "_masked" : "") +
         (s.rotary ? "_rotary" : "") + (s.rotary_in_dtype ? "_indtype" : "");
}

// One problem in the core's layout. Cache rows are padded (cache_row_stride > dense) and every
// element that must not be read holds NaN: slots at or beyond the length, masked slots, the
// newest slot when new_k / new_v supply it, the padding.
struct AttentionCase {
  AttentionShape shape;
  int64_t row_elements = 0;  // kv_heads * slots * head_dim
  int64_t cache_stride = 0;
  Matrix query, cache_k, cache_v, new_k, new_v;
  std::unique_ptr<bool[]> mask;
  int64_t mask_stride = 0;
  int64_t length = 0;
  std::vector<float> cos, sin;  // [rows, head_dim] when rotary
  // The tables as the op reads them: in the dtype when rotary_in_dtype, else float32.
  Matrix cos_table, sin_table;

  AttentionCase(const AttentionShape& s, std::mt19937& rng) : shape(s), length(s.length) {
    const int64_t d = s.head_dim;
    row_elements = s.kv_heads * s.slots * d;
    cache_stride = row_elements + 8;
    query = random_matrix(s.dtype, s.rows * s.heads, d, d, rng, 1.0);
    cache_k = random_matrix(s.dtype, s.rows, row_elements, cache_stride, rng, 1.0);
    cache_v = random_matrix(s.dtype, s.rows, row_elements, cache_stride, rng, 1.0);
    new_k = random_matrix(s.dtype, s.rows * s.kv_heads, d, d, rng, 1.0);
    new_v = random_matrix(s.dtype, s.rows * s.kv_heads, d, d, rng, 1.0);
    mask_stride = s.slots + 3;
    mask.reset(new bool[static_cast<size_t>(s.rows * mask_stride)]);
    std::bernoulli_distribution hole(0.25);
    for (int64_t r = 0; r < s.rows; ++r) {
      for (int64_t slot = 0; slot < mask_stride; ++slot) {
        bool allowed = !s.masked || !hole(rng);
        if (s.masked && r == 1) allowed = false;  // a row with no allowed slot at all
        if (slot == s.length - 1 && s.masked && r != 1) allowed = true;
        mask[static_cast<size_t>(r * mask_stride + slot)] = allowed;
      }
    }
    if (s.rotary) {  // the angles of positions 0..rows-1 at the models' frequencies
      for (int64_t r = 0; r < s.rows; ++r) {
        for (int64_t i = 0; i < d; ++i) {
          const double angle =
              static_cast<double>(r + 3) * std::pow(10000.0, -2.0 * (i % (d / 2)) / d);
          cos.push_back(table_value(std::cos(angle)));
          sin.push_back(table_value(std::sin(angle)));
        }
      }
      const DType stored = s.rotary_in_dtype ? s.dtype : DType::Float32;
      std::vector<std::vector<float>> cos_rows, sin_rows;
      for (int64_t r = 0; r < s.rows; ++r) {
        cos_rows.emplace_back(cos.begin() + r * d, cos.begin() + (r + 1) * d);
        sin_rows.emplace_back(sin.begin() + r * d, sin.begin() + (r + 1) * d);
      }
      cos_table = matrix_of_rows(stored, cos_rows);
      sin_table = matrix_of_rows(stored, sin_rows);
    }
    const float nan = std::numeric_limits<float>::quiet_NaN();
    for (int64_t r = 0; r < s.rows; ++r) {
      for (int64_t g = 0; g < s.kv_heads; ++g) {
        for (int64_t slot = 0; slot < s.slots; ++slot) {
          const bool unread = slot >= s.length || !allowed(r, slot) ||
                              (s.fresh && slot == s.length - 1);
          if (!unread) continue;
          for (int64_t i = 0; i < d; ++i) {
            cache_k.set(r, (g * s.slots + slot) * d + i, nan);
            cache_v.set(r, (g * s.slots + slot) * d + i, nan);
          }
        }
      }
    }
  }

  // A rotary table's value: float32, or a value of the dtype for a half model's own tables.
  float table_value(double x) const {
    const float f = static_cast<float>(x);
    return shape.rotary_in_dtype ? static_cast<float>(matrix_of_rows(shape.dtype, {{f}}).get(0, 0))
                                 : f;
  }

  bool allowed(int64_t r, int64_t slot) const {
    return mask[static_cast<size_t>(r * mask_stride + slot)];
  }

  // The arguments for caches `k` / `v` (copies of cache_k / cache_v) and output `out`.
  latro::DecodeAttentionArgs args(Matrix& k, Matrix& v, Matrix& out) const {
    latro::DecodeAttentionArgs a;
    a.dtype = shape.dtype;
    a.rows = shape.rows;
    a.heads = shape.heads;
    a.kv_heads = shape.kv_heads;
    a.slots = shape.slots;
    a.head_dim = shape.head_dim;
    a.query = query.data();
    a.cache_k = k.data();
    a.cache_v = v.data();
    a.cache_row_stride = cache_stride;
    a.new_k = shape.fresh ? new_k.data() : nullptr;
    a.new_v = shape.fresh ? new_v.data() : nullptr;
    a.slot_mask = shape.masked ? mask.get() : nullptr;
    a.mask_row_stride = mask_stride;
    a.length = &length;
    a.scale = 1.0f / std::sqrt(static_cast<float>(shape.head_dim));
    a.rotary_cos = shape.rotary ? cos_table.data() : nullptr;
    a.rotary_sin = shape.rotary ? sin_table.data() : nullptr;
    a.rotary_dtype = shape.rotary_in_dtype ? shape.dtype : DType::Float32;
    a.out = out.data();
    return a;
  }

  // An output buffer full of NaN, so an element the op forgets to write fails the comparison.
  Matrix output() const {
    return nan_matrix(shape.dtype, shape.rows * shape.heads, shape.head_dim);
  }

  // Element i of `head` (exact stored values) as the op uses it: rotated when the case is,
  // x * cos + rotate_half(x) * sin with float32 roundings (each product and the sum also rounded
  // to the dtype when rotary_in_dtype), then rounded to the dtype.
  double rotated(const Matrix& m, int64_t row_of_m, int64_t r, int64_t i) const {
    const double x = m.get(row_of_m, i);
    if (!shape.rotary) return x;
    const int64_t d = shape.head_dim, half = d / 2;
    const bool first = i < half;
    const float partner = static_cast<float>(m.get(row_of_m, first ? i + half : i - half));
    const volatile float direct = table_value(static_cast<float>(x) * cos[static_cast<size_t>(r * d + i)]);
    const volatile float turned =
        table_value((first ? -partner : partner) * sin[static_cast<size_t>(r * d + i)]);
    Matrix one = matrix_of_rows(shape.dtype, {{direct + turned}});
    return one.get(0, 0);
  }

  // out[(r * heads + h) * head_dim + i] in float64 from the exact stored values.
  std::vector<double> reference() const {
    const AttentionShape& s = shape;
    const int64_t d = s.head_dim, groups = s.heads / s.kv_heads;
    const double scale = 1.0 / std::sqrt(static_cast<double>(static_cast<float>(d)));
    std::vector<double> out(static_cast<size_t>(s.rows * s.heads * d), 0.0);
    for (int64_t r = 0; r < s.rows; ++r) {
      for (int64_t h = 0; h < s.heads; ++h) {
        const int64_t g = h / groups;
        auto key = [&](int64_t slot, int64_t i) {
          return s.fresh && slot == s.length - 1 ? rotated(new_k, r * s.kv_heads + g, r, i)
                                                 : cache_k.get(r, (g * s.slots + slot) * d + i);
        };
        auto value = [&](int64_t slot, int64_t i) {
          return s.fresh && slot == s.length - 1 ? new_v.get(r * s.kv_heads + g, i)
                                                 : cache_v.get(r, (g * s.slots + slot) * d + i);
        };
        std::vector<double> scores;
        std::vector<int64_t> used;
        double top = -kInf;
        for (int64_t slot = 0; slot < s.length; ++slot) {
          if (s.masked && !allowed(r, slot)) continue;
          double dot = 0.0;
          for (int64_t i = 0; i < d; ++i) dot += rotated(query, r * s.heads + h, r, i) * key(slot, i);
          scores.push_back(dot * static_cast<double>(static_cast<float>(scale)));
          used.push_back(slot);
          top = std::max(top, scores.back());
        }
        double total = 0.0;
        for (double& x : scores) total += (x = std::exp(x - top));
        for (size_t j = 0; j < used.size(); ++j) {
          for (int64_t i = 0; i < d; ++i) {
            out[static_cast<size_t>((r * s.heads + h) * d + i)] +=
                scores[j] / total * value(used[j], i);
          }
        }
      }
    }
    return out;
  }
};

// Puts non-finite values where the op reads them: a NaN in row 0's first query head (every
// score of that head NaN), a +inf in row 0's last query head (scores of +-inf or NaN), and in
// the last row's newest slot (new_k / new_v when the case gives them) a NaN in the last KV
// head's key and a +inf in the first KV head's value. The float64 reference then has NaN and
// infinite outputs the op must reproduce; a row with no allowed slot still gives zeros.
inline void put_non_finite_inputs(AttentionCase& c) {
  const AttentionShape& s = c.shape;
  const int64_t d = s.head_dim, r = s.rows - 1, newest = s.length - 1;
  c.query.set(0, 0, std::numeric_limits<float>::quiet_NaN());
  c.query.set(s.heads - 1, d - 1, std::numeric_limits<float>::infinity());
  auto newest_of = [&](Matrix& fresh, Matrix& cache, int64_t g, int64_t i, float x) {
    if (s.fresh) {
      fresh.set(r * s.kv_heads + g, i, x);
    } else {
      cache.set(r, (g * s.slots + newest) * d + i, x);
    }
  };
  newest_of(c.new_k, c.cache_k, s.kv_heads - 1, d - 1, std::numeric_limits<float>::quiet_NaN());
  newest_of(c.new_v, c.cache_v, 0, 0, std::numeric_limits<float>::infinity());
}

// The caches after the op: as before, with new_k / new_v in slot length - 1 when given.
inline void expect_caches_written(const AttentionCase& c, const Matrix& k, const Matrix& v) {
  Matrix want_k = c.cache_k, want_v = c.cache_v;
  const AttentionShape& s = c.shape;
  if (s.fresh) {
    for (int64_t r = 0; r < s.rows; ++r) {
      for (int64_t g = 0; g < s.kv_heads; ++g) {
        for (int64_t i = 0; i < s.head_dim; ++i) {
          const int64_t at = (g * s.slots + s.length - 1) * s.head_dim + i;
          want_k.set(r, at, static_cast<float>(c.rotated(c.new_k, r * s.kv_heads + g, r, i)));
          want_v.set(r, at, static_cast<float>(c.new_v.get(r * s.kv_heads + g, i)));
        }
      }
    }
  }
  EXPECT_TRUE(k.storage == want_k.storage) << "cache_k holds other values than expected";
  EXPECT_TRUE(v.storage == want_v.storage) << "cache_v holds other values than expected";
}

// Odd sizes: groups of 1, 3, 5 and 8 query heads (two query tiles of the CUDA kernel), head
// dims that are and are not a multiple of the 16-byte vector, 1 to 256; one slot, a length
// short of the capacity, and more slots than one CUDA block takes (1,024).
inline std::vector<AttentionShape> attention_shapes() {
  std::vector<AttentionShape> shapes;
  for (DType dtype : all_dtypes()) {
    shapes.push_back({dtype, 3, 6, 2, 37, 24, 37, true, true});
    shapes.push_back({dtype, 2, 5, 5, 41, 5, 19, false, false});
    shapes.push_back({dtype, 2, 5, 1, 70, 64, 53, true, false});
    shapes.push_back({dtype, 2, 8, 1, 29, 256, 23, false, true});
    shapes.push_back({dtype, 5, 4, 4, 3, 8, 1, true, false});
    shapes.push_back({dtype, 2, 3, 1, 1100, 12, 1090, true, true});
    shapes.push_back({dtype, 1, 8, 2, 64, 80, 64, false, false});
    shapes.push_back({dtype, 3, 6, 2, 37, 24, 37, true, true, true});
    shapes.push_back({dtype, 2, 8, 1, 29, 256, 23, true, false, true});
    shapes.push_back({dtype, 4, 12, 4, 50, 6, 31, false, true, true});
    shapes.push_back({dtype, 2, 3, 1, 1100, 12, 1090, true, false, true});
    if (dtype != DType::Float32) {  // a half model's own tables: the rotation rounds in dtype
      shapes.push_back({dtype, 3, 6, 2, 37, 24, 37, true, true, true, true});
      shapes.push_back({dtype, 2, 3, 1, 1100, 12, 1090, true, false, true, true});
      // head_dim 256: more table elements than the CUDA kernel has threads to stage them
      shapes.push_back({dtype, 2, 8, 1, 29, 256, 23, true, false, true, true});
    }
  }
  return shapes;
}

// Outputs are one float32 computation rounded into the dtype.
inline Tolerance attention_tolerance(DType dtype) {
  switch (dtype) {
    case DType::Float32: return {5e-5, 5e-5};
    case DType::BFloat16: return {5e-5, 1.0 / 128};
    case DType::Float16: return {5e-5, 1.0 / 1024};
  }
  return {0, 0};
}

}  // namespace latro_test

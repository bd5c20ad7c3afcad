// The models' RMSNorm on the CPU, optionally fused with the residual addition before it.
#include "cpu_common.h"
#include "decode_elements.h"
#include "latro/latro.h"

namespace latro {
namespace {

template <typename T>
void normalize_rows(const RmsNormArgs& args, int64_t row_begin, int64_t row_end) {
  const int64_t d = args.dim;
  const T* x = static_cast<const T*>(args.x);
  const T* residual = static_cast<const T*>(args.residual);
  const T* weight = static_cast<const T*>(args.weight);
  T* sum = static_cast<T*>(args.sum);
  T* out = static_cast<T*>(args.out);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* row_residual = residual ? residual + r * d : nullptr;
    double squares = 0.0;
    for (int64_t i = 0; i < d; ++i) {
      const float s = detail::rms_input(x + r * d, row_residual, i);
      if (residual) sum[r * d + i] = from_float<T>(s);
      squares += static_cast<double>(s) * s;
    }
    const float inverse = detail::rms_inverse(squares, d, args.eps);
    // s again from where it now lies (sum holds it exactly, rounded to T): sum may be the
    // residual or x itself, updated in place, and x + residual can no longer be re-read.
    const T* s_row = residual ? sum + r * d : x + r * d;
    for (int64_t i = 0; i < d; ++i) {
      out[r * d + i] = detail::rms_output(weight[i], to_float(s_row[i]), inverse);
    }
  }
}

}  // namespace

void rms_norm(const RmsNormArgs& args, int64_t row_begin, int64_t row_end) {
  detail::check_rms_norm_args(args);
  detail::resolve_row_range(args.rows, row_begin, row_end);
  LATRO_DISPATCH_DTYPE(args.dtype, T, [&] { normalize_rows<T>(args, row_begin, row_end); });
}

}  // namespace latro

// Tensor checks for the bindings: every message names the argument, as the Python reference
// backend does, so both backends fail the same way on the same bad input.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <type_traits>
#include <utility>

#include "latro/latro.h"

namespace latro_torch {

// The one place where torch dtypes meet the core's dtype tag (float32, bfloat16, float16).
inline latro::DType core_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return latro::DType::Float32;
    case at::kBFloat16: return latro::DType::BFloat16;
    case at::kHalf: return latro::DType::Float16;
    default:
      TORCH_CHECK_TYPE(false, name, " must be float32, bfloat16 or float16, got ",
                       t.scalar_type());
  }
}

inline void check_dtype(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must be ", dtype, ", got ",
                   t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& reference, const char* name,
                              const char* reference_name) {
  TORCH_CHECK_VALUE(t.device() == reference.device(), name, " is on ", t.device(), " but ",
                    reference_name, " is on ", reference.device());
}

// t has the dtype and the device of `reference` (the op's tensors that must match one).
inline void check_like(const at::Tensor& t, const at::Tensor& reference, const char* name,
                       const char* reference_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == reference.scalar_type(), name, " must be ",
                   reference.scalar_type(), " like ", reference_name, ", got ", t.scalar_type());
  check_same_device(t, reference, name, reference_name);
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must have ", dim, " dimension(s), got shape ",
                    t.sizes());
}

// Runs a core call, turning latro::Error into a Python ValueError with the core's message.
template <typename F>
auto call_core(F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const latro::Error& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
}

}  // namespace latro_torch

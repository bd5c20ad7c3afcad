// One element of a rotary position embedding, shared by the CPU and CUDA decode attention so
// both round alike. Not installed.
#pragma once

#include "latro/types.h"

namespace latro::detail {

// x * cos + rotate_half(x) * sin at element i of a head, where rotate_half(x)[i] is
// -x[i + D/2] in the first half and x[i - D/2] in the second (`partner` is that other element).
// Each product and the sum are rounded to float32, as torch's element-wise ops round them: no
// fused multiply-add, which would change the last bit against the models' own forward.
LATRO_HOST_DEVICE float rotary_element(float x, float partner, float cos, float sin,
                                       bool first_half) {
  const float rotated = first_half ? -partner : partner;
#if defined(__CUDA_ARCH__)
  return __fadd_rn(__fmul_rn(x, cos), __fmul_rn(rotated, sin));
#else
  // GCC contracts a * b + c into an FMA by default where the target has one; volatile stops it.
  const volatile float direct = x * cos;
  const volatile float turned = rotated * sin;
  return direct + turned;
#endif
}

}  // namespace latro::detail

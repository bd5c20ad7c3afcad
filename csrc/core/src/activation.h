// The gated MLP's activation element, shared by the CPU and CUDA silu_mul so both round alike.
// Not installed.
#pragma once

#include <cmath>

#include "latro/types.h"

namespace latro::detail {

// silu(g) * u with the models' roundings: silu in float32 (g / (1 + exp(-g)), torch's formula),
// rounded to T as the activation's output tensor, then the product rounded to T.
template <typename T>
LATRO_HOST_DEVICE T silu_times(float g, float u) {
  const float activated = to_float(from_float<T>(g / (1.0f + expf(-g))));
  return from_float<T>(activated * u);
}

}  // namespace latro::detail

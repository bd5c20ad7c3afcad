// Internal helpers of stop-sequence detection shared by the CPU (stop.cpp) and CUDA (stop_kernels.cu)
// kernels, so both match token sequences the same way. Not installed.
#pragma once

#include <cstdint>

#include "latro/latro.h"
#include "latro/types.h"  // LATRO_HOST_DEVICE

namespace latro::detail {

// Whether stop sequence `which` occurs in row[:len] beginning at index `begin`.
LATRO_HOST_DEVICE bool stop_occurs_at(const int64_t* row, int64_t len, const StopSequences& stops,
                                      int64_t which, int64_t begin) {
  const int64_t* seq = stops.tokens + stops.offsets[which];
  const int64_t n = stops.offsets[which + 1] - stops.offsets[which];
  if (begin < 0 || begin + n > len) return false;
  for (int64_t i = 0; i < n; ++i) {
    if (row[begin + i] != seq[i]) return false;
  }
  return true;
}

// The step form of stop detection for one row: the start of the first stop sequence (in table
// order) that ends exactly at `step` and begins at or after `start`, or len when none does.
LATRO_HOST_DEVICE int64_t stop_ending_at(const int64_t* row, int64_t len,
                                         const StopSequences& stops, int64_t step,
                                         int64_t start) {
  for (int64_t which = 0; which < stops.count; ++which) {
    const int64_t n = stops.offsets[which + 1] - stops.offsets[which];
    const int64_t begin = step + 1 - n;
    if (begin >= start && stop_occurs_at(row, len, stops, which, begin)) return begin;
  }
  return len;
}

}  // namespace latro::detail

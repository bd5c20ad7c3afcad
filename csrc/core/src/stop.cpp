// Stop-sequence detection ("The answer is", EOS, ...) over token rows.
#include "cpu_common.h"
#include "latro/latro.h"
#include "launch_checks.h"
#include "stop_common.h"

namespace latro {

void check_stop_sequences(const StopSequences& stops) {
  detail::check_stop_table_fields(stops);
  if (stops.count == 0) {  // no sequences, so no tokens; the offsets ([0]) may be left out
    LATRO_CHECK(stops.offsets == nullptr || stops.offsets[0] == 0,
                "stop_sequences offsets must start at 0, got ", stops.offsets[0]);
    LATRO_CHECK(stops.token_count == 0, "stop_sequences offsets end at 0 but there are ",
                stops.token_count, " stop tokens");
    return;
  }
  LATRO_CHECK(stops.offsets[0] == 0, "stop_sequences offsets must start at 0, got ",
              stops.offsets[0]);
  for (int64_t i = 0; i < stops.count; ++i) {
    LATRO_CHECK(stops.offsets[i + 1] > stops.offsets[i], "stop_sequences[", i,
                "] is empty (offsets must increase strictly)");
  }
  LATRO_CHECK(stops.offsets[stops.count] == stops.token_count, "stop_sequences offsets end at ",
              stops.offsets[stops.count], " but there are ", stops.token_count, " stop tokens");
}

void stop_positions(const int64_t* tokens, int64_t rows, int64_t len, int64_t row_stride,
                    const StopSequences& stops, int64_t start, int64_t* out, int64_t row_begin,
                    int64_t row_end) {
  detail::check_stop_rows(tokens, rows, len, row_stride, start);
  check_stop_sequences(stops);
  detail::resolve_row_range(rows, row_begin, row_end);
  LATRO_CHECK(out != nullptr || rows == 0, "out is a null pointer");
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t* row = tokens + r * row_stride;
    int64_t found = len;
    for (int64_t begin = start; begin < len && found == len; ++begin) {
      for (int64_t which = 0; which < stops.count; ++which) {
        if (detail::stop_occurs_at(row, len, stops, which, begin)) {
          found = begin;
          break;
        }
      }
    }
    out[r] = found;
  }
}

void stop_positions_step(const int64_t* tokens, int64_t rows, int64_t len, int64_t row_stride,
                         const StopSequences& stops, int64_t step, int64_t start,
                         const int64_t* positions_in, int64_t* positions_out, int64_t row_begin,
                         int64_t row_end) {
  detail::check_stop_rows(tokens, rows, len, row_stride, start);
  check_stop_sequences(stops);
  detail::resolve_row_range(rows, row_begin, row_end);
  LATRO_CHECK(step >= 0 && step < len, "step must be in [0, ", len, "), got ", step);
  LATRO_CHECK((positions_in != nullptr && positions_out != nullptr) || rows == 0,
              "positions is a null pointer");
  for (int64_t r = row_begin; r < row_end; ++r) {
    int64_t position = positions_in[r];
    LATRO_CHECK(position >= 0 && position <= len, "positions[", r, "] = ", position,
                " is outside [0, ", len, "]");
    if (position == len) {
      position = detail::stop_ending_at(tokens + r * row_stride, len, stops, step, start);
    }
    positions_out[r] = position;
  }
}

}  // namespace latro

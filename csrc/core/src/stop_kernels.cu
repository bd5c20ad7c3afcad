// Stop-sequence detection on CUDA (semantics in latro.h). The stop table lives in device
// memory, so its offsets are validated by the kernels themselves (a BadStopTable record and
// untouched positions instead of out-of-bounds reads).
#include "cuda_common.cuh"
#include "launch_checks.h"
#include "stop_common.h"

namespace latro::cuda {
namespace {

constexpr unsigned kFullWarp = 0xFFFFFFFFu;

// Offsets start at 0, increase strictly and end at the number of stop tokens: checked by a
// whole warp, its lanes splitting the table; every lane gets the answer.
__device__ bool warp_stop_table_ok(const StopSequences& stops, int lane) {
  if (stops.count == 0) {  // as check_stop_sequences: no tokens, offsets [0] or left out
    return stops.token_count == 0 && (stops.offsets == nullptr || stops.offsets[0] == 0);
  }
  bool ok = true;
  if (lane == 0) ok = stops.offsets[0] == 0 && stops.offsets[stops.count] == stops.token_count;
  for (int64_t i = lane; i < stops.count; i += detail::kWarp) {
    ok = ok && stops.offsets[i + 1] > stops.offsets[i];
  }
  return __ballot_sync(kFullWarp, !ok) == 0;
}

constexpr int kStopThreads = 256;
static_assert(kStopThreads >= detail::kWarp, "the table is checked by the block's first warp");

// One block per row: threads try start positions, the block keeps the smallest match.
__global__ void __launch_bounds__(kStopThreads)
    stop_positions_kernel(const int64_t* __restrict__ tokens, int64_t rows, int64_t len,
                          int64_t row_stride, StopSequences stops, int64_t start,
                          int64_t* __restrict__ out, uint64_t* status) {
  __shared__ unsigned long long earliest;
  __shared__ bool table_ok;
  if (threadIdx.x < detail::kWarp) {
    const bool ok = warp_stop_table_ok(stops, static_cast<int>(threadIdx.x));
    if (threadIdx.x == 0) {
      table_ok = ok;
      if (!ok) detail::record(status, -1, StatusKind::BadStopTable);
    }
  }
  __syncthreads();
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    if (!table_ok) {
      if (threadIdx.x == 0) out[row] = len;
      continue;
    }
    if (threadIdx.x == 0) earliest = static_cast<unsigned long long>(len);
    __syncthreads();
    const int64_t* r = tokens + row * row_stride;
    for (int64_t begin = start + threadIdx.x; begin < len; begin += blockDim.x) {
      // Positions past the earliest match found so far cannot win.
      if (static_cast<unsigned long long>(begin) >= earliest) break;
      for (int64_t which = 0; which < stops.count; ++which) {
        if (::latro::detail::stop_occurs_at(r, len, stops, which, begin)) {
          atomicMin(&earliest, static_cast<unsigned long long>(begin));
          break;
        }
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) out[row] = static_cast<int64_t>(earliest);
    __syncthreads();
  }
}

// The step form runs once per decode step, so its cost is paid a few hundred times a rollout.
// One warp per row, its lanes splitting the table: validating the offsets and trying the
// sequences ending at `step` both take count / 32 iterations per lane instead of count per
// thread (with the 855-sequence stop set of bench_gpu.py, a serial scan per thread cost tens of
// microseconds a step). The first sequence in table order that matches wins, as on the CPU.
constexpr int kStepThreads = 128;  // four warps: four rows per block
static_assert(kStepThreads % detail::kWarp == 0, "every row gets a whole warp");

// stop_ending_at (stop_common.h) with the sequences split over the warp's lanes: each round
// tries 32 consecutive sequences and the lowest lane that matched is the first in table order.
__device__ int64_t warp_stop_ending_at(const int64_t* row, int64_t len, const StopSequences& stops,
                                       int64_t step, int64_t start, int lane) {
  for (int64_t base = 0; base < stops.count; base += detail::kWarp) {
    const int64_t which = base + lane;
    int64_t begin = len;
    bool hit = false;
    if (which < stops.count) {
      begin = step + 1 - (stops.offsets[which + 1] - stops.offsets[which]);
      hit = begin >= start && ::latro::detail::stop_occurs_at(row, len, stops, which, begin);
    }
    const unsigned hits = __ballot_sync(kFullWarp, hit);
    if (hits != 0) return __shfl_sync(kFullWarp, begin, __ffs(static_cast<int>(hits)) - 1);
  }
  return len;
}

// Only stop sequences ending exactly at *step are checked. A row's warp takes every branch
// together (the table, the step and the row's position are the same for all its lanes), so
// its ballots always see the whole warp; warps past the last row exit whole.
__global__ void __launch_bounds__(kStepThreads)
    stop_positions_step_kernel(const int64_t* __restrict__ tokens, int64_t rows, int64_t len,
                               int64_t row_stride, StopSequences stops,
                               const int64_t* step_ptr, int64_t start,
                               const int64_t* positions_in, int64_t* positions_out,
                               uint64_t* status) {
  const int lane = static_cast<int>(threadIdx.x) % detail::kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / detail::kWarp) +
                      static_cast<int64_t>(threadIdx.x) / detail::kWarp;
  if (row >= rows) return;
  const int64_t step = *step_ptr;
  int64_t position = positions_in[row];
  if (!warp_stop_table_ok(stops, lane)) {
    if (row == 0 && lane == 0) detail::record(status, -1, StatusKind::BadStopTable);
  } else if (step < 0 || step >= len) {
    if (row == 0 && lane == 0) detail::record(status, -1, StatusKind::StepOutOfRange);
  } else if (position < 0 || position > len) {
    if (lane == 0) detail::record(status, row, StatusKind::PositionOutOfRange);
  } else if (position == len) {
    position = warp_stop_ending_at(tokens + row * row_stride, len, stops, step, start, lane);
  }
  // Every lane has read positions_in[row] before it is written: positions_out may alias it.
  __syncwarp();
  if (lane == 0) positions_out[row] = position;
}

// The rows as on the CPU, and what of the table the host can check without reading it.
void check_rows(const int64_t* tokens, int64_t rows, int64_t len, int64_t row_stride,
                int64_t start, const StopSequences& stops) {
  ::latro::detail::check_stop_rows(tokens, rows, len, row_stride, start);
  ::latro::detail::check_stop_table_fields(stops);
}

}  // namespace

void stop_positions(const int64_t* tokens, int64_t rows, int64_t len, int64_t row_stride,
                    const StopSequences& stops, int64_t start, int64_t* out,
                    cudaStream_t stream, uint64_t* status) {
  check_rows(tokens, rows, len, row_stride, start, stops);
  LATRO_CHECK(out != nullptr || rows == 0, "out is a null pointer");
  if (rows == 0) return;
  detail::launch(stop_positions_kernel, detail::row_blocks(rows), kStopThreads, stream,
      tokens, rows, len, row_stride, stops, start, out, status);
  LATRO_CUDA_CHECK(cudaGetLastError());
}

void stop_positions_step(const int64_t* tokens, int64_t rows, int64_t len, int64_t row_stride,
                         const StopSequences& stops, const int64_t* step, int64_t start,
                         const int64_t* positions_in, int64_t* positions_out,
                         cudaStream_t stream, uint64_t* status) {
  check_rows(tokens, rows, len, row_stride, start, stops);
  LATRO_CHECK(step != nullptr, "step is a null pointer");
  LATRO_CHECK((positions_in != nullptr && positions_out != nullptr) || rows == 0,
              "positions is a null pointer");
  if (rows == 0) return;
  constexpr int64_t kRowsPerBlock = kStepThreads / detail::kWarp;
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  LATRO_CHECK(blocks <= INT32_MAX, "too many rows: ", rows);
  detail::launch(stop_positions_step_kernel, static_cast<unsigned int>(blocks), kStepThreads,
      stream, tokens, rows, len, row_stride, stops, step, start, positions_in, positions_out,
      status);
  LATRO_CUDA_CHECK(cudaGetLastError());
}

}  // namespace latro::cuda

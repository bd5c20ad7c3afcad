// latro_engine's CUDA kernels: the ops of latro.h on device pointers and a cudaStream_t.
//
// Include this header only where the CUDA runtime headers are available; latro.h alone stays
// usable without CUDA. Every launcher takes the same argument structs as the CPU functions,
// with every pointer (data, targets, seeds, offset, ...) a device pointer, runs asynchronously
// on `stream` (no host synchronization, no allocation, so it can be captured in a CUDA graph)
// and validates what the host can see (sizes, strides, scalar options) by throwing
// latro::Error, exactly as the CPU functions do.
//
// What the host cannot see without a synchronization (a target out of range, a NaN logit, a
// negative offset held in device memory) is reported through an optional device status word:
// pass `status` (one uint64_t in device memory, set by reset_status) and read it back with
// read_status when the caller can afford to wait. The kernels never read out of bounds on bad
// data: they write a defined result instead (NaN log-probabilities, id -1) and record the first
// offending row. With status == nullptr nothing is recorded.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

#include "latro/latro.h"

namespace latro {

// A failed CUDA runtime call (launch error, bad device pointer, ...), as opposed to bad
// arguments (plain Error): bindings report it as a runtime error, not a value error.
class CudaError : public Error {
 public:
  using Error::Error;
};

}  // namespace latro

#define LATRO_CUDA_CHECK(expr)                                                           \
  do {                                                                                   \
    const cudaError_t latro_cuda_error_ = (expr);                                        \
    if (latro_cuda_error_ != cudaSuccess) {                                              \
      throw ::latro::CudaError(::latro::detail::concat("CUDA error: ",                   \
                                                       cudaGetErrorString(latro_cuda_error_), \
                                                       " (", #expr, ")"),                \
                               __FILE__, __LINE__);                                      \
    }                                                                                    \
  } while (0)

namespace latro::cuda {

// ---------------------------------------------------------------- device status
// What went wrong, in the order the CPU functions check it: when several rows are bad the
// record names the lowest row, and errors that concern the whole call (row -1) come first.
enum class StatusKind : uint32_t {
  Ok = 0,
  BadStopTable = 1,       // row -1: stop offsets not 0, increasing, ending at the token count
  NegativeOffset = 2,     // row -1: *offset < 0
  StepOutOfRange = 3,     // row -1: *step outside [0, len)
  TargetOutOfRange = 4,   // targets[row] not in [0, vocab) and not ignore_index
  RowHasNaN = 5,          // logits row contains NaN (sampling)
  RowHasNoFinite = 6,     // logits row is all -inf (sampling)
  RowHasPosInf = 7,       // logits row (after temperature) contains +inf (sampling)
  PositionOutOfRange = 8, // positions[row] outside [0, len]
  LengthOutOfRange = 9,   // row -1: *length outside [1, slots] (decode attention)
};

struct StatusRecord {
  StatusKind kind = StatusKind::Ok;
  int64_t row = -1;  // -1 for errors of the whole call
  bool ok() const { return kind == StatusKind::Ok; }
};

// The encoding kernels use with atomicMin: (row + 1) << 4 | kind; all ones = no error.
constexpr uint64_t kStatusOk = ~uint64_t{0};
inline StatusRecord decode_status(uint64_t word) {
  if (word == kStatusOk) return {};
  return {static_cast<StatusKind>(word & 15u), static_cast<int64_t>(word >> 4) - 1};
}

// Sets *status to kStatusOk (an asynchronous memset on `stream`).
void reset_status(uint64_t* status, cudaStream_t stream);
// Copies *status back, waiting for `stream`: a host synchronization.
StatusRecord read_status(const uint64_t* status, cudaStream_t stream);
// Throws latro::Error with a generic message for a failed record (bindings that can read the
// offending values write a more precise one themselves).
void throw_on_status(const StatusRecord& record);
const char* describe(StatusKind kind);

// ---------------------------------------------------------------- row layouts
// Rows of a [groups, rows_per_group, vocab] view: row r starts at element
// (r / rows_per_group) * group_stride + (r % rows_per_group) * row_stride. The default (0)
// is one group, i.e. the plain row_stride of the argument struct. This lets a binding pass
// logits[:, :-1] (the usual LM shift) without copying them.
struct RowGroups {
  int64_t rows_per_group = 0;
  int64_t group_stride = 0;
};

// ---------------------------------------------------------------- kernels
// One block per row, online log-sum-exp in float32 (per-thread partial sums combined in a
// float64 total), logits read once. Semantics of latro::token_logprobs; a target out of range
// gives NaN (logprob and lse) and a TargetOutOfRange record.
void token_logprobs(const TokenLogprobsArgs& args, cudaStream_t stream,
                    uint64_t* status = nullptr, RowGroups groups = {});

// Semantics of latro::token_logprobs_backward (grad_logits may alias logits exactly); a target
// out of range gives a NaN row. `groups` describes the logits, `grad_groups` grad_logits.
void token_logprobs_backward(const TokenLogprobsBackwardArgs& args, cudaStream_t stream,
                             uint64_t* status = nullptr, RowGroups groups = {},
                             RowGroups grad_groups = {});

// Semantics of latro::sample, with the same Philox stream, so CPU and CUDA draw the same ids
// (up to ties within rounding). seeds and offset are device pointers read by the kernel: no
// host synchronization, capturable in a CUDA graph. Thresholds are found without sorting the
// vocabulary (histograms and a small sort in shared memory; see sample_kernels.cu). A bad row (NaN,
// all -inf, +inf) gets id -1 and log-prob NaN; a negative offset gives that to every row.
void sample(const SampleArgs& args, cudaStream_t stream, uint64_t* status = nullptr);

// Plain temperature sampling (no top-k, top-p or min-p: the rollout's case) may split each row
// over several blocks, "slices", whose partials (max, normalizer, best Gumbel key) a second
// kernel merges, so that a few rows still fill the device. The ids are the same for any number
// of slices (log-probabilities within rounding). plan_sample picks the slices for a device
// with `multiprocessors` SMs: about two blocks per SM, each slice at least 4,096 tokens, at
// most 64 (LATRO_CUDA_SAMPLE_SLICES=<n> sets them); 1 for any other sampling. The overload
// above is sample with SamplePlan{} (one block per row, no workspace).
struct SamplePlan {
  int64_t slices = 1;           // blocks per row
  int64_t workspace_bytes = 0;  // device workspace the launch needs (0 when slices == 1)
};
SamplePlan plan_sample(const SampleArgs& args, int multiprocessors);
void sample(const SampleArgs& args, const SamplePlan& plan, void* workspace, cudaStream_t stream,
            uint64_t* status = nullptr);

// Semantics of latro::stop_positions / stop_positions_step. `stops` points to device memory;
// its offsets are validated on the device against stops.token_count (BadStopTable: every
// output is then len / positions_in). stop_positions_step reads `step` from device memory
// (StepOutOfRange: outputs = inputs).
void stop_positions(const int64_t* tokens, int64_t rows, int64_t len, int64_t row_stride,
                    const StopSequences& stops, int64_t start, int64_t* out,
                    cudaStream_t stream, uint64_t* status = nullptr);
void stop_positions_step(const int64_t* tokens, int64_t rows, int64_t len, int64_t row_stride,
                         const StopSequences& stops, const int64_t* step, int64_t start,
                         const int64_t* positions_in, int64_t* positions_out,
                         cudaStream_t stream, uint64_t* status = nullptr);

// Semantics of latro::rloo_advantages (the same float64 arithmetic in the same order, so the
// results equal the CPU's bit for bit) and latro::latro_rewards.
void rloo_advantages(const float* rewards, int64_t groups, int64_t k, float* out,
                     cudaStream_t stream);
void latro_rewards(const float* answer_logp, const float* rationale_logp,
                   const float* ref_rationale_logp, const bool* finished, int64_t n,
                   float kl_coef, float nonstop_penalty, PenaltyMode mode, float* out,
                   cudaStream_t stream);

// Semantics of latro::decode_attention with `length` read from device memory (no host
// synchronization; capturable). Each (row, KV head) is one block per split of its slots
// [0, length): the block reads every key and value of its split once (16-byte loads, the
// query heads of the group sharing them), keeps the scores in shared memory and writes the
// output, or with several splits a partial (max, sum, weighted values) that a second kernel
// combines. A length outside [1, slots] gives NaN outputs, writes no cache slot and a
// LengthOutOfRange record.
struct DecodeAttentionPlan {
  int64_t splits = 1;            // blocks per (row, KV head)
  int64_t workspace_floats = 0;  // float32 workspace the launch needs (0 when splits == 1)
};
// Splits so that a device with `multiprocessors` SMs gets about two blocks per SM even for
// few rows (planned for the cache's capacity, since the length is on the device; each block
// takes length / splits slots at every step, so the work stays even as the length grows).
DecodeAttentionPlan plan_decode_attention(const DecodeAttentionArgs& args, int multiprocessors);
void decode_attention(const DecodeAttentionArgs& args, const DecodeAttentionPlan& plan,
                      float* workspace, cudaStream_t stream, uint64_t* status = nullptr);

// Semantics of latro::rms_norm, one block per row; the same float32 results as the CPU's up to
// the float64 sum of squares' order (which the float32 mean hides).
void rms_norm(const RmsNormArgs& args, cudaStream_t stream);

// Semantics of latro::silu_mul (a grid-stride loop; the CPU's float32 up to expf's last bit).
void silu_mul(const SiluMulArgs& args, cudaStream_t stream);

}  // namespace latro::cuda

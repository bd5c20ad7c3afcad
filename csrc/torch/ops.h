// Shared pieces of the tensor ops: argument validation (identical for every backend) and the
// row walker that hands uniformly strided runs of rows to the core.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

#include "checks.h"

namespace latro_torch {

// Set, for its scope on this thread, by a composite op whose calls of the token_logprobs
// kernels get inputs it has checked itself (the LM-head scorers: block-local targets, always in
// range, and the caller's targets checked once up front). The CUDA binding then skips its
// per-call read of the device status, a host synchronization each: a scorer makes one call per
// vocabulary block or row chunk, and those reads took 2.3 ms of a 32 ms forward on an H100
// (2026-11-27: N=16,384, V=128,256, 16 blocks; 5 ms with the backward).
class ComposedCalls {
 public:
  ComposedCalls() { ++depth(); }
  ~ComposedCalls() { --depth(); }
  ComposedCalls(const ComposedCalls&) = delete;
  ComposedCalls& operator=(const ComposedCalls&) = delete;
  static bool active() { return depth() > 0; }

 private:
  static int& depth() {
    static thread_local int calls = 0;
    return calls;
  }
};

// token_logprobs: logits [..., V] floating, targets int64 [...], same device.
void check_token_logprobs(const at::Tensor& logits, const at::Tensor& targets);
// its backward: as above, plus lse float32 and grad_logprobs of the shape of targets.
void check_token_logprobs_backward(const at::Tensor& grad, const at::Tensor& logits,
                                   const at::Tensor& targets, const at::Tensor& lse);
// sample: logits [B, V], seeds int64 0-d or [B], offset int64 0-d, all on one device.
void check_sample(const at::Tensor& logits, const at::Tensor& seeds, const at::Tensor& offset,
                  double temperature, int64_t top_k, double top_p, double min_p);
// stop_positions: tokens int64 [B, T]; stop_tokens int64 [S] and stop_offsets int64 [n + 1].
void check_stop_table(const at::Tensor& tokens, const at::Tensor& stop_tokens,
                      const at::Tensor& stop_offsets, int64_t start);
// stop_positions_step: step int64 0-d and positions int64 [B], on the tokens' device.
void check_stop_step(const at::Tensor& tokens, const at::Tensor& step,
                     const at::Tensor& positions);
// decode_attention: query [B, H, D], caches [B, G, S, D] dense within a row (written in place,
// never copied), optional new_k / new_v [B, G, D] and slot_mask bool [B, S], length int64
// 0-d, optional rotary_cos / rotary_sin [B, D] (D even) float32 or of query's dtype (a half
// model's own tables: the rotation then rounds in that dtype), all on query's device and of
// query's dtype (float32/bf16/fp16) where not said otherwise.
void check_decode_attention(const at::Tensor& query, const at::Tensor& cache_k,
                            const at::Tensor& cache_v, const std::optional<at::Tensor>& new_k,
                            const std::optional<at::Tensor>& new_v,
                            const std::optional<at::Tensor>& slot_mask,
                            const std::optional<at::Tensor>& rotary_cos,
                            const std::optional<at::Tensor>& rotary_sin, const at::Tensor& length,
                            double scale);
// The checked inputs of decode_attention laid out for the core (query and new_k / new_v
// contiguous, the mask with dense rows, the rotary tables contiguous in the dtype they came in;
// undefined where not given) and its output [B, H, D].
struct DecodeAttentionTensors {
  at::Tensor query, new_k, new_v, slot_mask, rotary_cos, rotary_sin, out;
  latro::DType rotary_dtype = latro::DType::Float32;
};
DecodeAttentionTensors prepare_decode_attention(
    const at::Tensor& query, const at::Tensor& cache_k, const at::Tensor& cache_v,
    const std::optional<at::Tensor>& new_k, const std::optional<at::Tensor>& new_v,
    const std::optional<at::Tensor>& slot_mask, const std::optional<at::Tensor>& rotary_cos,
    const std::optional<at::Tensor>& rotary_sin, const at::Tensor& length, double scale);
// rms_norm: x [..., D] float32/bf16/fp16, weight [D] and residual (optional) of x's shape, all
// of x's dtype and device; eps finite and >= 0.
void check_rms_norm(const at::Tensor& x, const at::Tensor& weight,
                    const std::optional<at::Tensor>& residual, double eps);
// silu_mul: gate float32/bf16/fp16, up of its shape, dtype and device.
void check_silu_mul(const at::Tensor& gate, const at::Tensor& up);
// The checked inputs of rms_norm, contiguous, with its outputs (sum empty without a residual).
struct RmsNormTensors {
  at::Tensor x, residual, weight, out, sum;
};
RmsNormTensors prepare_rms_norm(const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& residual, double eps);
void check_rloo(const at::Tensor& rewards, int64_t k);
void check_latro_rewards(const at::Tensor& answer_logp, const at::Tensor& rationale_logp,
                         const at::Tensor& ref_rationale_logp, const at::Tensor& finished,
                         double kl_coef, double nonstop_penalty, const std::string& penalty_mode);
latro::PenaltyMode parse_penalty_mode(const std::string& penalty_mode);

// The logits as rows of a matrix: a tensor [..., V] whose last dimension is dense. Rows that
// share all leading indices but the last form runs with one stride, which is what the core
// takes; `for_each_run` visits the runs that cover rows [begin, end).
struct RowLayout {
  explicit RowLayout(const at::Tensor& t);
  int64_t rows = 0;
  int64_t vocab = 0;
  template <typename F>
  void for_each_run(int64_t begin, int64_t end, F&& fn) const {
    while (begin < end) {
      const int64_t outer = begin / inner_rows_;
      const int64_t inner = begin % inner_rows_;
      const int64_t count = std::min(end - begin, inner_rows_ - inner);
      fn(outer_offset(outer) + inner * inner_stride_, inner_stride_, begin, count);
      begin += count;
    }
  }

 private:
  int64_t outer_offset(int64_t outer) const;
  std::vector<int64_t> outer_sizes_, outer_strides_;
  int64_t inner_rows_ = 1;
  int64_t inner_stride_ = 0;
};

// Logits rows as the kernels take them: dense along the vocabulary and not overlapping
// (expanded tensors); a copy with standard strides otherwise. Not contiguous(), which returns a
// [N, 1] view with stride(-1) != 1 as it is (torch ignores the strides of size-1 dimensions).
inline at::Tensor dense_rows(const at::Tensor& t) {
  const bool dense_last = t.stride(-1) == 1;
  const bool overlapping = t.dim() >= 2 && t.size(-2) > 1 && t.stride(-2) < t.size(-1);
  return dense_last && !overlapping ? t : t.clone(at::MemoryFormat::Contiguous);
}

// Rows per parallel task so each task touches about 64 KiB of logits.
inline int64_t row_grain(int64_t vocab) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(vocab, 1)); }

}  // namespace latro_torch

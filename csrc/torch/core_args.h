// The core's argument structs (latro/latro.h) filled from tensors, once for every backend: the
// CPU and CUDA bindings both call these builders, so a field cannot be set on one device only.
// The tensors are already validated and laid out as the core expects (dense last dimension,
// contiguous targets and outputs); where they live (host or device memory) is the caller's
// business, as are the stream and the device guard.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "checks.h"
#include "latro/latro.h"

namespace latro_torch {

namespace detail {
// The fields the forward and the backward of token_logprobs share.
template <typename Args>
void fill_logits_rows(Args& args, const at::Tensor& logits, int64_t rows, int64_t vocab,
                      int64_t row_stride, const at::Tensor& targets, int64_t ignore_index) {
  args.logits = logits.data_ptr();
  args.dtype = core_dtype(logits, "logits");
  args.rows = rows;
  args.vocab = vocab;
  args.row_stride = row_stride;
  args.targets = targets.data_ptr<int64_t>();
  args.ignore_index = ignore_index;
}

template <typename Args>
void narrow_logits_rows(Args& args, const void* logits, int64_t row_stride, int64_t first,
                        int64_t count) {
  args.logits = logits;
  args.rows = count;
  args.row_stride = row_stride;
  args.targets += first;
}
}  // namespace detail

// ---------------------------------------------------------------- token_logprobs
// `rows` rows of `vocab` logits, `row_stride` elements apart, from logits.data_ptr();
// targets int64, logprobs and lse float32, one per row.
inline latro::TokenLogprobsArgs token_logprobs_args(const at::Tensor& logits, int64_t rows,
                                                    int64_t vocab, int64_t row_stride,
                                                    const at::Tensor& targets,
                                                    int64_t ignore_index,
                                                    const at::Tensor& logprobs,
                                                    const at::Tensor& lse) {
  latro::TokenLogprobsArgs args;
  detail::fill_logits_rows(args, logits, rows, vocab, row_stride, targets, ignore_index);
  args.logprobs = logprobs.data_ptr<float>();
  args.lse = lse.data_ptr<float>();
  return args;
}

// Rows [first, first + count) of `args`, whose logits start at `logits` (the caller's row
// walk knows the address and the stride of such a run).
inline latro::TokenLogprobsArgs token_logprobs_rows(latro::TokenLogprobsArgs args,
                                                    const void* logits, int64_t row_stride,
                                                    int64_t first, int64_t count) {
  detail::narrow_logits_rows(args, logits, row_stride, first, count);
  args.logprobs += first;
  if (args.lse != nullptr) args.lse += first;
  return args;
}

// As token_logprobs_args, plus lse and grad_logprobs (float32, one per row) and grad_logits
// (the dtype of logits, rows `grad_row_stride` elements apart; may be logits itself).
inline latro::TokenLogprobsBackwardArgs token_logprobs_backward_args(
    const at::Tensor& logits, int64_t rows, int64_t vocab, int64_t row_stride,
    const at::Tensor& targets, int64_t ignore_index, const at::Tensor& lse,
    const at::Tensor& grad_logprobs, const at::Tensor& grad_logits, int64_t grad_row_stride) {
  latro::TokenLogprobsBackwardArgs args;
  detail::fill_logits_rows(args, logits, rows, vocab, row_stride, targets, ignore_index);
  args.lse = lse.data_ptr<float>();
  args.grad_logprobs = grad_logprobs.data_ptr<float>();
  args.grad_logits = grad_logits.data_ptr();
  args.grad_row_stride = grad_row_stride;
  return args;
}

// Rows [first, first + count) of `args`: logits at `logits`, their gradient at `grad_logits`.
inline latro::TokenLogprobsBackwardArgs token_logprobs_backward_rows(
    latro::TokenLogprobsBackwardArgs args, const void* logits, int64_t row_stride,
    void* grad_logits, int64_t grad_row_stride, int64_t first, int64_t count) {
  detail::narrow_logits_rows(args, logits, row_stride, first, count);
  args.lse += first;
  args.grad_logprobs += first;
  args.grad_logits = grad_logits;
  args.grad_row_stride = grad_row_stride;
  return args;
}

// ---------------------------------------------------------------- sample
// logits [B, V] with a dense last dimension and rows that do not overlap; seeds int64 0-d
// (one seed for the batch) or [B] (one per row); offset int64 0-d; ids int64 and logprobs
// float32 [B].
inline latro::SampleArgs sample_args(const at::Tensor& logits, const at::Tensor& seeds,
                                     const at::Tensor& offset, double temperature, int64_t top_k,
                                     double top_p, double min_p, const at::Tensor& ids,
                                     const at::Tensor& logprobs) {
  const int64_t rows = logits.size(0);
  latro::SampleArgs args;
  args.logits = logits.data_ptr();
  args.dtype = core_dtype(logits, "logits");
  args.rows = rows;
  args.vocab = logits.size(1);
  args.row_stride = rows > 1 ? logits.stride(0) : logits.size(1);
  args.seeds = seeds.data_ptr<int64_t>();
  args.per_row_seeds = seeds.dim() == 1;
  args.offset = offset.data_ptr<int64_t>();
  args.temperature = static_cast<float>(temperature);
  args.top_k = top_k;
  args.top_p = static_cast<float>(top_p);
  args.min_p = static_cast<float>(min_p);
  args.ids = ids.data_ptr<int64_t>();
  args.logprobs = logprobs.data_ptr<float>();
  return args;
}

// ---------------------------------------------------------------- stop detection
// stop_tokens int64 [S] and stop_offsets int64 [n + 1], both contiguous: n stop sequences.
inline latro::StopSequences stop_sequences(const at::Tensor& stop_tokens,
                                           const at::Tensor& stop_offsets) {
  return {stop_tokens.data_ptr<int64_t>(), stop_offsets.data_ptr<int64_t>(),
          stop_offsets.size(0) - 1, stop_tokens.size(0)};
}

// The contiguous tensors of a stop_positions call (each backend checks and builds it).
struct StopTable {
  at::Tensor tokens, stop_tokens, stop_offsets;
  latro::StopSequences view() const { return stop_sequences(stop_tokens, stop_offsets); }
};

// ---------------------------------------------------------------- decode_attention
// query and new_k / new_v contiguous, the caches as check_decode_attention accepts them, the
// mask undefined or [B, S] with a dense last dimension, the rotary tables undefined or
// contiguous, out [B, H, D] contiguous.
inline latro::DecodeAttentionArgs decode_attention_args(
    const at::Tensor& query, const at::Tensor& cache_k, const at::Tensor& cache_v,
    const at::Tensor& new_k, const at::Tensor& new_v, const at::Tensor& slot_mask,
    const at::Tensor& rotary_cos, const at::Tensor& rotary_sin, latro::DType rotary_dtype,
    const at::Tensor& length, double scale, const at::Tensor& out) {
  latro::DecodeAttentionArgs args;
  args.dtype = core_dtype(query, "query");
  args.rows = query.size(0);
  args.heads = query.size(1);
  args.head_dim = query.size(2);
  args.kv_heads = cache_k.size(1);
  args.slots = cache_k.size(2);
  args.query = query.data_ptr();
  args.cache_k = cache_k.data_ptr();
  args.cache_v = cache_v.data_ptr();
  args.cache_row_stride = args.rows > 1 ? cache_k.stride(0) : -1;
  args.new_k = new_k.defined() ? new_k.data_ptr() : nullptr;
  args.new_v = new_v.defined() ? new_v.data_ptr() : nullptr;
  args.slot_mask = slot_mask.defined() ? slot_mask.data_ptr<bool>() : nullptr;
  args.mask_row_stride = slot_mask.defined() && args.rows > 1 ? slot_mask.stride(0) : -1;
  args.rotary_cos = rotary_cos.defined() ? rotary_cos.data_ptr() : nullptr;
  args.rotary_sin = rotary_sin.defined() ? rotary_sin.data_ptr() : nullptr;
  args.rotary_dtype = rotary_dtype;
  args.length = length.data_ptr<int64_t>();
  args.scale = static_cast<float>(scale);
  args.out = out.data_ptr();
  return args;
}

// ---------------------------------------------------------------- rms_norm
// x, residual (undefined without one), weight, out and sum contiguous.
inline latro::RmsNormArgs rms_norm_args(const at::Tensor& x, const at::Tensor& residual,
                                        const at::Tensor& weight, double eps,
                                        const at::Tensor& out, const at::Tensor& sum) {
  latro::RmsNormArgs args;
  args.dtype = core_dtype(x, "x");
  args.dim = x.size(-1);
  args.rows = x.numel() / args.dim;
  args.x = x.data_ptr();
  args.residual = residual.defined() ? residual.data_ptr() : nullptr;
  args.sum = residual.defined() ? sum.data_ptr() : nullptr;
  args.weight = weight.data_ptr();
  args.eps = static_cast<float>(eps);
  args.out = out.data_ptr();
  return args;
}

// ---------------------------------------------------------------- silu_mul
// gate, up and out contiguous, of one shape.
inline latro::SiluMulArgs silu_mul_args(const at::Tensor& gate, const at::Tensor& up,
                                        const at::Tensor& out) {
  return latro::SiluMulArgs{core_dtype(gate, "gate"), gate.numel(), gate.data_ptr(),
                            up.data_ptr(), out.data_ptr()};
}

}  // namespace latro_torch

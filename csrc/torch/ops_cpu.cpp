// CPU implementations of the latro_engine ops: validate, lay the tensors out as the core
// expects, and spread rows over ATen's intra-op threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "core_args.h"
#include "ops.h"

namespace latro_torch {
namespace {

const char* bytes(const at::Tensor& t) { return static_cast<const char*>(t.data_ptr()); }

std::tuple<at::Tensor, at::Tensor> token_logprobs_cpu(const at::Tensor& logits_in,
                                                      const at::Tensor& targets_in,
                                                      int64_t ignore_index) {
  check_token_logprobs(logits_in, targets_in);
  const at::Tensor logits = dense_rows(logits_in);
  const at::Tensor targets = targets_in.contiguous();
  const auto opts = logits.options().dtype(at::kFloat);
  at::Tensor logprobs = at::empty(targets.sizes(), opts);
  at::Tensor lse = at::empty(targets.sizes(), opts);
  const RowLayout layout(logits);
  if (layout.rows == 0) return {logprobs, lse};
  // Every row at once; each run of rows below narrows it.
  const latro::TokenLogprobsArgs all = token_logprobs_args(
      logits, layout.rows, layout.vocab, -1, targets, ignore_index, logprobs, lse);
  const int64_t element = logits.element_size();
  call_core([&] {
    at::parallel_for(0, layout.rows, row_grain(layout.vocab), [&](int64_t begin, int64_t end) {
      layout.for_each_run(begin, end, [&](int64_t offset, int64_t stride, int64_t first, int64_t count) {
        latro::token_logprobs(
            token_logprobs_rows(all, bytes(logits) + offset * element, stride, first, count));
      });
    });
  });
  return {logprobs, lse};
}

// Writes the gradient of rows of `logits` into `grad_logits` (dense rows), which may be
// `logits` itself.
void token_logprobs_backward_into(const at::Tensor& grad_in, const at::Tensor& logits,
                                  const at::Tensor& targets_in, const at::Tensor& lse_in,
                                  int64_t ignore_index, const at::Tensor& grad_logits) {
  const RowLayout layout(logits);
  if (layout.rows == 0) return;
  const at::Tensor grad = grad_in.to(at::kFloat).contiguous();
  const at::Tensor targets = targets_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  const RowLayout out_layout(grad_logits);
  // Every row at once; each run of rows below narrows it.
  const latro::TokenLogprobsBackwardArgs all =
      token_logprobs_backward_args(logits, layout.rows, layout.vocab, -1, targets, ignore_index,
                                   lse, grad, grad_logits, -1);
  const int64_t element = logits.element_size();
  char* out_bytes = static_cast<char*>(grad_logits.data_ptr());
  call_core([&] {
    at::parallel_for(0, layout.rows, row_grain(layout.vocab), [&](int64_t begin, int64_t end) {
      layout.for_each_run(begin, end, [&](int64_t offset, int64_t stride, int64_t first, int64_t count) {
        // Output runs may be split differently (dense output): walk them inside this run.
        out_layout.for_each_run(first, first + count, [&](int64_t out_offset, int64_t out_stride,
                                                          int64_t out_first, int64_t out_count) {
          latro::token_logprobs_backward(token_logprobs_backward_rows(
              all, bytes(logits) + (offset + (out_first - first) * stride) * element, stride,
              out_bytes + out_offset * element, out_stride, out_first, out_count));
        });
      });
    });
  });
}

at::Tensor token_logprobs_backward_cpu(const at::Tensor& grad, const at::Tensor& logits_in,
                                       const at::Tensor& targets, const at::Tensor& lse,
                                       int64_t ignore_index) {
  check_token_logprobs_backward(grad, logits_in, targets, lse);
  const at::Tensor logits = dense_rows(logits_in);
  at::Tensor grad_logits = at::empty(logits.sizes(), logits.options());
  token_logprobs_backward_into(grad, logits, targets, lse, ignore_index, grad_logits);
  return grad_logits;
}

void token_logprobs_backward_inplace_cpu(const at::Tensor& grad, at::Tensor& logits,
                                         const at::Tensor& targets, const at::Tensor& lse,
                                         int64_t ignore_index) {
  check_token_logprobs_backward(grad, logits, targets, lse);
  TORCH_CHECK_VALUE(logits.is_contiguous(), "logits must be contiguous to be overwritten in place");
  token_logprobs_backward_into(grad, logits, targets, lse, ignore_index, logits);
}

std::tuple<at::Tensor, at::Tensor> sample_cpu(const at::Tensor& logits_in, const at::Tensor& seeds_in,
                                              const at::Tensor& offset, double temperature,
                                              int64_t top_k, double top_p, double min_p) {
  check_sample(logits_in, seeds_in, offset, temperature, top_k, top_p, min_p);
  const at::Tensor logits = dense_rows(logits_in);
  const at::Tensor seeds = seeds_in.contiguous();
  const int64_t rows = logits.size(0);
  at::Tensor ids = at::empty({rows}, logits.options().dtype(at::kLong));
  at::Tensor logprobs = at::empty({rows}, logits.options().dtype(at::kFloat));
  // Checked here too so that an empty batch fails like a full one (the core never runs then).
  const int64_t offset_value = offset.item<int64_t>();
  TORCH_CHECK_VALUE(offset_value >= 0, "offset must be >= 0, got ", offset_value);
  if (rows == 0) return {ids, logprobs};
  const latro::SampleArgs args =
      sample_args(logits, seeds, offset, temperature, top_k, top_p, min_p, ids, logprobs);
  call_core([&] {
    at::parallel_for(0, rows, row_grain(args.vocab),
                     [&](int64_t begin, int64_t end) { latro::sample(args, begin, end); });
  });
  return {ids, logprobs};
}

StopTable stop_table(const at::Tensor& tokens, const at::Tensor& stop_tokens,
                     const at::Tensor& stop_offsets, int64_t start) {
  check_stop_table(tokens, stop_tokens, stop_offsets, start);
  StopTable table{tokens.contiguous(), stop_tokens.contiguous(), stop_offsets.contiguous()};
  call_core([&] { latro::check_stop_sequences(table.view()); });
  return table;
}

at::Tensor stop_positions_cpu(const at::Tensor& tokens, const at::Tensor& stop_tokens,
                              const at::Tensor& stop_offsets, int64_t start) {
  const StopTable table = stop_table(tokens, stop_tokens, stop_offsets, start);
  const int64_t rows = tokens.size(0), len = tokens.size(1);
  at::Tensor out = at::empty({rows}, tokens.options());
  if (rows == 0) return out;
  call_core([&] {
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      latro::stop_positions(table.tokens.data_ptr<int64_t>(), rows, len, len, table.view(), start,
                            out.data_ptr<int64_t>(), begin, end);
    });
  });
  return out;
}

at::Tensor stop_positions_step_cpu(const at::Tensor& tokens, const at::Tensor& stop_tokens,
                                   const at::Tensor& stop_offsets, const at::Tensor& step,
                                   const at::Tensor& positions_in, int64_t start) {
  const StopTable table = stop_table(tokens, stop_tokens, stop_offsets, start);
  check_stop_step(tokens, step, positions_in);
  const int64_t rows = tokens.size(0), len = tokens.size(1);
  const at::Tensor positions = positions_in.contiguous();
  at::Tensor out = at::empty({rows}, tokens.options());
  const int64_t step_value = step.item<int64_t>();
  // Checked before the empty-batch return so that an empty batch fails like a full one.
  TORCH_CHECK_VALUE(step_value >= 0 && step_value < len, "step must be in [0, ", len, "), got ",
                    step_value);
  if (rows == 0) return out;
  call_core([&] {
    latro::stop_positions_step(table.tokens.data_ptr<int64_t>(), rows, len, len, table.view(),
                               step_value, start, positions.data_ptr<int64_t>(),
                               out.data_ptr<int64_t>());
  });
  return out;
}

at::Tensor decode_attention_cpu(const at::Tensor& query, at::Tensor& cache_k, at::Tensor& cache_v,
                                const std::optional<at::Tensor>& new_k,
                                const std::optional<at::Tensor>& new_v,
                                const std::optional<at::Tensor>& slot_mask,
                                const std::optional<at::Tensor>& rotary_cos,
                                const std::optional<at::Tensor>& rotary_sin,
                                const at::Tensor& length, double scale) {
  const DecodeAttentionTensors t = prepare_decode_attention(
      query, cache_k, cache_v, new_k, new_v, slot_mask, rotary_cos, rotary_sin, length, scale);
  // Checked before the empty-batch return so that an empty batch fails like a full one.
  const int64_t length_value = length.item<int64_t>();
  TORCH_CHECK_VALUE(length_value >= 1 && length_value <= cache_k.size(2),
                    "length must be in [1, slots = ", cache_k.size(2), "], got ", length_value);
  const int64_t rows = query.size(0);
  if (rows == 0) return t.out;
  const latro::DecodeAttentionArgs args = decode_attention_args(
      t.query, cache_k, cache_v, t.new_k, t.new_v, t.slot_mask, t.rotary_cos, t.rotary_sin,
      t.rotary_dtype, length, scale, t.out);
  call_core([&] {
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      latro::decode_attention(args, begin, end);
    });
  });
  return t.out;
}

std::tuple<at::Tensor, at::Tensor> rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                const std::optional<at::Tensor>& residual,
                                                double eps) {
  const RmsNormTensors t = prepare_rms_norm(x, weight, residual, eps);
  const latro::RmsNormArgs args = rms_norm_args(t.x, t.residual, t.weight, eps, t.out, t.sum);
  if (args.rows == 0) return {t.out, t.sum};
  call_core([&] {
    at::parallel_for(0, args.rows, row_grain(args.dim), [&](int64_t begin, int64_t end) {
      latro::rms_norm(args, begin, end);
    });
  });
  return {t.out, t.sum};
}

at::Tensor silu_mul_cpu(const at::Tensor& gate_in, const at::Tensor& up_in) {
  check_silu_mul(gate_in, up_in);
  const at::Tensor gate = gate_in.contiguous(), up = up_in.contiguous();
  at::Tensor out = at::empty(gate.sizes(), gate.options());
  const latro::SiluMulArgs args = silu_mul_args(gate, up, out);
  call_core([&] {
    at::parallel_for(0, args.count, 32768, [&](int64_t begin, int64_t end) {
      latro::silu_mul(args, begin, end);
    });
  });
  return out;
}

at::Tensor rloo_advantages_cpu(const at::Tensor& rewards_in, int64_t k) {
  check_rloo(rewards_in, k);
  const at::Tensor rewards = rewards_in.contiguous();
  at::Tensor out = at::empty_like(rewards);
  call_core([&] {
    latro::rloo_advantages(rewards.data_ptr<float>(), rewards.size(0) / k, k,
                           out.data_ptr<float>());
  });
  return out;
}

at::Tensor latro_rewards_cpu(const at::Tensor& answer_logp, const at::Tensor& rationale_logp,
                             const at::Tensor& ref_rationale_logp, const at::Tensor& finished,
                             double kl_coef, double nonstop_penalty,
                             c10::string_view penalty_mode_view) {
  const std::string penalty_mode(penalty_mode_view);
  check_latro_rewards(answer_logp, rationale_logp, ref_rationale_logp, finished, kl_coef,
                      nonstop_penalty, penalty_mode);
  const at::Tensor a = answer_logp.contiguous(), r = rationale_logp.contiguous(),
                   ref = ref_rationale_logp.contiguous(), f = finished.contiguous();
  at::Tensor out = at::empty_like(a);
  call_core([&] {
    latro::latro_rewards(a.data_ptr<float>(), r.data_ptr<float>(), ref.data_ptr<float>(),
                         f.data_ptr<bool>(), a.size(0), static_cast<float>(kl_coef),
                         static_cast<float>(nonstop_penalty), parse_penalty_mode(penalty_mode),
                         out.data_ptr<float>());
  });
  return out;
}

}  // namespace
}  // namespace latro_torch

TORCH_LIBRARY_IMPL(latro_engine, CPU, m) {
  m.impl("token_logprobs", &latro_torch::token_logprobs_cpu);
  m.impl("token_logprobs_backward", &latro_torch::token_logprobs_backward_cpu);
  m.impl("token_logprobs_backward_", &latro_torch::token_logprobs_backward_inplace_cpu);
  m.impl("sample", &latro_torch::sample_cpu);
  m.impl("stop_positions", &latro_torch::stop_positions_cpu);
  m.impl("stop_positions_step", &latro_torch::stop_positions_step_cpu);
  m.impl("decode_attention", &latro_torch::decode_attention_cpu);
  m.impl("rms_norm", &latro_torch::rms_norm_cpu);
  m.impl("silu_mul", &latro_torch::silu_mul_cpu);
  m.impl("rloo_advantages", &latro_torch::rloo_advantages_cpu);
  m.impl("latro_rewards", &latro_torch::latro_rewards_cpu);
}

// CUDA implementations of the latro_engine ops: the same validation as the CPU ones (ops.h),
// then the core's launchers (latro/cuda.h) on the current stream of the tensors' device.
//
// Errors that depend on tensor contents (a target out of range, a NaN logit, an offset held
// on the device) are recorded by the kernels in a device status word. By default the binding
// reads it back after the launch, which waits for the stream, and raises the CPU backend's
// ValueError. It skips that read, and so never synchronizes, while the stream is being captured
// into a CUDA graph or when LATRO_CUDA_CHECKS=off: bad rows then come back as NaN log-probs
// or id -1 instead of an exception. It skips it too inside a composite op that checked the
// inputs itself (ComposedCalls in ops.h: the LM-head scorers).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "core_args.h"
#include "latro/cuda.h"
#include "ops.h"

namespace latro_torch {
namespace {

using latro::cuda::StatusKind;
using latro::cuda::StatusRecord;

// Runs a core call; bad arguments become ValueError, CUDA failures RuntimeError.
template <typename F>
void call_cuda(F&& f) {
  try {
    f();
  } catch (const latro::CudaError& e) {
    TORCH_CHECK(false, e.what());
  } catch (const latro::Error& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
}

cudaStream_t current_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

// Whether this call reads the device status back (see the top of the file).
bool synchronizing_checks(cudaStream_t stream) {
  if (ComposedCalls::active()) return false;  // the composite checked the inputs (ops.h)
  const char* mode = std::getenv("LATRO_CUDA_CHECKS");
  if (mode != nullptr && (std::strcmp(mode, "off") == 0 || std::strcmp(mode, "0") == 0)) {
    return false;
  }
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  return capture == cudaStreamCaptureStatusNone;
}

// A device status word for one call, or none when nothing will read it.
struct Status {
  at::Tensor word;
  uint64_t* ptr() const {
    return word.defined() ? reinterpret_cast<uint64_t*>(word.data_ptr<int64_t>()) : nullptr;
  }
  static Status make(const at::Tensor& like, cudaStream_t stream) {
    Status s;
    if (!synchronizing_checks(stream)) return s;
    s.word = at::empty({1}, like.options().dtype(at::kLong));
    call_cuda([&] { latro::cuda::reset_status(s.ptr(), stream); });
    return s;
  }
  // Waits for the stream (through torch, so torch.cuda.set_sync_debug_mode sees it).
  StatusRecord read() const {
    if (!word.defined()) return {};
    return latro::cuda::decode_status(static_cast<uint64_t>(word.item<int64_t>()));
  }
};

// "targets[2, 5]" for a flat index into a tensor of `sizes` (the reference backend's form).
std::string index_string(int64_t flat, at::IntArrayRef sizes) {
  std::vector<int64_t> index(sizes.size());
  for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= 0; --d) {
    index[d] = sizes[d] ? flat % sizes[d] : 0;
    flat = sizes[d] ? flat / sizes[d] : 0;
  }
  std::string out;
  for (size_t d = 0; d < index.size(); ++d) out += (d ? ", " : "") + std::to_string(index[d]);
  return out;
}

void raise_target_error(const StatusRecord& record, const at::Tensor& targets, int64_t vocab,
                        int64_t ignore_index) {
  if (record.ok()) return;
  if (record.kind == StatusKind::TargetOutOfRange) {
    const int64_t value = targets.reshape({-1})[record.row].item<int64_t>();
    TORCH_CHECK_VALUE(false, "targets[", index_string(record.row, targets.sizes()), "] = ", value,
                      " is out of range for vocab size ", vocab, " (ignore_index is ",
                      ignore_index, ")");
  }
  call_cuda([&] { latro::cuda::throw_on_status(record); });
}

// ------------------------------------------------------------------ logits layout
// The logits [..., V] as rows the kernels can address without a copy: a dense last dimension,
// the second-to-last with one stride, and every dimension before it collapsing into one
// (contiguous [B, T, V], the LM-shifted logits[:, :-1], a transposed batch). Anything else is
// copied to contiguous rows first.
struct CudaRows {
  at::Tensor t;
  int64_t rows = 0, vocab = 0, row_stride = 0;
  latro::cuda::RowGroups groups;
};

bool describe_rows(const at::Tensor& t, CudaRows& out) {
  const int64_t dim = t.dim();
  out.vocab = t.size(-1);
  out.rows = out.vocab ? t.numel() / out.vocab : 0;
  if (out.vocab > 1 && t.stride(-1) != 1) return false;
  if (dim == 1) {
    out.row_stride = out.vocab;
    return true;
  }
  const int64_t inner = t.size(-2);
  out.row_stride = inner > 1 ? t.stride(-2) : out.vocab;
  if (out.row_stride < out.vocab) return false;  // overlapping (expanded) rows
  int64_t outer_count = 1, outer_stride = 0, expected = -1;
  for (int64_t d = dim - 3; d >= 0; --d) {
    if (t.size(d) == 1) continue;
    if (expected == -1) {
      outer_stride = t.stride(d);
    } else if (t.stride(d) != expected) {
      return false;
    }
    expected = t.stride(d) * t.size(d);
    outer_count *= t.size(d);
  }
  if (outer_count > 1) out.groups = {inner, outer_stride};
  return true;
}

CudaRows cuda_rows(const at::Tensor& logits) {
  CudaRows out;
  out.t = logits;
  if (describe_rows(logits, out)) return out;
  out = CudaRows{};
  out.t = logits.contiguous();
  describe_rows(out.t, out);
  return out;
}

// ------------------------------------------------------------------ token_logprobs
std::tuple<at::Tensor, at::Tensor> token_logprobs_cuda(const at::Tensor& logits_in,
                                                       const at::Tensor& targets_in,
                                                       int64_t ignore_index) {
  check_token_logprobs(logits_in, targets_in);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const cudaStream_t stream = current_stream(logits_in);
  const CudaRows rows = cuda_rows(logits_in);
  const at::Tensor targets = targets_in.contiguous();
  const auto opts = logits_in.options().dtype(at::kFloat);
  at::Tensor logprobs = at::empty(targets.sizes(), opts);
  at::Tensor lse = at::empty(targets.sizes(), opts);
  if (rows.rows == 0) return {logprobs, lse};
  const Status status = Status::make(logits_in, stream);
  const latro::TokenLogprobsArgs args = token_logprobs_args(
      rows.t, rows.rows, rows.vocab, rows.row_stride, targets, ignore_index, logprobs, lse);
  call_cuda([&] { latro::cuda::token_logprobs(args, stream, status.ptr(), rows.groups); });
  raise_target_error(status.read(), targets, rows.vocab, ignore_index);
  return {logprobs, lse};
}

// Writes the gradient of `rows` into `grad_logits` (dense rows of the same shape), which may
// be the logits themselves.
void backward_into(const at::Tensor& grad_in, const CudaRows& rows, const at::Tensor& targets_in,
                   const at::Tensor& lse_in, int64_t ignore_index, const at::Tensor& grad_logits) {
  if (rows.rows == 0) return;
  const cudaStream_t stream = current_stream(rows.t);
  const at::Tensor grad = grad_in.to(at::kFloat).contiguous();
  const at::Tensor targets = targets_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  const Status status = Status::make(rows.t, stream);
  const latro::TokenLogprobsBackwardArgs args =
      token_logprobs_backward_args(rows.t, rows.rows, rows.vocab, rows.row_stride, targets,
                                   ignore_index, lse, grad, grad_logits, rows.vocab);
  const bool in_place = grad_logits.data_ptr() == rows.t.data_ptr();
  call_cuda([&] {
    latro::cuda::token_logprobs_backward(args, stream, status.ptr(), rows.groups,
                                         in_place ? rows.groups : latro::cuda::RowGroups{});
  });
  raise_target_error(status.read(), targets, rows.vocab, ignore_index);
}

at::Tensor token_logprobs_backward_cuda(const at::Tensor& grad, const at::Tensor& logits,
                                        const at::Tensor& targets, const at::Tensor& lse,
                                        int64_t ignore_index) {
  check_token_logprobs_backward(grad, logits, targets, lse);
  const c10::cuda::CUDAGuard guard(logits.device());
  const CudaRows rows = cuda_rows(logits);
  at::Tensor grad_logits = at::empty(logits.sizes(), logits.options());  // dense rows
  backward_into(grad, rows, targets, lse, ignore_index, grad_logits);
  return grad_logits;
}

void token_logprobs_backward_inplace_cuda(const at::Tensor& grad, at::Tensor& logits,
                                          const at::Tensor& targets, const at::Tensor& lse,
                                          int64_t ignore_index) {
  check_token_logprobs_backward(grad, logits, targets, lse);
  TORCH_CHECK_VALUE(logits.is_contiguous(), "logits must be contiguous to be overwritten in place");
  const c10::cuda::CUDAGuard guard(logits.device());
  CudaRows rows;
  rows.t = logits;
  describe_rows(logits, rows);  // contiguous: dense rows, never a copy
  backward_into(grad, rows, targets, lse, ignore_index, logits);
}

// The SM count of a tensor's device, which the kernel plans split their work by. The runtime's
// attribute query, not ATen/cuda/CUDAContext.h (which needs the cuSPARSE and cuBLAS headers,
// absent from a bare toolkit).
int multiprocessors(const at::Tensor& on) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount,
                                        on.device().index()));
  return count;
}

// The device workspace a kernel plan asks for, from torch's allocator (inside a CUDA graph
// capture, from the graph's pool); none when it needs no elements. workspace_ptr: its data, or
// null for none.
at::Tensor plan_workspace(int64_t elements, const at::TensorOptions& options) {
  return elements > 0 ? at::empty({elements}, options) : at::Tensor();
}
void* workspace_ptr(const at::Tensor& workspace) {
  return workspace.defined() ? workspace.data_ptr() : nullptr;
}

// ------------------------------------------------------------------ sample
std::tuple<at::Tensor, at::Tensor> sample_cuda(const at::Tensor& logits_in,
                                               const at::Tensor& seeds_in,
                                               const at::Tensor& offset, double temperature,
                                               int64_t top_k, double top_p, double min_p) {
  check_sample(logits_in, seeds_in, offset, temperature, top_k, top_p, min_p);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const cudaStream_t stream = current_stream(logits_in);
  const at::Tensor logits = dense_rows(logits_in);
  const at::Tensor seeds = seeds_in.contiguous();
  const int64_t rows = logits.size(0);
  at::Tensor ids = at::empty({rows}, logits.options().dtype(at::kLong));
  at::Tensor logprobs = at::empty({rows}, logits.options().dtype(at::kFloat));
  auto raise_offset_error = [&] {
    TORCH_CHECK_VALUE(false, "offset must be >= 0, got ", offset.item<int64_t>());
  };
  if (rows == 0) {  // no kernel runs: an empty batch still fails like a full one
    if (synchronizing_checks(stream) && offset.item<int64_t>() < 0) raise_offset_error();
    return {ids, logprobs};
  }
  const Status status = Status::make(logits, stream);
  const latro::SampleArgs args =
      sample_args(logits, seeds, offset, temperature, top_k, top_p, min_p, ids, logprobs);
  // Plain sampling of few rows splits each over several blocks, with a workspace for their
  // partials.
  latro::cuda::SamplePlan plan;
  call_cuda([&] { plan = latro::cuda::plan_sample(args, multiprocessors(logits)); });
  const at::Tensor workspace =
      plan_workspace(plan.workspace_bytes, logits.options().dtype(at::kByte));
  call_cuda([&] {
    latro::cuda::sample(args, plan, workspace_ptr(workspace), stream, status.ptr());
  });
  const StatusRecord record = status.read();
  if (record.kind == StatusKind::NegativeOffset) raise_offset_error();
  TORCH_CHECK_VALUE(record.kind != StatusKind::RowHasNaN, "logits row ", record.row,
                    " contains NaN");
  TORCH_CHECK_VALUE(record.kind != StatusKind::RowHasNoFinite, "logits row ", record.row,
                    " has no finite value");
  TORCH_CHECK_VALUE(record.kind != StatusKind::RowHasPosInf, "logits row ", record.row,
                    " contains +inf (after dividing by the temperature)");
  call_cuda([&] { latro::cuda::throw_on_status(record); });
  return {ids, logprobs};
}

// ------------------------------------------------------------------ stop detection
StopTable stop_table(const at::Tensor& tokens, const at::Tensor& stop_tokens,
                     const at::Tensor& stop_offsets, int64_t start) {
  check_stop_table(tokens, stop_tokens, stop_offsets, start);
  return StopTable{tokens.contiguous(), stop_tokens.contiguous(), stop_offsets.contiguous()};
}

// The CPU's own check of the table on a host copy of its offsets (it does not read the tokens,
// left on the device), so a bad table gets the CPU's message. The kernels check the offsets
// themselves; this runs on their error path, and where no kernel runs.
void check_stop_table_on_host(const StopTable& table) {
  const at::Tensor offsets = table.stop_offsets.cpu();
  latro::StopSequences host = table.view();
  host.offsets = offsets.data_ptr<int64_t>();
  call_core([&] { latro::check_stop_sequences(host); });
}

[[noreturn]] void raise_stop_table_error(const StopTable& table) {
  check_stop_table_on_host(table);
  TORCH_CHECK_VALUE(false, "stop_sequences offsets are invalid");
}

// An empty batch runs no kernel to check the table: it is checked on the host then (when
// checks are on), so an empty batch fails like a full one.
void check_stop_table_of_empty_batch(const StopTable& table, int64_t rows, cudaStream_t stream) {
  if (rows == 0 && synchronizing_checks(stream)) check_stop_table_on_host(table);
}

at::Tensor stop_positions_cuda(const at::Tensor& tokens, const at::Tensor& stop_tokens,
                               const at::Tensor& stop_offsets, int64_t start) {
  const StopTable table = stop_table(tokens, stop_tokens, stop_offsets, start);
  const c10::cuda::CUDAGuard guard(tokens.device());
  const cudaStream_t stream = current_stream(tokens);
  const int64_t rows = tokens.size(0), len = tokens.size(1);
  at::Tensor out = at::empty({rows}, tokens.options());
  check_stop_table_of_empty_batch(table, rows, stream);
  if (rows == 0) return out;
  const Status status = Status::make(tokens, stream);
  call_cuda([&] {
    latro::cuda::stop_positions(table.tokens.data_ptr<int64_t>(), rows, len, len, table.view(),
                                start, out.data_ptr<int64_t>(), stream, status.ptr());
  });
  const StatusRecord record = status.read();
  if (record.kind == StatusKind::BadStopTable) raise_stop_table_error(table);
  call_cuda([&] { latro::cuda::throw_on_status(record); });
  return out;
}

at::Tensor stop_positions_step_cuda(const at::Tensor& tokens, const at::Tensor& stop_tokens,
                                    const at::Tensor& stop_offsets, const at::Tensor& step,
                                    const at::Tensor& positions_in, int64_t start) {
  const StopTable table = stop_table(tokens, stop_tokens, stop_offsets, start);
  check_stop_step(tokens, step, positions_in);
  const c10::cuda::CUDAGuard guard(tokens.device());
  const cudaStream_t stream = current_stream(tokens);
  const int64_t rows = tokens.size(0), len = tokens.size(1);
  const at::Tensor positions = positions_in.contiguous();
  at::Tensor out = at::empty({rows}, tokens.options());
  auto raise_step_error = [&] {
    TORCH_CHECK_VALUE(false, "step must be in [0, ", len, "), got ", step.item<int64_t>());
  };
  check_stop_table_of_empty_batch(table, rows, stream);
  if (rows == 0) {  // no kernel runs: an empty batch still fails like a full one
    if (synchronizing_checks(stream)) {
      const int64_t value = step.item<int64_t>();
      if (value < 0 || value >= len) raise_step_error();
    }
    return out;
  }
  const Status status = Status::make(tokens, stream);
  call_cuda([&] {
    latro::cuda::stop_positions_step(table.tokens.data_ptr<int64_t>(), rows, len, len,
                                     table.view(), step.data_ptr<int64_t>(),
                                     start, positions.data_ptr<int64_t>(),
                                     out.data_ptr<int64_t>(), stream, status.ptr());
  });
  const StatusRecord record = status.read();
  if (record.kind == StatusKind::BadStopTable) raise_stop_table_error(table);
  if (record.kind == StatusKind::StepOutOfRange) raise_step_error();
  if (record.kind == StatusKind::PositionOutOfRange) {
    TORCH_CHECK_VALUE(false, "positions[", record.row, "] = ",
                      positions[record.row].item<int64_t>(), " is outside [0, ", len, "]");
  }
  call_cuda([&] { latro::cuda::throw_on_status(record); });
  return out;
}

// ------------------------------------------------------------------ decode attention
at::Tensor decode_attention_cuda(const at::Tensor& query, at::Tensor& cache_k, at::Tensor& cache_v,
                                 const std::optional<at::Tensor>& new_k,
                                 const std::optional<at::Tensor>& new_v,
                                 const std::optional<at::Tensor>& slot_mask,
                                 const std::optional<at::Tensor>& rotary_cos,
                                 const std::optional<at::Tensor>& rotary_sin,
                                 const at::Tensor& length, double scale) {
  const DecodeAttentionTensors t = prepare_decode_attention(
      query, cache_k, cache_v, new_k, new_v, slot_mask, rotary_cos, rotary_sin, length, scale);
  const c10::cuda::CUDAGuard guard(query.device());
  const cudaStream_t stream = current_stream(query);
  const int64_t slots = cache_k.size(2);
  auto raise_length_error = [&] {
    TORCH_CHECK_VALUE(false, "length must be in [1, slots = ", slots, "], got ",
                      length.item<int64_t>());
  };
  if (query.size(0) == 0) {  // no kernel runs: an empty batch still fails like a full one
    if (synchronizing_checks(stream)) {
      const int64_t value = length.item<int64_t>();
      if (value < 1 || value > slots) raise_length_error();
    }
    return t.out;
  }
  const Status status = Status::make(query, stream);
  const latro::DecodeAttentionArgs args = decode_attention_args(
      t.query, cache_k, cache_v, t.new_k, t.new_v, t.slot_mask, t.rotary_cos, t.rotary_sin,
      t.rotary_dtype, length, scale, t.out);
  latro::cuda::DecodeAttentionPlan plan;
  call_cuda([&] { plan = latro::cuda::plan_decode_attention(args, multiprocessors(query)); });
  const at::Tensor workspace =
      plan_workspace(plan.workspace_floats, query.options().dtype(at::kFloat));
  call_cuda([&] {
    latro::cuda::decode_attention(args, plan, static_cast<float*>(workspace_ptr(workspace)),
                                  stream, status.ptr());
  });
  const StatusRecord record = status.read();
  if (record.kind == StatusKind::LengthOutOfRange) raise_length_error();
  call_cuda([&] { latro::cuda::throw_on_status(record); });
  return t.out;
}

// ------------------------------------------------------------------ RMSNorm
std::tuple<at::Tensor, at::Tensor> rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                 const std::optional<at::Tensor>& residual,
                                                 double eps) {
  const RmsNormTensors t = prepare_rms_norm(x, weight, residual, eps);
  const c10::cuda::CUDAGuard guard(x.device());
  const latro::RmsNormArgs args = rms_norm_args(t.x, t.residual, t.weight, eps, t.out, t.sum);
  call_cuda([&] { latro::cuda::rms_norm(args, current_stream(x)); });
  return {t.out, t.sum};
}

// ------------------------------------------------------------------ silu_mul
at::Tensor silu_mul_cuda(const at::Tensor& gate_in, const at::Tensor& up_in) {
  check_silu_mul(gate_in, up_in);
  const c10::cuda::CUDAGuard guard(gate_in.device());
  const at::Tensor gate = gate_in.contiguous(), up = up_in.contiguous();
  at::Tensor out = at::empty(gate.sizes(), gate.options());
  call_cuda([&] { latro::cuda::silu_mul(silu_mul_args(gate, up, out), current_stream(gate)); });
  return out;
}

// ------------------------------------------------------------------ rewards and advantages
at::Tensor rloo_advantages_cuda(const at::Tensor& rewards_in, int64_t k) {
  check_rloo(rewards_in, k);
  const c10::cuda::CUDAGuard guard(rewards_in.device());
  const at::Tensor rewards = rewards_in.contiguous();
  at::Tensor out = at::empty_like(rewards);
  call_cuda([&] {
    latro::cuda::rloo_advantages(rewards.data_ptr<float>(), rewards.size(0) / k, k,
                                 out.data_ptr<float>(), current_stream(rewards));
  });
  return out;
}

at::Tensor latro_rewards_cuda(const at::Tensor& answer_logp, const at::Tensor& rationale_logp,
                              const at::Tensor& ref_rationale_logp, const at::Tensor& finished,
                              double kl_coef, double nonstop_penalty,
                              c10::string_view penalty_mode_view) {
  const std::string penalty_mode(penalty_mode_view);
  check_latro_rewards(answer_logp, rationale_logp, ref_rationale_logp, finished, kl_coef,
                      nonstop_penalty, penalty_mode);
  const c10::cuda::CUDAGuard guard(answer_logp.device());
  const at::Tensor a = answer_logp.contiguous(), r = rationale_logp.contiguous(),
                   ref = ref_rationale_logp.contiguous(), f = finished.contiguous();
  at::Tensor out = at::empty_like(a);
  call_cuda([&] {
    latro::cuda::latro_rewards(a.data_ptr<float>(), r.data_ptr<float>(), ref.data_ptr<float>(),
                               f.data_ptr<bool>(), a.size(0), static_cast<float>(kl_coef),
                               static_cast<float>(nonstop_penalty),
                               parse_penalty_mode(penalty_mode), out.data_ptr<float>(),
                               current_stream(a));
  });
  return out;
}

}  // namespace
}  // namespace latro_torch

TORCH_LIBRARY_IMPL(latro_engine, CUDA, m) {
  m.impl("token_logprobs", &latro_torch::token_logprobs_cuda);
  m.impl("token_logprobs_backward", &latro_torch::token_logprobs_backward_cuda);
  m.impl("token_logprobs_backward_", &latro_torch::token_logprobs_backward_inplace_cuda);
  m.impl("sample", &latro_torch::sample_cuda);
  m.impl("stop_positions", &latro_torch::stop_positions_cuda);
  m.impl("stop_positions_step", &latro_torch::stop_positions_step_cuda);
  m.impl("decode_attention", &latro_torch::decode_attention_cuda);
  m.impl("rms_norm", &latro_torch::rms_norm_cuda);
  m.impl("silu_mul", &latro_torch::silu_mul_cuda);
  m.impl("rloo_advantages", &latro_torch::rloo_advantages_cuda);
  m.impl("latro_rewards", &latro_torch::latro_rewards_cuda);
}

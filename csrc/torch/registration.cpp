// The latro_engine op library: schemas, validation shared by every backend, the chunked
// LM-head scorer (device-agnostic: matmuls through ATen, the row kernels through the
// dispatcher) and the Python module that carries the non-tensor helpers.
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/extension.h>

#include <cmath>
#include <limits>

#include "latro/latro.h"
#include "ops.h"

namespace latro_torch {

// ------------------------------------------------------------------ validation
void check_token_logprobs(const at::Tensor& logits, const at::Tensor& targets) {
  core_dtype(logits, "logits");
  check_dtype(targets, at::kLong, "targets");
  check_same_device(targets, logits, "targets", "logits");
  TORCH_CHECK_VALUE(logits.dim() >= 1, "logits must have at least 1 dimension (the vocabulary)");
  TORCH_CHECK_VALUE(logits.size(-1) > 0, "logits has an empty vocabulary dimension");
  TORCH_CHECK_VALUE(targets.sizes() == logits.sizes().slice(0, logits.dim() - 1),
                    "targets must have shape logits.shape[:-1] = ",
                    logits.sizes().slice(0, logits.dim() - 1), ", got ", targets.sizes());
}

void check_token_logprobs_backward(const at::Tensor& grad, const at::Tensor& logits,
                                   const at::Tensor& targets, const at::Tensor& lse) {
  check_token_logprobs(logits, targets);
  check_dtype(lse, at::kFloat, "lse");
  TORCH_CHECK_VALUE(lse.sizes() == targets.sizes(), "lse must have the shape of targets ",
                    targets.sizes(), ", got ", lse.sizes());
  TORCH_CHECK_VALUE(grad.sizes() == targets.sizes(),
                    "grad_logprobs must have the shape of targets ", targets.sizes(), ", got ",
                    grad.sizes());
  check_same_device(grad, logits, "grad_logprobs", "logits");
  check_same_device(lse, logits, "lse", "logits");
}

void check_sample(const at::Tensor& logits, const at::Tensor& seeds, const at::Tensor& offset,
                  double temperature, int64_t top_k, double top_p, double min_p) {
  core_dtype(logits, "logits");
  check_dim(logits, 2, "logits");
  TORCH_CHECK_VALUE(logits.size(1) > 0, "logits has an empty vocabulary dimension");
  check_dtype(seeds, at::kLong, "seed");
  check_dtype(offset, at::kLong, "offset");
  check_same_device(seeds, logits, "seed", "logits");
  check_same_device(offset, logits, "offset", "logits");
  TORCH_CHECK_VALUE(seeds.dim() == 0 || (seeds.dim() == 1 && seeds.size(0) == logits.size(0)),
                    "seed must be an int, a 0-d tensor or a tensor of shape [B] = [",
                    logits.size(0), "], got shape ", seeds.sizes());
  TORCH_CHECK_VALUE(offset.dim() == 0, "offset must be an int or a 0-d tensor, got shape ",
                    offset.sizes());
  call_core([&] {
    latro::check_sampling_options(static_cast<float>(temperature), top_k,
                                  static_cast<float>(top_p), static_cast<float>(min_p));
  });
}

void check_stop_table(const at::Tensor& tokens, const at::Tensor& stop_tokens,
                      const at::Tensor& stop_offsets, int64_t start) {
  check_dtype(tokens, at::kLong, "tokens");
  check_dim(tokens, 2, "tokens");
  check_dtype(stop_tokens, at::kLong, "stop_sequences");
  check_dtype(stop_offsets, at::kLong, "stop_sequences offsets");
  check_dim(stop_tokens, 1, "stop_sequences tokens");
  check_dim(stop_offsets, 1, "stop_sequences offsets");
  check_same_device(stop_tokens, tokens, "stop_sequences", "tokens");
  check_same_device(stop_offsets, tokens, "stop_sequences offsets", "tokens");
  TORCH_CHECK_VALUE(stop_offsets.size(0) >= 1, "stop_sequences offsets must hold count + 1 values");
  TORCH_CHECK_VALUE(start >= 0 && start <= tokens.size(1), "start must be in [0, ",
                    tokens.size(1), "], got ", start);
}

void check_stop_step(const at::Tensor& tokens, const at::Tensor& step,
                     const at::Tensor& positions) {
  check_dtype(step, at::kLong, "step");
  check_same_device(step, tokens, "step", "tokens");
  TORCH_CHECK_VALUE(step.dim() == 0, "step must be an int or a 0-d tensor, got shape ",
                    step.sizes());
  check_dtype(positions, at::kLong, "positions");
  check_same_device(positions, tokens, "positions", "tokens");
  TORCH_CHECK_VALUE(positions.dim() == 1 && positions.size(0) == tokens.size(0),
                    "positions must have shape [B] = [", tokens.size(0), "], got ",
                    positions.sizes());
}

void check_decode_attention(const at::Tensor& query, const at::Tensor& cache_k,
                            const at::Tensor& cache_v, const std::optional<at::Tensor>& new_k,
                            const std::optional<at::Tensor>& new_v,
                            const std::optional<at::Tensor>& slot_mask,
                            const std::optional<at::Tensor>& rotary_cos,
                            const std::optional<at::Tensor>& rotary_sin, const at::Tensor& length,
                            double scale) {
  core_dtype(query, "query");
  check_dim(query, 3, "query");
  check_dim(cache_k, 4, "cache_k");
  check_dim(cache_v, 4, "cache_v");
  check_like(cache_k, query, "cache_k", "query");
  check_like(cache_v, query, "cache_v", "query");
  const int64_t rows = query.size(0), heads = query.size(1), head_dim = query.size(2);
  TORCH_CHECK_VALUE(cache_k.size(0) == rows && cache_k.size(3) == head_dim,
                    "cache_k must have shape [rows, kv_heads, slots, head_dim] with rows = ",
                    rows, " and head_dim = ", head_dim, " as query, got shape ", cache_k.sizes());
  TORCH_CHECK_VALUE(cache_v.sizes() == cache_k.sizes(), "cache_v must have the shape of cache_k ",
                    cache_k.sizes(), ", got ", cache_v.sizes());
  const int64_t kv_heads = cache_k.size(1), slots = cache_k.size(2);
  TORCH_CHECK_VALUE(kv_heads > 0 && heads % kv_heads == 0, "query's ", heads,
                    " heads must be a multiple of cache_k's ", kv_heads, " KV heads");
  TORCH_CHECK_VALUE(head_dim >= 1 && head_dim <= latro::kMaxDecodeHeadDim,
                    "head_dim must be in [1, ", latro::kMaxDecodeHeadDim, "], got ", head_dim);
  TORCH_CHECK_VALUE(slots > 0, "cache_k has no slots");
  // The caches are written in place, so they are never copied into another layout: both must
  // be dense within each row (the kernels address them so), with one stride between rows.
  // A dimension of size 1 is never stepped along, so its stride does not matter.
  for (const auto& [t, name] : {std::pair{&cache_k, "cache_k"}, std::pair{&cache_v, "cache_v"}}) {
    auto stride_is = [&](int dim, int64_t want) { return t->size(dim) <= 1 || t->stride(dim) == want; };
    const bool dense = stride_is(3, 1) && stride_is(2, head_dim) &&
                       stride_is(1, slots * head_dim) &&
                       (rows <= 1 || t->stride(0) >= kv_heads * slots * head_dim);
    TORCH_CHECK_VALUE(dense, name, " must be dense within each row (rows of a contiguous [rows, "
                      "kv_heads, slots, head_dim] cache), got strides ", t->strides());
  }
  TORCH_CHECK_VALUE(rows <= 1 || cache_v.stride(0) == cache_k.stride(0),
                    "cache_v must have the row stride of cache_k (", cache_k.stride(0), "), got ",
                    cache_v.stride(0));
  TORCH_CHECK_VALUE(new_k.has_value() == new_v.has_value(),
                    "new_k and new_v must be given together");
  if (new_k.has_value()) {
    for (const auto& [t, name] : {std::pair{&*new_k, "new_k"}, std::pair{&*new_v, "new_v"}}) {
      check_like(*t, query, name, "query");
      TORCH_CHECK_VALUE(t->dim() == 3 && t->size(0) == rows && t->size(1) == kv_heads &&
                            t->size(2) == head_dim,
                        name, " must have shape [rows, kv_heads, head_dim] = [", rows, ", ",
                        kv_heads, ", ", head_dim, "], got ", t->sizes());
    }
  }
  if (slot_mask.has_value()) {
    check_dtype(*slot_mask, at::kBool, "slot_mask");
    check_same_device(*slot_mask, query, "slot_mask", "query");
    TORCH_CHECK_VALUE(slot_mask->dim() == 2 && slot_mask->size(0) == rows &&
                          slot_mask->size(1) == slots,
                      "slot_mask must have shape [rows, slots] = [", rows, ", ", slots,
                      "], got ", slot_mask->sizes());
  }
  TORCH_CHECK_VALUE(rotary_cos.has_value() == rotary_sin.has_value(),
                    "rotary_cos and rotary_sin must be given together");
  if (rotary_cos.has_value()) {
    TORCH_CHECK_VALUE(head_dim % 2 == 0, "head_dim must be even for a rotary embedding, got ",
                      head_dim);
    for (const auto& [t, name] :
         {std::pair{&*rotary_cos, "rotary_cos"}, std::pair{&*rotary_sin, "rotary_sin"}}) {
      TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat || t->scalar_type() == query.scalar_type(),
                       name, " must be float32 or the query's dtype ", query.scalar_type(),
                       ", got ", t->scalar_type());
      check_same_device(*t, query, name, "query");
      TORCH_CHECK_VALUE(t->dim() == 2 && t->size(0) == rows && t->size(1) == head_dim, name,
                        " must have shape [rows, head_dim] = [", rows, ", ", head_dim, "], got ",
                        t->sizes());
    }
    TORCH_CHECK_TYPE(rotary_cos->scalar_type() == rotary_sin->scalar_type(),
                     "rotary_cos and rotary_sin must have the same dtype, got ",
                     rotary_cos->scalar_type(), " and ", rotary_sin->scalar_type());
  }
  check_dtype(length, at::kLong, "length");
  check_same_device(length, query, "length", "query");
  TORCH_CHECK_VALUE(length.dim() == 0, "length must be an int or a 0-d tensor, got shape ",
                    length.sizes());
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale must be finite, got ", scale);
}

DecodeAttentionTensors prepare_decode_attention(
    const at::Tensor& query, const at::Tensor& cache_k, const at::Tensor& cache_v,
    const std::optional<at::Tensor>& new_k, const std::optional<at::Tensor>& new_v,
    const std::optional<at::Tensor>& slot_mask, const std::optional<at::Tensor>& rotary_cos,
    const std::optional<at::Tensor>& rotary_sin, const at::Tensor& length, double scale) {
  check_decode_attention(query, cache_k, cache_v, new_k, new_v, slot_mask, rotary_cos, rotary_sin,
                         length, scale);
  DecodeAttentionTensors t;
  t.query = query.contiguous();
  if (new_k.has_value()) {
    t.new_k = new_k->contiguous();
    t.new_v = new_v->contiguous();
  }
  if (slot_mask.has_value()) t.slot_mask = dense_rows(*slot_mask);
  if (rotary_cos.has_value()) {  // read in their own dtype: no conversion per call (per layer)
    t.rotary_dtype = core_dtype(*rotary_cos, "rotary_cos");
    t.rotary_cos = rotary_cos->contiguous();
    t.rotary_sin = rotary_sin->contiguous();
  }
  t.out = at::empty(query.sizes(), query.options());
  return t;
}

void check_rms_norm(const at::Tensor& x, const at::Tensor& weight,
                    const std::optional<at::Tensor>& residual, double eps) {
  core_dtype(x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) > 0,
                    "x must have a non-empty last dimension, got shape ", x.sizes());
  check_like(weight, x, "weight", "x");
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) == x.size(-1),
                    "weight must have shape [D] = [", x.size(-1), "], got ", weight.sizes());
  if (residual.has_value()) {
    check_like(*residual, x, "residual", "x");
    TORCH_CHECK_VALUE(residual->sizes() == x.sizes(), "residual must have the shape of x ",
                      x.sizes(), ", got ", residual->sizes());
  }
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0.0, "eps must be finite and >= 0, got ", eps);
}

void check_silu_mul(const at::Tensor& gate, const at::Tensor& up) {
  core_dtype(gate, "gate");
  check_like(up, gate, "up", "gate");
  TORCH_CHECK_VALUE(up.sizes() == gate.sizes(), "up must have the shape of gate ", gate.sizes(),
                    ", got ", up.sizes());
}

RmsNormTensors prepare_rms_norm(const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& residual, double eps) {
  check_rms_norm(x, weight, residual, eps);
  RmsNormTensors t;
  t.x = x.contiguous();
  t.weight = weight.contiguous();
  t.out = at::empty(x.sizes(), x.options());
  if (residual.has_value()) {
    t.residual = residual->contiguous();
    t.sum = at::empty(x.sizes(), x.options());
  } else {
    t.sum = at::empty({0}, x.options());
  }
  return t;
}

void check_rloo(const at::Tensor& rewards, int64_t k) {
  check_dtype(rewards, at::kFloat, "rewards");
  check_dim(rewards, 1, "rewards");
  TORCH_CHECK_VALUE(k >= 2, "k must be >= 2 for a leave-one-out baseline, got ", k);
  TORCH_CHECK_VALUE(rewards.size(0) > 0, "rewards is empty");
  TORCH_CHECK_VALUE(rewards.size(0) % k == 0, "k = ", k, " does not divide the ",
                    rewards.size(0), " rewards (they must be grouped by prompt, k per group)");
}

latro::PenaltyMode parse_penalty_mode(const std::string& penalty_mode) {
  if (penalty_mode == "constant") return latro::PenaltyMode::Constant;
  if (penalty_mode == "batch_mean") return latro::PenaltyMode::BatchMean;
  TORCH_CHECK_VALUE(false, "penalty_mode must be 'constant' or 'batch_mean', got '",
                    penalty_mode, "'");
}

void check_latro_rewards(const at::Tensor& answer_logp, const at::Tensor& rationale_logp,
                         const at::Tensor& ref_rationale_logp, const at::Tensor& finished,
                         double kl_coef, double nonstop_penalty, const std::string& penalty_mode) {
  check_dtype(answer_logp, at::kFloat, "answer_logp");
  check_dim(answer_logp, 1, "answer_logp");
  TORCH_CHECK_VALUE(answer_logp.size(0) > 0, "answer_logp is empty");
  const std::pair<const at::Tensor*, const char*> others[] = {
      {&rationale_logp, "rationale_logp"}, {&ref_rationale_logp, "ref_rationale_logp"}};
  for (const auto& [t, name] : others) {
    check_dtype(*t, at::kFloat, name);
    check_same_device(*t, answer_logp, name, "answer_logp");
    TORCH_CHECK_VALUE(t->sizes() == answer_logp.sizes(), name, " must have the shape of answer_logp ",
                      answer_logp.sizes(), ", got ", t->sizes());
  }
  check_dtype(finished, at::kBool, "finished");
  check_same_device(finished, answer_logp, "finished", "answer_logp");
  TORCH_CHECK_VALUE(finished.sizes() == answer_logp.sizes(),
                    "finished must have the shape of answer_logp ", answer_logp.sizes(), ", got ",
                    finished.sizes());
  // Named with the caller's value: 1e300 is finite as a double but not as the core's float.
  TORCH_CHECK_VALUE(std::isfinite(static_cast<float>(kl_coef)),
                    "kl_coef must be finite in float32, got ", kl_coef);
  TORCH_CHECK_VALUE(std::isfinite(static_cast<float>(nonstop_penalty)),
                    "nonstop_penalty must be finite in float32, got ", nonstop_penalty);
  parse_penalty_mode(penalty_mode);
}

// ------------------------------------------------------------------ row layout
RowLayout::RowLayout(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.dim() >= 1 && t.stride(-1) == 1, "RowLayout needs a dense last dim");
  vocab = t.size(-1);
  rows = t.numel() / std::max<int64_t>(vocab, 1);
  if (t.dim() == 1) {
    inner_rows_ = 1;
    inner_stride_ = vocab;
    return;
  }
  inner_rows_ = std::max<int64_t>(t.size(-2), 1);
  // A single row per run never steps: any stride >= vocab describes it.
  inner_stride_ = inner_rows_ == 1 ? vocab : t.stride(-2);
  TORCH_INTERNAL_ASSERT(inner_stride_ >= vocab, "RowLayout needs non-overlapping rows");
  for (int64_t d = 0; d + 2 < t.dim(); ++d) {
    outer_sizes_.push_back(t.size(d));
    outer_strides_.push_back(t.stride(d));
  }
}

int64_t RowLayout::outer_offset(int64_t outer) const {
  int64_t offset = 0;
  for (int64_t d = static_cast<int64_t>(outer_sizes_.size()) - 1; d >= 0; --d) {
    offset += (outer % outer_sizes_[d]) * outer_strides_[d];
    outer /= outer_sizes_[d];
  }
  return offset;
}

// ------------------------------------------------------------------ linear_token_logprobs
namespace {

void check_linear(const at::Tensor& hidden, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, const at::Tensor& targets) {
  core_dtype(hidden, "hidden");
  check_dim(hidden, 2, "hidden");
  check_dim(weight, 2, "weight");
  TORCH_CHECK_TYPE(weight.scalar_type() == hidden.scalar_type(), "weight must have the dtype of hidden (",
                   hidden.scalar_type(), "), got ", weight.scalar_type());
  check_same_device(weight, hidden, "weight", "hidden");
  TORCH_CHECK_VALUE(weight.size(1) == hidden.size(1), "weight must have shape [V, D] with D = ",
                    hidden.size(1), " (hidden's last dim), got ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(0) > 0, "weight has an empty vocabulary dimension");
  if (bias) {
    TORCH_CHECK_TYPE(bias->scalar_type() == hidden.scalar_type(), "bias must have the dtype of hidden (",
                     hidden.scalar_type(), "), got ", bias->scalar_type());
    check_same_device(*bias, hidden, "bias", "hidden");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0),
                      "bias must have shape [V] = [", weight.size(0), "], got ", bias->sizes());
  }
  check_dtype(targets, at::kLong, "targets");
  check_same_device(targets, hidden, "targets", "hidden");
  TORCH_CHECK_VALUE(targets.dim() == 1 && targets.size(0) == hidden.size(0),
                    "targets must have shape [N] = [", hidden.size(0), "], got ", targets.sizes());
}

// Rows per chunk unless the caller says: about 512 MiB of logits in their dtype (2^28 bf16
// logits, 2^27 float32), wide enough that the matmuls run at full speed, small next to the
// [N, V] logits. On the H100 run of 2026-11-27 (bf16, N=16,384, V=128,256) the forward took
// 1.21x the bare matmul with 2^27 bf16 logits (16 vocabulary blocks) and 1.13x with 2^28 (8):
// each block costs its log-sum-exp pass and a few small kernels besides its matmul.
constexpr int64_t kDefaultChunkBytes = int64_t{1} << 29;

int64_t resolve_chunk(int64_t chunk_size, int64_t rows, int64_t vocab, int64_t element_size) {
  TORCH_CHECK_VALUE(chunk_size >= 0, "chunk_size must be positive (or None), got ", chunk_size);
  if (chunk_size == 0) {
    chunk_size = std::max<int64_t>(1, kDefaultChunkBytes / (vocab * element_size));
  }
  return std::max<int64_t>(1, std::min(chunk_size, std::max<int64_t>(rows, 1)));
}

at::Tensor chunk_logits(const at::Tensor& h, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias) {
  return bias ? at::addmm(*bias, h, weight.t()) : at::mm(h, weight.t());
}

const c10::TypedOperatorHandle<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&,
                                                                  const at::Tensor&, int64_t)>&
token_logprobs_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("latro_engine::token_logprobs", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&,
                                                                      const at::Tensor&, int64_t)>();
  return op;
}

const c10::TypedOperatorHandle<void(const at::Tensor&, at::Tensor&, const at::Tensor&,
                                    const at::Tensor&, int64_t)>&
token_logprobs_backward_inplace_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("latro_engine::token_logprobs_backward_", "")
          .typed<void(const at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&,
                      int64_t)>();
  return op;
}

// Both kernels below run their matmuls at the dtype they are given. Without this guard an
// enclosing torch.autocast region (the forward's, or the backward's: the autograd engine runs
// it with the caller's autocast state) would recast them one by one: bf16 logits feeding a
// float32 out= buffer. The op's own autocast rule is linear_token_logprobs_autocast.
using NoAutocast = c10::impl::ExcludeDispatchKeyGuard;

// Both passes cut the [N, V] logits into vocabulary blocks: block b holds all N rows and the
// columns [v0, v0 + n) of one matmul, hidden @ weight[v0 : v0 + n]^T. Cutting by rows instead
// would read the whole LM head once per chunk (a 1 GiB weight 60 times over for 16k tokens);
// by columns every pass reads it once. The block lives in a buffer one column wider than the
// block (rounded up to 64 columns: see kBufferColumnMultiple); that extra column
// holds -inf and serves as the target of rows whose target lies in another block, so the
// token_logprobs kernels run on a block unchanged, with the block-local targets below.
//
// Rows whose log-sum-exp is not moderate (|lse| >= kRecomputeLseFrom, or not finite) are
// computed again over their whole rows by the row-chunked code, which is exact there: block
// results combine through lse, whose float32 rounding would cost such rows their precision
// (two tied logits of 3e38 in two blocks would each get probability 1). One host
// synchronization per pass decides it.
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Vocabulary columns per block: the logits the forward holds per chunk (chunk rows x V), over
// all N rows, rounded up to a multiple of 128 columns (or V) so that a large N does not turn the
// backward into many thin matmuls and [N, D] accumulations, and so that every block's matmul
// but the last has an aligned width. On an H100 (2026-11-26) the default chunk gave blocks of
// 8,189 columns and a forward at 6.6x the bare matmul, where blocks of 32,064 columns (a
// multiple of 64) ran at 1.06x: cuBLAS's fast kernels want aligned shapes.
constexpr int64_t kBlockColumnMultiple = 128;

int64_t resolve_block_columns(int64_t chunk_rows, int64_t rows, int64_t vocab) {
  const int64_t columns = ceil_div(chunk_rows * vocab, std::max<int64_t>(rows, 1));
  return std::min(vocab, ceil_div(columns, kBlockColumnMultiple) * kBlockColumnMultiple);
}

// The block buffer's row stride, in elements: the block and its extra column rounded up to 128
// bytes of bf16, so that every row of the matmul's output starts on a 128-byte boundary as in
// the bare matmul's (a stride of 8 elements left the 8,192-column blocks' rows 16 bytes off
// it; without its status reads, a forward still ran 1.25x the bare matmul on the H100 run of
// 2026-11-27; not yet timed with this stride).
constexpr int64_t kBufferColumnMultiple = 64;

struct VocabBlocks {
  int64_t columns;  // per block (the last one may be narrower)
  at::Tensor buffer;  // [N, width]: the block's logits, then -inf

  VocabBlocks(const at::Tensor& hidden, int64_t vocab, int64_t chunk)
      : columns(resolve_block_columns(chunk, hidden.size(0), vocab)),
        buffer(at::empty({hidden.size(0),
                          ceil_div(columns + 1, kBufferColumnMultiple) * kBufferColumnMultiple},
                         hidden.options())) {}

  // Fills the buffer with block [begin, begin + n) of the logits; returns the [N, n] view.
  at::Tensor fill(const at::Tensor& hidden, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, int64_t begin, int64_t n) {
    at::Tensor block = buffer.narrow(1, 0, n);
    const at::Tensor w = weight.narrow(0, begin, n);
    if (bias) {
      at::addmm_out(block, bias->narrow(0, begin, n), hidden, w.t());
    } else {
      at::mm_out(block, hidden, w.t());
    }
    buffer.narrow(1, n, buffer.size(1) - n).fill_(-std::numeric_limits<double>::infinity());
    return block;
  }
};

// Targets for a block: the column within it, the extra column n for targets elsewhere, and -1
// for ignored rows (pass -1 as the kernels' ignore_index: it is never a column, so the caller's
// ignore_index may be any value, even a vocabulary id).
at::Tensor block_targets(const at::Tensor& targets, const at::Tensor& ignored, int64_t begin,
                         int64_t n) {
  const at::Tensor inside = (targets >= begin) & (targets < begin + n);
  return at::where(ignored, at::scalar_tensor(-1, targets.options()),
                   at::where(inside, targets - begin, at::scalar_tensor(n, targets.options())));
}

// Block-local targets never leave the block, so the kernels cannot see a target outside the
// vocabulary: such rows are found among the rows to redo (their target's block is never hit,
// and the caller puts them there) and reported here with their own index, as the kernels would.
void check_targets_in_range(const at::Tensor& targets, const at::Tensor& rows, int64_t vocab,
                            int64_t ignore_index) {
  const at::Tensor t = targets.index_select(0, rows);
  const at::Tensor bad = ((t < 0) | (t >= vocab)) & (t != ignore_index);
  const at::Tensor where = bad.nonzero();
  if (where.numel() == 0) return;
  const int64_t first = where[0][0].item<int64_t>();
  TORCH_CHECK_VALUE(false, "targets[", rows[first].item<int64_t>(), "] = ", t[first].item<int64_t>(),
                    " is out of range for vocab size ", vocab, " (ignore_index is ", ignore_index,
                    ")");
}

std::tuple<at::Tensor, at::Tensor> row_chunked_forward(const at::Tensor& hidden,
                                                       const at::Tensor& weight,
                                                       const std::optional<at::Tensor>& bias,
                                                       const at::Tensor& targets, int64_t chunk,
                                                       int64_t ignore_index) {
  const int64_t rows = hidden.size(0);
  auto opts = hidden.options().dtype(at::kFloat);
  at::Tensor logprobs = at::empty({rows}, opts);
  at::Tensor lse = at::empty({rows}, opts);
  for (int64_t begin = 0; begin < rows; begin += chunk) {
    const int64_t n = std::min(chunk, rows - begin);
    const at::Tensor logits = chunk_logits(hidden.narrow(0, begin, n), weight, bias);
    auto [lp, l] = token_logprobs_op().call(logits, targets.narrow(0, begin, n), ignore_index);
    logprobs.narrow(0, begin, n).copy_(lp);
    lse.narrow(0, begin, n).copy_(l);
  }
  return {logprobs, lse};
}

// Per block the kernel gives each row the block's log-sum-exp lse_b and, for rows whose target
// is in the block, log p_b = logit - lse_b. Then lse = logaddexp over blocks (in float64) and
// log p = log p_b + (lse_b - lse) for the target's block.
std::tuple<at::Tensor, at::Tensor> vocab_blocked_forward(const at::Tensor& hidden,
                                                         const at::Tensor& weight,
                                                         const std::optional<at::Tensor>& bias,
                                                         const at::Tensor& targets, int64_t chunk,
                                                         int64_t ignore_index) {
  const int64_t rows = hidden.size(0), vocab = weight.size(0);
  VocabBlocks blocks(hidden, vocab, chunk);
  const at::Tensor ignored = targets == ignore_index;
  auto f64 = hidden.options().dtype(at::kDouble);
  at::Tensor lse = at::full({rows}, -std::numeric_limits<double>::infinity(), f64);
  at::Tensor target_logp = at::zeros({rows}, f64);
  at::Tensor target_lse = at::full({rows}, -std::numeric_limits<double>::infinity(), f64);
  for (int64_t begin = 0; begin < vocab; begin += blocks.columns) {
    const int64_t n = std::min(blocks.columns, vocab - begin);
    blocks.fill(hidden, weight, bias, begin, n);
    const at::Tensor local = block_targets(targets, ignored, begin, n);
    auto [lp, l] = token_logprobs_op().call(blocks.buffer, local, -1);
    const at::Tensor hit = (local >= 0) & (local < n);
    const at::Tensor l64 = l.to(at::kDouble);
    target_logp = at::where(hit, lp.to(at::kDouble), target_logp);
    target_lse = at::where(hit, l64, target_lse);
    lse = at::logaddexp(lse, l64);  // ignored rows add 0s; their lse is reported as 0 below
  }
  at::Tensor logprobs = (target_logp + (target_lse - lse)).to(at::kFloat).masked_fill_(ignored, 0);
  at::Tensor lse32 = lse.to(at::kFloat).masked_fill_(ignored, 0);
  // A target whose whole block is -inf while the row is not: lse_b = -inf, so redo it too (as
  // every row whose target is outside the vocabulary: its block was never hit).
  at::Tensor redo = (~ignored & ~((lse.abs() < latro::kRecomputeLseFrom) & target_lse.isfinite()))
                        .nonzero()
                        .squeeze(1);
  if (redo.numel() > 0) {
    check_targets_in_range(targets, redo, vocab, ignore_index);
    auto [lp, l] = row_chunked_forward(hidden.index_select(0, redo), weight, bias,
                                       targets.index_select(0, redo), chunk, ignore_index);
    logprobs.index_copy_(0, redo, lp);
    lse32.index_copy_(0, redo, l);
  }
  return {logprobs, lse32};
}

std::tuple<at::Tensor, at::Tensor> linear_token_logprobs(const at::Tensor& hidden,
                                                         const at::Tensor& weight,
                                                         const std::optional<at::Tensor>& bias,
                                                         const at::Tensor& targets,
                                                         int64_t chunk_size, int64_t ignore_index) {
  at::NoGradGuard no_grad;  // the Python autograd registration owns the gradient
  NoAutocast no_autocast(c10::autocast_dispatch_keyset);
  check_linear(hidden, weight, bias, targets);
  const ComposedCalls composed;  // targets outside the vocabulary: check_targets_in_range
  const int64_t chunk =
      resolve_chunk(chunk_size, hidden.size(0), weight.size(0), hidden.element_size());
  return vocab_blocked_forward(hidden, weight, bias, targets, chunk, ignore_index);
}

// The backward recomputes the logits in the same vocabulary blocks, turns each block into its
// gradient in place (the token_logprobs_backward_ kernel, with the forward's lse) and feeds two
// matmuls: grad_weight[v0 : v0 + n] = G_b^T hidden, a single matmul over all rows, accumulated in
// float32 inside the GEMM, rounded once and written straight into the gradient; and
// grad_hidden = sum_b G_b W_b, the one sum over blocks, kept in a float32 [N, D] accumulator (N D
// is small next to V D). The extra column's gradient is dropped. Cost: the three matmuls of the
// floor, one kernel pass over the logits, one [N, D] accumulation per block.
//
// Rows with |lse| >= kRecomputeLseFrom (the kernel then recomputes the row's log-sum-exp, so it
// needs whole rows) are left out of the blocks and done by the row-chunked code, which sums
// their weight gradient over chunks in float32 and adds it at the end.
using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// Which gradients a backward computes (the inputs that need one): a frozen LM head (LoRA) costs
// neither the [V, D] weight gradient nor its matmul.
struct Wanted {
  bool hidden, weight, bias;
};

// A gradient not asked for: a distinct empty tensor (outputs of an op may not alias).
at::Tensor no_grad_of(const at::Tensor& like) { return at::empty({0}, like.options()); }

Grads vocab_blocked_backward(const at::Tensor& grad, const at::Tensor& hidden,
                             const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const at::Tensor& targets, const at::Tensor& skipped,
                             const at::Tensor& lse, int64_t chunk, Wanted wanted) {
  const int64_t vocab = weight.size(0);
  const bool low_precision =
      weight.scalar_type() == at::kBFloat16 || weight.scalar_type() == at::kHalf;
  VocabBlocks blocks(hidden, vocab, chunk);
  at::Tensor grad_weight =
      wanted.weight ? at::empty(weight.sizes(), weight.options()) : no_grad_of(weight);
  at::Tensor grad_bias = wanted.bias ? at::zeros({vocab}, hidden.options().dtype(at::kFloat))
                                     : no_grad_of(hidden);
  at::Tensor grad_hidden = wanted.hidden
                               ? at::zeros(hidden.sizes(), hidden.options().dtype(at::kFloat))
                               : no_grad_of(hidden);
  at::Tensor partial = low_precision && wanted.hidden
                           ? at::empty_like(hidden, at::MemoryFormat::Contiguous)
                           : at::Tensor();
  for (int64_t begin = 0; begin < vocab; begin += blocks.columns) {
    const int64_t n = std::min(blocks.columns, vocab - begin);
    const at::Tensor w = weight.narrow(0, begin, n);
    const at::Tensor block = blocks.fill(hidden, weight, bias, begin, n);
    token_logprobs_backward_inplace_op().call(grad, blocks.buffer,
                                              block_targets(targets, skipped, begin, n), lse, -1);
    if (wanted.weight) {
      at::Tensor grad_weight_rows = grad_weight.narrow(0, begin, n);
      at::mm_out(grad_weight_rows, block.t(), hidden);
    }
    if (wanted.bias) {
      grad_bias.narrow(0, begin, n).copy_(block.sum(0, /*keepdim=*/false, at::kFloat));
    }
    if (!wanted.hidden) continue;
    if (low_precision) {
      at::mm_out(partial, block, w);
      grad_hidden.add_(partial);
    } else {
      grad_hidden.addmm_(block, w);
    }
  }
  if (wanted.hidden) grad_hidden = grad_hidden.to(hidden.scalar_type());
  return {grad_hidden, grad_weight, grad_bias};
}

// grad_weight and grad_bias come back in float32 (summed over chunks, for the caller to round).
Grads row_chunked_backward(const at::Tensor& grad, const at::Tensor& hidden,
                           const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const at::Tensor& targets, const at::Tensor& lse, int64_t chunk,
                           int64_t ignore_index, Wanted wanted) {
  const int64_t rows = hidden.size(0);
  at::Tensor grad_hidden = wanted.hidden ? at::empty_like(hidden, at::MemoryFormat::Contiguous)
                                         : no_grad_of(hidden);
  at::Tensor grad_weight = wanted.weight
                               ? at::zeros(weight.sizes(), weight.options().dtype(at::kFloat))
                               : no_grad_of(weight);
  at::Tensor grad_bias = wanted.bias
                             ? at::zeros({weight.size(0)}, hidden.options().dtype(at::kFloat))
                             : no_grad_of(hidden);
  for (int64_t begin = 0; begin < rows; begin += chunk) {
    const int64_t n = std::min(chunk, rows - begin);
    const at::Tensor h = hidden.narrow(0, begin, n);
    at::Tensor logits = chunk_logits(h, weight, bias);
    token_logprobs_backward_inplace_op().call(grad.narrow(0, begin, n), logits,
                                              targets.narrow(0, begin, n),
                                              lse.narrow(0, begin, n), ignore_index);
    if (wanted.hidden) {
      at::Tensor grad_hidden_rows = grad_hidden.narrow(0, begin, n);
      at::mm_out(grad_hidden_rows, logits, weight);
    }
    // ATen has no portable low-precision GEMM into a float32 output: float32 copies.
    if (wanted.weight) grad_weight.addmm_(logits.to(at::kFloat).t(), h.to(at::kFloat));
    if (wanted.bias) grad_bias.add_(logits.sum(0, /*keepdim=*/false, at::kFloat));
  }
  return {grad_hidden, grad_weight, grad_bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_backward(
    const at::Tensor& grad_logprobs, const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& targets, const at::Tensor& lse,
    int64_t chunk_size, int64_t ignore_index, bool hidden_grad, bool weight_grad,
    bool bias_grad) {
  at::NoGradGuard no_grad;  // a backward is not differentiated again
  NoAutocast no_autocast(c10::autocast_dispatch_keyset);
  check_linear(hidden, weight, bias, targets);
  TORCH_CHECK_VALUE(!bias_grad || bias, "bias_grad needs a bias");
  const Wanted wanted{hidden_grad, weight_grad, bias_grad};
  const ComposedCalls composed;  // targets outside the vocabulary: check_targets_in_range
  const int64_t chunk =
      resolve_chunk(chunk_size, hidden.size(0), weight.size(0), hidden.element_size());
  const at::Tensor grad = grad_logprobs.to(at::kFloat).contiguous();
  const at::Tensor ignored = targets == ignore_index;
  // One host synchronization: which rows need whole rows (see above), or have a target outside
  // the vocabulary (an error)?
  const int64_t vocab = weight.size(0);
  const at::Tensor outside = (targets < 0) | (targets >= vocab);
  const at::Tensor redo =
      (~ignored & (outside | ~(lse.abs() < latro::kRecomputeLseFrom))).nonzero().squeeze(1);
  at::Tensor skipped = ignored;
  if (redo.numel() > 0) {
    check_targets_in_range(targets, redo, vocab, ignore_index);
    skipped = ignored.index_fill(0, redo, true);
  }
  auto [grad_hidden, grad_weight, grad_bias] =
      vocab_blocked_backward(grad, hidden, weight, bias, targets, skipped, lse, chunk, wanted);
  if (redo.numel() > 0) {
    auto [gh, gw, gb] = row_chunked_backward(
        grad.index_select(0, redo), hidden.index_select(0, redo), weight, bias,
        targets.index_select(0, redo), lse.index_select(0, redo), chunk, ignore_index, wanted);
    if (wanted.hidden) grad_hidden.index_copy_(0, redo, gh);
    if (wanted.weight) grad_weight.copy_(grad_weight.to(at::kFloat).add_(gw));
    if (wanted.bias) grad_bias.add_(gb);
  }
  return {grad_hidden, grad_weight, wanted.bias ? grad_bias.to(hidden.scalar_type()) : grad_bias};
}

const c10::TypedOperatorHandle<std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
    int64_t, int64_t)>&
linear_token_logprobs_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("latro_engine::linear_token_logprobs", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                    const std::optional<at::Tensor>&,
                                                    const at::Tensor&, int64_t, int64_t)>();
  return op;
}

// The op's autocast rule, that of F.linear (autocast's lower_precision_fp list): inside a
// torch.autocast region hidden, weight and bias are cast to the region's dtype (float32
// activations and master weights included, so mixed dtypes are accepted), then the op runs
// with autocast off; the log-probabilities and lse stay float32. The casts go through autograd,
// so float32 leaves get float32 gradients, and weight casts use autocast's per-region cache.
// linear_token_logprobs_backward keeps the fallthrough: it runs at the dtypes the forward
// saved, which its own guard above makes well defined.
// The rule, shared with linear_weighted_logprob_sum: hidden, weight and bias at the region's dtype.
struct LinearInputs {
  at::Tensor hidden, weight;
  std::optional<at::Tensor> bias;
};

template <c10::DeviceType kDevice>
LinearInputs autocast_linear_inputs(const at::Tensor& hidden, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias) {
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(kDevice);
  return {at::autocast::cached_cast(dtype, hidden, kDevice),
          at::autocast::cached_cast(dtype, weight, kDevice),
          at::autocast::cached_cast(dtype, bias, kDevice)};
}

template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor> linear_token_logprobs_autocast(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, int64_t chunk_size, int64_t ignore_index) {
  NoAutocast no_autocast(c10::autocast_dispatch_keyset);
  const LinearInputs in = autocast_linear_inputs<kDevice>(hidden, weight, bias);
  return linear_token_logprobs_op().call(in.hidden, in.weight, in.bias, targets, chunk_size,
                                         ignore_index);
}

// ------------------------------------------------------------------ linear_weighted_logprob_sum
// sum_i w_i log p(targets_i | hidden_i) with per-token weights w known before the forward (a
// loss linear in the log-probabilities whose coefficients are fixed, as LaTRO's are once the
// advantages are known). Its gradient is then known in the forward too, so one pass computes
// it: per chunk of rows, the logits of the whole vocabulary (matmul 1), their log-softmax at
// the targets, the logits overwritten in place by w (onehot - softmax) (the token_logprobs
// backward kernel), grad_hidden = G W (matmul 2) and grad_weight += G^T hidden (matmul 3).
// Three matmuls where linear_token_logprobs' forward + backward do four (its backward, not
// knowing its upstream gradient in advance, recomputes the logits). The price: chunks cut by
// rows read the LM head three times each and add into the weight gradient once each, in the
// weight's dtype (bf16: one rounding per chunk, as accumulating micro-batch gradients in a bf16
// .grad does; a float32 accumulator would double the memory of a bf16 LM head).
//
// Returns (total, logprobs, grad_hidden, grad_weight, grad_bias); a gradient not asked for is an
// empty tensor. Whole rows per chunk, so rows with extreme logits need no special path.
void check_token_weights(const at::Tensor& token_weights, const at::Tensor& hidden) {
  check_dtype(token_weights, at::kFloat, "token_weights");
  check_same_device(token_weights, hidden, "token_weights", "hidden");
  TORCH_CHECK_VALUE(token_weights.dim() == 1 && token_weights.size(0) == hidden.size(0),
                    "token_weights must have shape [N] = [", hidden.size(0), "], got ",
                    token_weights.sizes());
}

using WeightedSum = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

WeightedSum linear_weighted_logprob_sum(const at::Tensor& hidden, const at::Tensor& weight,
                                        const std::optional<at::Tensor>& bias,
                                        const at::Tensor& targets, const at::Tensor& token_weights,
                                        int64_t chunk_size, int64_t ignore_index,
                                        bool hidden_grad, bool weight_grad, bool bias_grad) {
  at::NoGradGuard no_grad;  // the Python autograd registration owns the gradient
  NoAutocast no_autocast(c10::autocast_dispatch_keyset);
  check_linear(hidden, weight, bias, targets);
  check_token_weights(token_weights, hidden);
  TORCH_CHECK_VALUE(!bias_grad || bias, "bias_grad needs a bias");
  const ComposedCalls composed;  // targets outside the vocabulary: check_targets_in_range
  const int64_t rows = hidden.size(0), vocab = weight.size(0);
  const int64_t chunk = resolve_chunk(chunk_size, rows, vocab, hidden.element_size());
  const at::Tensor w = token_weights.contiguous();
  at::Tensor logprobs, grad_hidden = no_grad_of(hidden), grad_weight = no_grad_of(hidden),
                       grad_bias = no_grad_of(hidden);
  if (!hidden_grad && !weight_grad && !bias_grad) {
    logprobs = std::get<0>(vocab_blocked_forward(hidden, weight, bias, targets, chunk, ignore_index));
  } else {
    // Up front, so an error names the row in the whole batch, not within its chunk.
    check_targets_in_range(targets, at::arange(rows, targets.options()), vocab, ignore_index);
    logprobs = at::empty({rows}, hidden.options().dtype(at::kFloat));
    if (hidden_grad) grad_hidden = at::empty_like(hidden, at::MemoryFormat::Contiguous);
    // Written by the first chunk's matmul (zeros when there is none).
    if (weight_grad) grad_weight = rows > 0 ? at::empty(weight.sizes(), weight.options())
                                            : at::zeros(weight.sizes(), weight.options());
    at::Tensor bias_sum =
        bias_grad ? at::zeros({vocab}, hidden.options().dtype(at::kFloat)) : no_grad_of(hidden);
    for (int64_t begin = 0; begin < rows; begin += chunk) {
      const int64_t n = std::min(chunk, rows - begin);
      const at::Tensor h = hidden.narrow(0, begin, n);
      const at::Tensor t = targets.narrow(0, begin, n);
      at::Tensor logits = chunk_logits(h, weight, bias);
      auto [lp, lse] = token_logprobs_op().call(logits, t, ignore_index);
      logprobs.narrow(0, begin, n).copy_(lp);
      token_logprobs_backward_inplace_op().call(w.narrow(0, begin, n), logits, t, lse,
                                                ignore_index);
      if (hidden_grad) {
        at::Tensor grad_hidden_rows = grad_hidden.narrow(0, begin, n);
        at::mm_out(grad_hidden_rows, logits, weight);
      }
      if (weight_grad && begin == 0) at::mm_out(grad_weight, logits.t(), h);
      if (weight_grad && begin > 0) grad_weight.addmm_(logits.t(), h);
      if (bias_grad) bias_sum.add_(logits.sum(0, /*keepdim=*/false, at::kFloat));
    }
    if (bias_grad) grad_bias = bias_sum.to(hidden.scalar_type());
  }
  // Ignored rows have log-probability 0 and add nothing, whatever their weight.
  const at::Tensor terms = at::where(targets == ignore_index, at::zeros_like(logprobs),
                                     logprobs.to(at::kDouble) * w.to(at::kDouble));
  return {terms.sum().to(at::kFloat), logprobs, grad_hidden, grad_weight, grad_bias};
}

// linear_token_logprobs' autocast rule (casts through autograd, so float32 leaves get float32
// gradients); token_weights stay float32.
template <c10::DeviceType kDevice>
WeightedSum linear_weighted_logprob_sum_autocast(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, const at::Tensor& token_weights, int64_t chunk_size,
    int64_t ignore_index, bool hidden_grad, bool weight_grad, bool bias_grad) {
  NoAutocast no_autocast(c10::autocast_dispatch_keyset);
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("latro_engine::linear_weighted_logprob_sum", "")
          .typed<WeightedSum(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                             const at::Tensor&, const at::Tensor&, int64_t, int64_t, bool, bool,
                             bool)>();
  const LinearInputs in = autocast_linear_inputs<kDevice>(hidden, weight, bias);
  return op.call(in.hidden, in.weight, in.bias, targets, token_weights, chunk_size, ignore_index,
                 hidden_grad, weight_grad, bias_grad);
}

}  // namespace
}  // namespace latro_torch

// ------------------------------------------------------------------ registration
TORCH_LIBRARY(latro_engine, m) {
  m.def("token_logprobs(Tensor logits, Tensor targets, int ignore_index) -> (Tensor, Tensor)");
  m.def(
      "token_logprobs_backward(Tensor grad_logprobs, Tensor logits, Tensor targets, Tensor lse, "
      "int ignore_index) -> Tensor");
  // The same, overwriting the logits with their gradient (the chunked scorer's backward).
  m.def(
      "token_logprobs_backward_(Tensor grad_logprobs, Tensor(a!) logits, Tensor targets, "
      "Tensor lse, int ignore_index) -> ()");
  m.def(
      "linear_token_logprobs(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, "
      "int chunk_size, int ignore_index) -> (Tensor, Tensor)");
  m.def(
      "linear_token_logprobs_backward(Tensor grad_logprobs, Tensor hidden, Tensor weight, "
      "Tensor? bias, Tensor targets, Tensor lse, int chunk_size, int ignore_index, "
      "bool hidden_grad, bool weight_grad, bool bias_grad) -> (Tensor, Tensor, Tensor)");
  // (total, logprobs, grad_hidden, grad_weight, grad_bias): the gradients of total, computed in
  // the forward (empty when not asked for); the Python autograd formula hands them out.
  m.def(
      "linear_weighted_logprob_sum(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, "
      "Tensor token_weights, int chunk_size, int ignore_index, bool hidden_grad, "
      "bool weight_grad, bool bias_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "sample(Tensor logits, Tensor seeds, Tensor offset, float temperature, int top_k, "
      "float top_p, float min_p) -> (Tensor, Tensor)");
  m.def(
      "stop_positions(Tensor tokens, Tensor stop_tokens, Tensor stop_offsets, int start) "
      "-> Tensor");
  m.def(
      "stop_positions_step(Tensor tokens, Tensor stop_tokens, Tensor stop_offsets, Tensor step, "
      "Tensor positions, int start) -> Tensor");
  // Writes new_k / new_v into the caches at slot length - 1 (when given).
  m.def(
      "decode_attention(Tensor query, Tensor(a!) cache_k, Tensor(b!) cache_v, Tensor? new_k, "
      "Tensor? new_v, Tensor? slot_mask, Tensor? rotary_cos, Tensor? rotary_sin, Tensor length, "
      "float scale) -> Tensor");
  // (out, x + residual); the second is empty without a residual.
  m.def("rms_norm(Tensor x, Tensor weight, Tensor? residual, float eps) -> (Tensor, Tensor)");
  m.def("silu_mul(Tensor gate, Tensor up) -> Tensor");
  m.def("rloo_advantages(Tensor rewards, int k) -> Tensor");
  m.def(
      "latro_rewards(Tensor answer_logp, Tensor rationale_logp, Tensor ref_rationale_logp, "
      "Tensor finished, float kl_coef, float nonstop_penalty, str penalty_mode) -> Tensor");
}

TORCH_LIBRARY_IMPL(latro_engine, CPU, m) {
  m.impl("linear_token_logprobs", &latro_torch::linear_token_logprobs);
  m.impl("linear_token_logprobs_backward", &latro_torch::linear_token_logprobs_backward);
  m.impl("linear_weighted_logprob_sum", &latro_torch::linear_weighted_logprob_sum);
}

#ifdef LATRO_WITH_CUDA
TORCH_LIBRARY_IMPL(latro_engine, CUDA, m) {
  m.impl("linear_token_logprobs", &latro_torch::linear_token_logprobs);
  m.impl("linear_token_logprobs_backward", &latro_torch::linear_token_logprobs_backward);
  m.impl("linear_weighted_logprob_sum", &latro_torch::linear_weighted_logprob_sum);
}
#endif

TORCH_LIBRARY_IMPL(latro_engine, AutocastCPU, m) {
  m.impl("linear_token_logprobs",
         &latro_torch::linear_token_logprobs_autocast<c10::DeviceType::CPU>);
  m.impl("linear_weighted_logprob_sum",
         &latro_torch::linear_weighted_logprob_sum_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(latro_engine, AutocastCUDA, m) {
  m.impl("linear_token_logprobs",
         &latro_torch::linear_token_logprobs_autocast<c10::DeviceType::CUDA>);
  m.impl("linear_weighted_logprob_sum",
         &latro_torch::linear_weighted_logprob_sum_autocast<c10::DeviceType::CUDA>);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "latro_engine native ops (registered as torch.ops.latro_engine.*)";
  module.def("core_version", &latro::version, "Version of the torch-free core library.");
  module.def(
      "has_cuda",
      [] {
#ifdef LATRO_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "Whether the CUDA kernels were compiled into this build.");
}

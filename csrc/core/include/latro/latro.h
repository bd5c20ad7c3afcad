// latro_engine's torch-free core: the hot paths of LaTRO training on raw pointers.
//
//   token_logprobs          log_softmax(logits)[target] with one read of the logits (+ backward)
//   sample                  temperature / top-k / top-p / min-p sampling, counter-based RNG
//   stop_positions(_step)   where a stop sequence ("The answer is", EOS) begins in each row
//   rloo_advantages         leave-one-out baselines within groups of k samples
//   latro_rewards           self-reward minus the KL term, with the non-stop penalty
//   decode_attention        one query token per row against a static KV cache (decoding)
//   rms_norm                the models' RMSNorm, optionally of a residual sum (decoding)
//   silu_mul                the gated MLP's silu(gate) * up (decoding)
//
// Conventions: row-major matrices with an explicit row stride (elements) and unit stride along
// the last dimension; int64 ids; float32 results. Every function validates its arguments and
// throws latro::Error naming the argument. CPU functions are single-threaded and take an
// optional row range [row_begin, row_end) so the caller can spread rows over its own threads
// (row_end = -1 means all rows); results do not depend on how the rows are split.
#pragma once

#include <cstdint>

#include "latro/error.h"
#include "latro/philox.h"
#include "latro/types.h"

namespace latro {

constexpr int kVersionMajor = 0;
constexpr int kVersionMinor = 1;
const char* version();

// ---------------------------------------------------------------- token log-probabilities
struct TokenLogprobsArgs {
  const void* logits = nullptr;  // [rows, vocab] of `dtype`, row stride `row_stride`
  DType dtype = DType::Float32;
  int64_t rows = 0;
  int64_t vocab = 0;
  int64_t row_stride = -1;          // -1: vocab (dense rows)
  const int64_t* targets = nullptr;  // [rows], each in [0, vocab) or == ignore_index
  int64_t ignore_index = -100;
  float* logprobs = nullptr;  // out [rows]: log_softmax(logits[r])[targets[r]], 0 where ignored
  float* lse = nullptr;       // optional out [rows]: log-sum-exp of the row, 0 where ignored
};

// Online log-sum-exp in float32 blocks with a float64 running total; never materializes a
// float32 copy of a row. The log-probability is (logit - max) - log(sum exp(logits - max)),
// never logit - lse: near the float32 maximum max + log(sum) rounds back to max (even in
// float64) and two tied logits of 3e38 would both get 0 instead of -log 2.
void token_logprobs(const TokenLogprobsArgs& args, int64_t row_begin = 0, int64_t row_end = -1);

// The simple forms for embedders: dense rows, ignore_index -100.
void token_logprobs(const float* logits, int64_t rows, int64_t vocab, const int64_t* targets,
                    float* out);
void token_logprobs(const bfloat16* logits, int64_t rows, int64_t vocab, const int64_t* targets,
                    float* out);
void token_logprobs(const float16* logits, int64_t rows, int64_t vocab, const int64_t* targets,
                    float* out);

struct TokenLogprobsBackwardArgs {
  const void* logits = nullptr;  // as in the forward
  DType dtype = DType::Float32;
  int64_t rows = 0;
  int64_t vocab = 0;
  int64_t row_stride = -1;
  const int64_t* targets = nullptr;
  int64_t ignore_index = -100;
  const float* lse = nullptr;            // [rows], from the forward
  const float* grad_logprobs = nullptr;  // [rows], any upstream gradient
  void* grad_logits = nullptr;  // out [rows, vocab] of `dtype`; may alias `logits` exactly
  int64_t grad_row_stride = -1;  // -1: vocab
};

// grad_logits[r, v] = grad_logprobs[r] * ([v == targets[r]] - exp(logits[r, v] - lse[r])),
// zero rows where the target is ignore_index.
//
// The softmax is exp(logits - lse) with the float32 lse while |lse| < kRecomputeLseFrom: the
// rounding of the stored lse then costs at most |lse| 2^-24 < 2^-18 of each probability. From
// there on (logits in the hundreds, or near the float32 maximum, where lse rounds to the row
// max and two tied logits would each get probability 1) the kernel recomputes the row's max
// and log(sum exp(logits - max)) and takes exp((logits - max) - log_sum), at the cost of one
// more read of such a row. A non-finite lse is used as it is.
constexpr float kRecomputeLseFrom = 64.0f;
void token_logprobs_backward(const TokenLogprobsBackwardArgs& args, int64_t row_begin = 0,
                             int64_t row_end = -1);

// ---------------------------------------------------------------- sampling
struct SampleArgs {
  const void* logits = nullptr;  // [rows, vocab] of `dtype`
  DType dtype = DType::Float32;
  int64_t rows = 0;
  int64_t vocab = 0;
  int64_t row_stride = -1;
  // One seed for the batch (per_row_seeds = false: seeds[0], random stream = row index) or
  // one per row (seeds[row], stream 0, so a row's draws do not depend on its batch position).
  const int64_t* seeds = nullptr;
  bool per_row_seeds = false;
  const int64_t* offset = nullptr;  // the decode step: one value, readable where the kernel runs
  float temperature = 1.0f;         // 0: greedy (argmax, lowest id on ties, log-prob 0)
  int64_t top_k = 0;                // 0: off; else keep logits >= the k-th largest (ties kept)
  float top_p = 1.0f;               // 1: off; else the smallest nucleus of mass >= top_p
  float min_p = 0.0f;               // 0: off; else keep p >= min_p * max p
  int64_t* ids = nullptr;           // out [rows]
  float* logprobs = nullptr;        // out [rows]: log-prob of ids under the kept distribution
};

// Filtering order: scale by 1/temperature; top-k and min-p (both thresholds on the scaled
// logits, order-free); then top-p over the renormalized survivors. A token is drawn as
// argmax(scaled logit + Gumbel noise) over the kept set, with the noise of token v taken from
// Philox at counters (v / 8, stream, offset) and (2^31 + v / 16, stream, offset) under the seed
// (latro/philox.h's sampling_token_bits): the same inputs give the same ids on every call and
// every backend (up to ties within rounding).
void sample(const SampleArgs& args, int64_t row_begin = 0, int64_t row_end = -1);

// Checks the scalar options alone (temperature finite and >= 0, top_k >= 0, top_p in (0, 1],
// min_p in [0, 1]); sample() calls it too.
void check_sampling_options(float temperature, int64_t top_k, float top_p, float min_p);

// ---------------------------------------------------------------- stop detection
// A set of token sequences, sequence i = tokens[offsets[i] .. offsets[i + 1]); count + 1 offsets
// and token_count tokens (the length of `tokens`, which the offsets must end at).
struct StopSequences {
  const int64_t* tokens = nullptr;
  const int64_t* offsets = nullptr;
  int64_t count = 0;
  int64_t token_count = 0;
};

// Checks the offsets start at 0, increase strictly (no empty sequence) and end at token_count,
// so no sequence reaches outside `tokens`. Reads the offsets, never the tokens.
void check_stop_sequences(const StopSequences& stops);

// out[r] = the index where the earliest occurrence (starting at or after `start`) of any stop
// sequence begins in tokens[r, :len], or len where none occurs.
void stop_positions(const int64_t* tokens, int64_t rows, int64_t len, int64_t row_stride,
                    const StopSequences& stops, int64_t start, int64_t* out,
                    int64_t row_begin = 0, int64_t row_end = -1);

// The incremental form for decode loops: only stop sequences that end exactly at `step` (the
// newest token) are checked. positions_out[r] = positions_in[r] if that row had already
// stopped (positions_in[r] != len), else the start of the first stop sequence (in the given
// order) that ends at `step` and begins at or after `start`, else len. positions_out may alias
// positions_in. Calling it for step = start, start + 1, ... reports where each row first
// completed a stop sequence.
void stop_positions_step(const int64_t* tokens, int64_t rows, int64_t len, int64_t row_stride,
                         const StopSequences& stops, int64_t step, int64_t start,
                         const int64_t* positions_in, int64_t* positions_out,
                         int64_t row_begin = 0, int64_t row_end = -1);

// ---------------------------------------------------------------- rewards and advantages
// rewards [groups * k], grouped contiguously: out[i] = r_i - (sum of its group - r_i) / (k - 1).
void rloo_advantages(const float* rewards, int64_t groups, int64_t k, float* out);

enum class PenaltyMode : int {
  Constant = 0,   // rows that never stopped get `nonstop_penalty`
  BatchMean = 1,  // ... get nonstop_penalty * mean(answer_logp over all n rows), as the
                  // reference implementation does
};

// out[i] = R_i - kl_coef * (rationale_logp[i] - ref_rationale_logp[i]), with the self-reward
// R_i = answer_logp[i] for rows that finished and the penalty for rows that did not (the penalty
// replaces the self-reward, not the KL term, as in the reference code): nonstop_penalty
// (Constant) or nonstop_penalty * mean(answer_logp) over all n rows (BatchMean). `finished`
// holds C++ bools: each byte 0 or 1 (another value is undefined behaviour, as for any bool).
void latro_rewards(const float* answer_logp, const float* rationale_logp,
                   const float* ref_rationale_logp, const bool* finished, int64_t n,
                   float kl_coef, float nonstop_penalty, PenaltyMode mode, float* out);

// ---------------------------------------------------------------- decode attention
struct DecodeAttentionArgs {
  DType dtype = DType::Float32;  // of query, caches, new_k / new_v and out
  int64_t rows = 0;
  int64_t heads = 0;     // query heads; a multiple of kv_heads (query head h reads KV head
  int64_t kv_heads = 0;  // h / (heads / kv_heads), as grouped-query attention repeats them)
  int64_t slots = 0;     // KV cache capacity per row and head
  int64_t head_dim = 0;  // 1 .. kMaxDecodeHeadDim
  const void* query = nullptr;  // [rows, heads, head_dim], dense
  // [rows, kv_heads, slots, head_dim], dense within a row; rows cache_row_stride apart.
  void* cache_k = nullptr;
  void* cache_v = nullptr;
  int64_t cache_row_stride = -1;  // elements; -1: kv_heads * slots * head_dim
  // Optional [rows, kv_heads, head_dim], dense: the newest key and value, attended at slot
  // length - 1 and written there into the caches (nullptr: the caches already hold them).
  // Both or neither.
  const void* new_k = nullptr;
  const void* new_v = nullptr;
  // Optional [rows, mask_row_stride]: the slots each row may attend (padding slots of a
  // left-padded prompt are false); nullptr: all of them. Bytes 0 or 1, as any bool.
  const bool* slot_mask = nullptr;
  int64_t mask_row_stride = -1;  // -1: slots
  // Optional rotary embedding [rows, head_dim], dense, stored in rotary_dtype (both or neither;
  // head_dim even): the query and new_k are first rotated, x * cos + rotate_half(x) * sin with
  // rotate_half(x) = [-x[D/2:], x[:D/2]], and rounded to dtype; the cache receives the rotated
  // key. Without it they are used as given.
  const void* rotary_cos = nullptr;
  const void* rotary_sin = nullptr;
  // The tables' dtype, which is also where the rotation's two products and their sum are
  // rounded, as torch's element-wise ops round them on such tables: Float32 (a model computing
  // in float32, e.g. float32 weights under bf16 autocast), or `dtype` (a bf16 / fp16 model's
  // own tables: each product and the sum rounded to dtype). Read in their own dtype, so a
  // decode step passes its tables to every layer without a conversion.
  DType rotary_dtype = DType::Float32;
  const int64_t* length = nullptr;  // one value in [1, slots], readable where the kernel runs
  float scale = 1.0f;               // softmax scale, usually 1 / sqrt(head_dim)
  void* out = nullptr;              // out [rows, heads, head_dim], dense
};

constexpr int64_t kMaxDecodeHeadDim = 256;

// out[r, h] = sum_s softmax_s(scale * q[r, h] . k[r, g, s]) v[r, g, s] over the slots s <
// length that slot_mask allows, g = h / (heads / kv_heads); float32 arithmetic, rounded once
// into the output dtype. A row with no allowed slot gets zeros. Slots at or beyond `length`
// are never read, so a decode loop pays for the tokens it has, not for the cache's capacity.
void decode_attention(const DecodeAttentionArgs& args, int64_t row_begin = 0,
                      int64_t row_end = -1);

// ---------------------------------------------------------------- RMSNorm
struct RmsNormArgs {
  DType dtype = DType::Float32;  // of every tensor
  int64_t rows = 0;
  int64_t dim = 0;
  const void* x = nullptr;         // [rows, dim], dense
  const void* residual = nullptr;  // optional [rows, dim]: the norm is of s = x + residual
  void* sum = nullptr;             // out [rows, dim], required with residual: s; may be
                                   // residual or x (the residual stream updated in place)
  const void* weight = nullptr;    // [dim]
  float eps = 1e-6f;
  void* out = nullptr;             // out [rows, dim]; may be x or sum
};

// The RMSNorm of Llama-family models, optionally fused with the residual addition before it:
// s = x (+ residual, rounded to dtype), n = s / sqrt(mean(s^2) + eps) rounded to dtype, out =
// weight * n rounded to dtype: the roundings of the models' own forward (float32 arithmetic,
// the mean of squares summed in float64 so that every backend gets the same float32 mean).
void rms_norm(const RmsNormArgs& args, int64_t row_begin = 0, int64_t row_end = -1);

// ---------------------------------------------------------------- gated MLP activation
struct SiluMulArgs {
  DType dtype = DType::Float32;  // of every tensor
  int64_t count = 0;             // elements, dense
  const void* gate = nullptr;
  const void* up = nullptr;
  void* out = nullptr;
};

// out = silu(gate) * up as the models compute it: silu(g) = g / (1 + exp(-g)) in float32,
// rounded to dtype, then times up, rounded. The CPU function takes an element range
// [begin, end) (end = -1: all) instead of rows.
void silu_mul(const SiluMulArgs& args, int64_t begin = 0, int64_t end = -1);

}  // namespace latro

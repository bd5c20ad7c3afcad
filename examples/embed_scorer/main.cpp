// embed_scorer: scores a few hand-made logits rows with latro::token_logprobs (float32 and
// bfloat16 storage), checks them against a direct log-softmax, and shows the error type.
// Exits non-zero on any mismatch.
#include <latro/latro.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>

namespace {

constexpr int64_t kRows = 3;
constexpr int64_t kVocab = 5;

// log_softmax(row)[target] in double, straight from the definition.
double direct_logprob(const float* row, int64_t vocab, int64_t target) {
  double max = row[0];
  for (int64_t v = 1; v < vocab; ++v) max = std::fmax(max, row[v]);
  double sum = 0.0;
  for (int64_t v = 0; v < vocab; ++v) sum += std::exp(row[v] - max);
  return row[target] - max - std::log(sum);
}

int check(const char* label, const std::vector<float>& values, const std::vector<int64_t>& targets,
          const std::vector<float>& got) {
  int failures = 0;
  for (int64_t r = 0; r < kRows; ++r) {
    const double want = direct_logprob(values.data() + r * kVocab, kVocab, targets[r]);
    const bool ok = std::fabs(got[r] - want) <= 1e-5 * (1.0 + std::fabs(want));
    std::printf("%-9s row %lld target %lld: logprob %+.6f (direct %+.6f) %s\n", label,
                static_cast<long long>(r), static_cast<long long>(targets[r]), got[r], want,
                ok ? "ok" : "MISMATCH");
    failures += ok ? 0 : 1;
  }
  return failures;
}

}  // namespace

int main() {
  std::printf("latro core %s\n", latro::version());
  const std::vector<float> logits = {
      2.0f, 1.0f, 0.5f, -1.0f, 0.0f,   //
      -3.0f, 4.0f, 4.0f, 0.25f, 1.5f,  //
      10.0f, -10.0f, 0.0f, 3.0f, 7.5f,
  };
  const std::vector<int64_t> targets = {0, 2, 3};
  int failures = 0;

  // float32 storage, the simple overload.
  std::vector<float> out(kRows);
  latro::token_logprobs(logits.data(), kRows, kVocab, targets.data(), out.data());
  failures += check("float32", logits, targets, out);

  // bfloat16 storage: the reference sees the same rounded values the core reads.
  std::vector<latro::bfloat16> logits_bf16;
  std::vector<float> rounded;
  for (float x : logits) {
    logits_bf16.push_back(latro::to_bfloat16(x));
    rounded.push_back(latro::to_float(logits_bf16.back()));
  }
  latro::token_logprobs(logits_bf16.data(), kRows, kVocab, targets.data(), out.data());
  failures += check("bfloat16", rounded, targets, out);

  // The full form: an explicit ignore_index and the log-sum-exp kept for a backward.
  std::vector<int64_t> masked = {0, -100, 3};
  std::vector<float> lse(kRows);
  latro::TokenLogprobsArgs args;
  args.logits = logits.data();
  args.dtype = latro::DType::Float32;
  args.rows = kRows;
  args.vocab = kVocab;
  args.targets = masked.data();
  args.logprobs = out.data();
  args.lse = lse.data();
  latro::token_logprobs(args);
  if (out[1] != 0.0f || lse[1] != 0.0f) {
    std::printf("ignored row: expected 0, got logprob %g lse %g\n", out[1], lse[1]);
    ++failures;
  }

  // Bad input raises latro::Error naming the argument.
  const std::vector<int64_t> bad_targets = {0, kVocab, 1};
  try {
    latro::token_logprobs(logits.data(), kRows, kVocab, bad_targets.data(), out.data());
    std::printf("expected latro::Error for an out-of-range target\n");
    ++failures;
  } catch (const latro::Error& e) {
    std::printf("caught latro::Error: %s\n", e.what());
  }

  if (failures != 0) {
    std::printf("embed_scorer: %d check(s) failed\n", failures);
    return 1;
  }
  std::printf("embed_scorer: all checks passed\n");
  return 0;
}

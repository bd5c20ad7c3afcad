// Arguments whose sizes multiply past any memory (2^31 x 2^31 elements and more), with pointers
// to a small buffer: the entry points must refuse them naming the argument, before their index
// arithmetic overflows or they read anything. Shared by the CPU suite (test_argument_sizes.cpp)
// and the emulated CUDA kernels (test_cuda_emulated.cpp).
#pragma once

#include <cstdint>
#include <vector>

#include "latro/latro.h"

namespace latro_test {

struct HugeSizes {
  static constexpr int64_t kHuge = int64_t{1} << 31;
  std::vector<int64_t> buffer = std::vector<int64_t>(64, 0);  // never read

  void* data() { return buffer.data(); }
  int64_t* ints() { return buffer.data(); }
  float* floats() { return reinterpret_cast<float*>(buffer.data()); }

  latro::TokenLogprobsArgs token_logprobs() {
    latro::TokenLogprobsArgs a;
    a.logits = data();
    a.rows = kHuge;
    a.vocab = kHuge;
    a.targets = ints();
    a.logprobs = floats();
    return a;
  }

  latro::TokenLogprobsBackwardArgs token_logprobs_backward() {
    latro::TokenLogprobsBackwardArgs a;
    a.logits = data();
    a.rows = kHuge;
    a.vocab = kHuge;
    a.targets = ints();
    a.lse = floats();
    a.grad_logprobs = floats();
    a.grad_logits = data();
    return a;
  }

  latro::SampleArgs sample() {
    latro::SampleArgs a;
    a.logits = data();
    a.rows = kHuge;
    a.vocab = kHuge;
    a.seeds = ints();
    a.offset = ints();
    a.ids = ints();
    a.logprobs = floats();
    return a;
  }

  // Rows of cache past any memory; with `huge_rows = false`, a single cache row is.
  latro::DecodeAttentionArgs decode_attention(bool huge_rows) {
    latro::DecodeAttentionArgs a;
    a.rows = huge_rows ? kHuge : 1;
    a.kv_heads = huge_rows ? 1 : kHuge;
    a.heads = a.kv_heads;
    a.slots = kHuge;
    a.head_dim = 256;
    a.query = data();
    a.cache_k = data();
    a.cache_v = data();
    a.length = ints();
    a.scale = 1.0f;
    a.out = data();
    return a;
  }

  latro::RmsNormArgs rms_norm() {
    latro::RmsNormArgs a;
    a.rows = kHuge;
    a.dim = kHuge;
    a.x = data();
    a.weight = data();
    a.out = data();
    return a;
  }
};

}  // namespace latro_test

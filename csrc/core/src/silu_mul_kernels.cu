// The gated MLP's silu(gate) * up on CUDA: one kernel where the models' forward takes two (the
// activation, then the product), in a grid-stride loop. Arrays of whole 16-byte vectors (every
// pointer aligned, the count a multiple of 16 bytes: the decode step's) take
// silu_mul_vector_kernel, a vector per load and store; the element-wise kernel took 10 us per
// call on an H100 for the 1.5B model's decode step (2026-11-26), one 2-byte load per thread.
#include "decode_elements.h"
#include "cuda_common.cuh"

namespace latro::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads) silu_mul_kernel(const SiluMulArgs a) {
  const T* gate = static_cast<const T*>(a.gate);
  const T* up = static_cast<const T*>(a.up);
  T* out = static_cast<T*>(a.out);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < a.count;
       i += stride) {
    out[i] = ::latro::detail::silu_times<T>(detail::load_float(gate[i]), detail::load_float(up[i]));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) silu_mul_vector_kernel(const SiluMulArgs a) {
  constexpr int kV = detail::kVec<T>;
  const auto* gate = static_cast<const detail::Vec16<T>*>(a.gate);
  const auto* up = static_cast<const detail::Vec16<T>*>(a.up);
  auto* out = static_cast<detail::Vec16<T>*>(a.out);
  const int64_t vectors = a.count / kV;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; j < vectors;
       j += stride) {
    const detail::Vec16<T> g = gate[j], u = up[j];
    detail::Vec16<T> o;
#pragma unroll
    for (int i = 0; i < kV; ++i) {
      o.items[i] = ::latro::detail::silu_times<T>(detail::load_float(g.items[i]),
                                                  detail::load_float(u.items[i]));
    }
    out[j] = o;
  }
}

}  // namespace

void silu_mul(const SiluMulArgs& args, cudaStream_t stream) {
  detail::check_silu_mul_args(args);
  if (args.count == 0) return;
  LATRO_DISPATCH_DTYPE(args.dtype, T, [&] {
    const bool vectors = args.count % detail::kVec<T> == 0 && detail::is_aligned16(args.gate) &&
                         detail::is_aligned16(args.up) && detail::is_aligned16(args.out);
    const int64_t threads = vectors ? args.count / detail::kVec<T> : args.count;
    const int64_t blocks = (threads + kThreads - 1) / kThreads;
    const unsigned int grid = static_cast<unsigned int>(blocks < 65536 ? blocks : 65536);
    detail::launch(vectors ? silu_mul_vector_kernel<T> : silu_mul_kernel<T>, grid, kThreads,
                   stream, args);
  });
  LATRO_CUDA_CHECK(cudaGetLastError());
}

}  // namespace latro::cuda

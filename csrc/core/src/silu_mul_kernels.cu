// The gated MLP's silu(gate) * up on CUDA: one kernel where the models' forward takes two (the
// activation, then the product), in a grid-stride loop.
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

}  // namespace

void silu_mul(const SiluMulArgs& args, cudaStream_t stream) {
  detail::check_silu_mul_args(args);
  if (args.count == 0) return;
  const int64_t blocks = (args.count + kThreads - 1) / kThreads;
  const unsigned int grid = static_cast<unsigned int>(blocks < 65536 ? blocks : 65536);
  LATRO_DISPATCH_DTYPE(args.dtype, T, [&] {
    detail::launch(silu_mul_kernel<T>, grid, kThreads, stream, args);
  });
  LATRO_CUDA_CHECK(cudaGetLastError());
}

}  // namespace latro::cuda

// The models' RMSNorm on CUDA, optionally fused with the residual addition before it. In a
// decode step the torch way is five kernels per norm (the float32 copy, the norm, the cast back,
// the weight, and the residual add before it); this is one. One block per row: the sum of
// squares in float64 over a fixed reduction tree (so the float32 mean is the CPU's), then the
// row again (from L1/L2) for the output.
#include "cuda_common.cuh"
#include "decode_elements.h"

namespace latro::cuda {
namespace {

using detail::store_float;

constexpr int kThreads = 256;

struct SumDouble {
  __device__ double operator()(double a, double b) const { return a + b; }
};

template <typename T>
__global__ void __launch_bounds__(kThreads) rms_norm_kernel(const RmsNormArgs a) {
  __shared__ double scratch[detail::kMaxWarps + 1];
  const int64_t d = a.dim;
  const T* x = static_cast<const T*>(a.x);
  const T* residual = static_cast<const T*>(a.residual);
  const T* weight = static_cast<const T*>(a.weight);
  T* sum = static_cast<T*>(a.sum);
  T* out = static_cast<T*>(a.out);
  for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
    const T* row_residual = residual ? residual + r * d : nullptr;
    double squares = 0.0;
    for (int64_t i = threadIdx.x; i < d; i += kThreads) {
      const float s = ::latro::detail::rms_input(x + r * d, row_residual, i);
      if (residual) sum[r * d + i] = store_float<T>(s);
      squares += static_cast<double>(s) * s;
    }
    squares = detail::block_all_reduce(squares, SumDouble{}, scratch);
    const float inverse = ::latro::detail::rms_inverse(squares, d, a.eps);
    for (int64_t i = threadIdx.x; i < d; i += kThreads) {
      out[r * d + i] = ::latro::detail::rms_output(
          weight[i], ::latro::detail::rms_input(x + r * d, row_residual, i), inverse);
    }
  }
}

}  // namespace

void rms_norm(const RmsNormArgs& args, cudaStream_t stream) {
  detail::check_rms_norm_args(args);
  if (args.rows == 0) return;
  LATRO_DISPATCH_DTYPE(args.dtype, T, [&] {
    detail::launch(rms_norm_kernel<T>, detail::row_blocks(args.rows), kThreads, stream, args);
  });
  LATRO_CUDA_CHECK(cudaGetLastError());
}

}  // namespace latro::cuda

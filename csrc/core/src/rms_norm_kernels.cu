// The models' RMSNorm on CUDA, optionally fused with the residual addition before it. In a
// decode step the torch way is five kernels per norm (the float32 copy, the norm, the cast back,
// the weight, and the residual add before it); this is one. One block per row: the sum of
// squares in float64 over a fixed reduction tree (so the float32 mean is the CPU's), then the
// row again (from L1/L2) for the output.
#include "cuda_common.cuh"

namespace latro::cuda {
namespace {

using detail::load_float;
using detail::store_float;

constexpr int kThreads = 256;

struct SumDouble {
  __device__ double operator()(double a, double b) const { return a + b; }
};

template <typename T>
__device__ __forceinline__ float rounded(float x) {
  return load_float(store_float<T>(x));
}

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
    auto s_at = [&](int64_t i) {
      const float v = load_float(x[r * d + i]);
      return residual ? rounded<T>(v + load_float(residual[r * d + i])) : v;
    };
    double squares = 0.0;
    for (int64_t i = threadIdx.x; i < d; i += kThreads) {
      const float s = s_at(i);
      if (residual) sum[r * d + i] = store_float<T>(s);
      squares += static_cast<double>(s) * s;
    }
    squares = detail::block_all_reduce(squares, SumDouble{}, scratch);
    // IEEE sqrt and division (nvcc's defaults), not rsqrtf: the CPU's float.
    const float inverse =
        1.0f / sqrtf(static_cast<float>(squares / static_cast<double>(d)) + a.eps);
    for (int64_t i = threadIdx.x; i < d; i += kThreads) {
      out[r * d + i] = store_float<T>(load_float(weight[i]) * rounded<T>(s_at(i) * inverse));
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

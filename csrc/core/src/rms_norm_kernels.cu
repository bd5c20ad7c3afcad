// The models' RMSNorm on CUDA, optionally fused with the residual addition before it. In a
// decode step the torch way is five kernels per norm (the float32 copy, the norm, the cast back,
// the weight, and the residual add before it); this is one. One block per row: the sum of
// squares in float64 over a fixed reduction tree (so the float32 mean is the CPU's), then the
// row again (from L1/L2) for the output. Rows of whole 16-byte vectors (every pointer aligned,
// dim a multiple of 16 bytes: the decode step's norms) take rms_norm_vector_kernel, which moves
// a vector per load and store; the rest rms_norm_kernel, an element at a time. The element-wise
// kernel took 10 us per call on an H100 for 64 rows of 2,048 bf16 (2026-11-26: 33 calls per
// decode step of the 1.5B model, 14% of the step): each thread read its 8 elements of a row
// with 8 two-byte loads in turn, where one 16-byte load holds them all.
#include "cuda_common.cuh"
#include "decode_elements.h"

namespace latro::cuda {
namespace {

using detail::store_float;
using detail::Vec16;

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
    // s from where it now lies (see rms_norm.cpp): each thread re-reads the elements it wrote.
    const T* s_row = residual ? sum + r * d : x + r * d;
    for (int64_t i = threadIdx.x; i < d; i += kThreads) {
      out[r * d + i] = ::latro::detail::rms_output(weight[i], to_float(s_row[i]), inverse);
    }
  }
}

// rms_norm_kernel a vector at a time; the same element formulas in the same order per element,
// so the same results (the float64 sums of squares differ in order only). kResidual: a template
// argument, and the elements go to the formulas by value, so that the vectors stay in registers
// (pointers into them put them in local memory). Four blocks per SM as the launch bound: left
// to itself ptxas held the float32 variant to 32 registers and spilled one.
template <typename T, bool kResidual>
__global__ void __launch_bounds__(kThreads, 4) rms_norm_vector_kernel(const RmsNormArgs a) {
  constexpr int kV = detail::kVec<T>;
  __shared__ double scratch[detail::kMaxWarps + 1];
  const int64_t vectors = a.dim / kV;
  const auto* weight = static_cast<const Vec16<T>*>(a.weight);
  // s = x (+ residual, rounded to T) at element i of the vectors: rms_input's formula
  auto input = [](const Vec16<T>& xv, const Vec16<T>& rv, int i) {
    const float v = to_float(xv.items[i]);
    return kResidual ? ::latro::detail::rms_residual_sum<T>(v, to_float(rv.items[i])) : v;
  };
  for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
    const auto* x = static_cast<const Vec16<T>*>(a.x) + r * vectors;
    const auto* residual =
        kResidual ? static_cast<const Vec16<T>*>(a.residual) + r * vectors : nullptr;
    double squares = 0.0;
    for (int64_t j = threadIdx.x; j < vectors; j += kThreads) {
      const Vec16<T> xv = x[j];
      Vec16<T> rv{};
      if constexpr (kResidual) rv = residual[j];
      Vec16<T> sv;
#pragma unroll
      for (int i = 0; i < kV; ++i) {
        const float s = input(xv, rv, i);
        sv.items[i] = store_float<T>(s);
        squares += static_cast<double>(s) * s;
      }
      if constexpr (kResidual) static_cast<Vec16<T>*>(a.sum)[r * vectors + j] = sv;
    }
    squares = detail::block_all_reduce(squares, SumDouble{}, scratch);
    const float inverse = ::latro::detail::rms_inverse(squares, a.dim, a.eps);
    // s from where it now lies (see rms_norm.cpp): one vector read instead of x's and the
    // residual's, each thread re-reading the vectors it wrote.
    const auto* s_row = kResidual ? static_cast<const Vec16<T>*>(a.sum) + r * vectors : x;
    for (int64_t j = threadIdx.x; j < vectors; j += kThreads) {
      const Vec16<T> sv = s_row[j];
      const Vec16<T> wv = weight[j];
      Vec16<T> ov;
#pragma unroll
      for (int i = 0; i < kV; ++i) {
        ov.items[i] = ::latro::detail::rms_output(wv.items[i], to_float(sv.items[i]), inverse);
      }
      static_cast<Vec16<T>*>(a.out)[r * vectors + j] = ov;
    }
  }
}

}  // namespace

void rms_norm(const RmsNormArgs& args, cudaStream_t stream) {
  detail::check_rms_norm_args(args);
  if (args.rows == 0) return;
  LATRO_DISPATCH_DTYPE(args.dtype, T, [&] {
    const bool vectors = args.dim % detail::kVec<T> == 0 && detail::is_aligned16(args.x) &&
                         detail::is_aligned16(args.residual) && detail::is_aligned16(args.sum) &&
                         detail::is_aligned16(args.weight) && detail::is_aligned16(args.out);
    auto* kernel = !vectors              ? rms_norm_kernel<T>
                   : args.residual != nullptr ? rms_norm_vector_kernel<T, true>
                                              : rms_norm_vector_kernel<T, false>;
    detail::launch(kernel, detail::row_blocks(args.rows), kThreads, stream, args);
  });
  LATRO_CUDA_CHECK(cudaGetLastError());
}

}  // namespace latro::cuda

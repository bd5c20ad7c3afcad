// A CPU emulation of the small part of CUDA that the core's kernels use, so their logic runs
// under ctest on machines without a GPU.
//
// The kernel sources (csrc/core/src/*_kernels.cu) are compiled as C++ with this directory first
// on the include path: its cuda_runtime.h, cuda_runtime_api.h, cuda_fp16.h and cuda_bf16.h all
// lead here. Each CUDA thread of a block runs as a fiber on the calling thread; __syncthreads
// and the warp shuffles switch fibers, so a block runs exactly as the barriers allow and
// nothing else. Blocks run one after another, so `__shared__` (static storage here) is the
// block's own.
//
// What it checks: the kernels' arithmetic, indexing, barriers and fallbacks; out-of-bounds
// accesses under AddressSanitizer; barrier misuse (a barrier some threads never reach is
// reported as a deadlock, a shuffle with an exited lane as an error) and missing barriers,
// where a thread reads shared memory that another writes later in program order, by running
// the threads in several schedules (forward, reverse, shuffled); launches asking for more
// dynamic shared memory than the kernel's limit (48 KiB unless raised, as on a GPU).
// What it cannot check: speed, registers, memory ordering and races finer than a barrier,
// code that relies on the warp executing in lockstep without a shuffle or __syncwarp, and
// lanes of one warp reaching different warp collectives (a shuffle, ballot or __syncwarp
// only counts its lanes, so lanes in two branches, each at its own ballot, pass together).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>

#include "latro/types.h"

#define LATRO_CUDA_EMULATION 1

// ---------------------------------------------------------------- qualifiers
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Blocks run one at a time, so static storage is the running block's shared memory.
#define __shared__ static

// ---------------------------------------------------------------- vector and index types
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};

// ---------------------------------------------------------------- runtime API
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 719 };
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4
};
struct CUstream_st;
using cudaStream_t = CUstream_st*;

// Returns and clears the error of the last failed launch (the emulator's message is kept in
// latro_emu::last_error_message()).
cudaError_t cudaGetLastError();
const char* cudaGetErrorString(cudaError_t error);
// "Device" memory is host memory: the copies and sets happen at once.
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t = nullptr) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind,
                                   cudaStream_t = nullptr) {
  std::memmove(dst, src, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

// Shared memory limits. The emulated device is one GPU (device 0) with an H100's figures:
// 228 KiB of shared memory per SM, 1 KiB of it reserved per block, at most 227 KiB per block
// after the opt-in, 48 KiB of dynamic shared memory per launch without it. The emulator cannot
// see a kernel's static __shared__ size, so cudaFuncGetAttributes reports 0 for it.
enum cudaDeviceAttr {
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
  cudaDevAttrReservedSharedMemoryPerBlock = 111
};
enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9
};
enum cudaSharedCarveout {
  cudaSharedmemCarveoutDefault = -1,
  cudaSharedmemCarveoutMaxL1 = 0,
  cudaSharedmemCarveoutMaxShared = 100
};
struct cudaFuncAttributes {
  size_t sharedSizeBytes = 0;
  int maxDynamicSharedSizeBytes = 0;
  int preferredShmemCarveout = -1;
};
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device);

namespace latro_emu {
// A kernel as the attribute table knows it (any function pointer converts to this and back).
using KernelKey = void (*)();
cudaError_t func_get_attributes(cudaFuncAttributes* attributes, KernelKey kernel);
cudaError_t func_set_attribute(KernelKey kernel, cudaFuncAttribute attribute, int value);
}  // namespace latro_emu

template <typename... Params>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, void (*kernel)(Params...)) {
  return ::latro_emu::func_get_attributes(attributes,
                                          reinterpret_cast<::latro_emu::KernelKey>(kernel));
}
// Raising the dynamic limit past the device's opt-in maximum, or a carveout outside
// [-1, 100], is cudaErrorInvalidValue, as on a GPU.
template <typename... Params>
cudaError_t cudaFuncSetAttribute(void (*kernel)(Params...), cudaFuncAttribute attribute,
                                 int value) {
  return ::latro_emu::func_set_attribute(reinterpret_cast<::latro_emu::KernelKey>(kernel),
                                         attribute, value);
}

namespace latro_emu {

// The order the scheduler gives the threads of a block between two barriers. Results must not
// depend on it; a kernel that misses a barrier usually shows it in one of them.
enum class Schedule { Forward, Reverse, Shuffled };
void set_schedule(Schedule schedule, uint32_t seed = 0);
Schedule schedule();

// The message of the last failed launch (deadlock, an exception in a thread, ...).
const char* last_error_message();

// Runs body() once per thread of every block of the grid, blocks in order; each block gets
// dynamic_shared_bytes of dynamic shared memory (16-byte aligned), filled with a garbage
// pattern. More than `kernel`'s cudaFuncAttributeMaxDynamicSharedMemorySize (48 KiB unless
// raised; a null kernel has the default) fails the launch, as on a GPU.
void launch(dim3 grid, dim3 block, const std::function<void()>& body);
void launch(dim3 grid, dim3 block, size_t dynamic_shared_bytes, KernelKey kernel,
            const std::function<void()>& body);
// The running block's dynamic shared memory (extern __shared__ on a GPU); nullptr without any.
void* dynamic_shared();

// What the kernel sees of the running thread and its block.
const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();

// Barriers: every thread of the block / of the calling thread's warp must arrive; a block
// barrier also checks that they all wait at the same source line.
void sync_block(const char* file, int line);
void sync_warp();
// The calling thread's 64-bit exchange slot in its warp, and a lane's slot.
uint64_t& warp_slot(int lane);
int lane_id();
int warp_width();  // threads in the calling thread's warp (32 except a partial last warp)

// Fails the launch unless every lane of the warp takes part (the only kind the kernels use).
void check_full_mask(unsigned int mask);

// A shuffle: every lane publishes `value`, then reads the one of source(lane) (its own when
// the source is out of range, as CUDA does).
template <typename T, typename Source>
T shuffle(unsigned int mask, T value, Source source) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffled values are at most 64 bits");
  check_full_mask(mask);
  const int lane = lane_id();
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  warp_slot(lane) = bits;
  sync_warp();
  const int from = source(lane);
  const uint64_t got = (from >= 0 && from < warp_width()) ? warp_slot(from) : bits;
  sync_warp();  // nobody overwrites a slot before every lane has read
  T out;
  std::memcpy(&out, &got, sizeof(T));
  return out;
}

template <typename T>
struct identity {
  using type = T;
};

}  // namespace latro_emu

#define threadIdx (::latro_emu::thread_idx())
#define blockIdx (::latro_emu::block_idx())
#define blockDim (::latro_emu::block_dim())
#define gridDim (::latro_emu::grid_dim())

// With its source line: every thread must reach the same __syncthreads (addresses would not
// do, the compiler may duplicate a barrier's call).
#define __syncthreads() ::latro_emu::sync_block(__FILE__, __LINE__)
inline void __syncwarp(unsigned int mask = 0xFFFFFFFFu) {
  ::latro_emu::check_full_mask(mask);
  ::latro_emu::sync_warp();
}

template <typename T>
T __shfl_xor_sync(unsigned int mask, T value, int lane_mask, int width = 32) {
  return ::latro_emu::shuffle(mask, value, [&](int lane) {
    const int target = lane ^ lane_mask;
    return (target / width == lane / width) ? target : lane;
  });
}
template <typename T>
T __shfl_up_sync(unsigned int mask, T value, unsigned int delta, int width = 32) {
  return ::latro_emu::shuffle(mask, value, [&](int lane) {
    const int target = lane - static_cast<int>(delta);
    return (target >= 0 && target / width == lane / width) ? target : lane;
  });
}
template <typename T>
T __shfl_down_sync(unsigned int mask, T value, unsigned int delta, int width = 32) {
  return ::latro_emu::shuffle(mask, value, [&](int lane) {
    const int target = lane + static_cast<int>(delta);
    return (target / width == lane / width) ? target : lane;
  });
}
template <typename T>
T __shfl_sync(unsigned int mask, T value, int source, int width = 32) {
  return ::latro_emu::shuffle(mask, value,
                              [&](int lane) { return (lane / width) * width + source % width; });
}

// Bit `lane` set where that lane's predicate is true; every lane gets the same word.
inline unsigned int __ballot_sync(unsigned int mask, int predicate) {
  ::latro_emu::check_full_mask(mask);
  ::latro_emu::warp_slot(::latro_emu::lane_id()) = predicate != 0 ? 1u : 0u;
  ::latro_emu::sync_warp();
  unsigned int bits = 0;
  for (int lane = 0; lane < ::latro_emu::warp_width(); ++lane) {
    if (::latro_emu::warp_slot(lane) != 0) bits |= 1u << lane;
  }
  ::latro_emu::sync_warp();  // nobody overwrites a slot before every lane has read
  return bits;
}
// The 1-based position of the lowest set bit, 0 for none (as the device's __ffs).
inline int __ffs(int x) { return __builtin_ffs(x); }

// ---------------------------------------------------------------- atomics
// Threads switch only at barriers, so a read-modify-write is atomic by construction.
template <typename T>
T atomicAdd(T* address, typename latro_emu::identity<T>::type value) {
  const T old = *address;
  *address = old + value;
  return old;
}
template <typename T>
T atomicMax(T* address, typename latro_emu::identity<T>::type value) {
  const T old = *address;
  if (value > old) *address = value;
  return old;
}
template <typename T>
T atomicMin(T* address, typename latro_emu::identity<T>::type value) {
  const T old = *address;
  if (value < old) *address = value;
  return old;
}

// ---------------------------------------------------------------- bit casts and conversions
struct __half {
  unsigned short bits;
};
struct __nv_bfloat16 {
  unsigned short bits;
};

inline float __uint_as_float(unsigned int bits) { return ::latro::bits_to_float(bits); }
inline unsigned int __float_as_uint(float value) { return ::latro::float_to_bits(value); }
inline __half __ushort_as_half(unsigned short bits) { return __half{bits}; }
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.bits; }
inline float __half2float(__half h) { return ::latro::to_float(::latro::float16{h.bits}); }
inline __half __float2half_rn(float value) { return __half{::latro::to_float16(value).bits}; }
inline __nv_bfloat16 __float2bfloat16_rn(float value) {
  return __nv_bfloat16{::latro::to_bfloat16(value).bits};
}
// Round to nearest even; NaN gives 2^63 and negative values 0, as on the device.
inline unsigned long long __float2ull_rn(float value) {
  if (value != value) return 0x8000000000000000ull;
  if (value <= 0.0f) return 0;
  if (value >= 18446744073709551616.0f) return ~0ull;
  return static_cast<unsigned long long>(std::nearbyint(static_cast<double>(value)));
}

// The fiber scheduler behind latro_cuda_emulator.h: one ucontext fiber per CUDA thread of the
// running block, switched only at barriers (__syncthreads, warp shuffles, __syncwarp).
#include "latro_cuda_emulator.h"

#include <dlfcn.h>
#include <sys/mman.h>
#include <unistd.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <map>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define LATRO_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define LATRO_EMU_ASAN 1
#endif
#endif
#if defined(LATRO_EMU_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

namespace {
std::string g_last_error;
cudaError_t g_pending = cudaSuccess;
}  // namespace

cudaError_t cudaGetLastError() {
  const cudaError_t error = g_pending;
  g_pending = cudaSuccess;
  return error;
}

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorLaunchFailure: return g_last_error.c_str();
  }
  return "unknown error";
}

// ---------------------------------------------------------------- device and kernel attributes
namespace {
constexpr int kSharedPerSm = 228 * 1024;
constexpr int kSharedPerBlockOptin = 227 * 1024;
constexpr int kReservedPerBlock = 1024;
constexpr int kDefaultDynamicShared = 48 * 1024;
// Kernels whose attributes were set; the others have the defaults.
std::map<latro_emu::KernelKey, cudaFuncAttributes> g_kernel_attributes;

cudaFuncAttributes attributes_of(latro_emu::KernelKey kernel) {
  const auto found = g_kernel_attributes.find(kernel);
  if (found != g_kernel_attributes.end()) return found->second;
  cudaFuncAttributes defaults;
  defaults.maxDynamicSharedSizeBytes = kDefaultDynamicShared;
  return defaults;
}
}  // namespace

cudaError_t cudaGetDevice(int* device) {
  if (device == nullptr) return cudaErrorInvalidValue;
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device) {
  if (value == nullptr || device != 0) return cudaErrorInvalidValue;
  switch (attribute) {
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = kSharedPerSm; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = kSharedPerBlockOptin; return cudaSuccess;
    case cudaDevAttrReservedSharedMemoryPerBlock: *value = kReservedPerBlock; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

namespace latro_emu {

cudaError_t func_get_attributes(cudaFuncAttributes* attributes, KernelKey kernel) {
  if (attributes == nullptr || kernel == nullptr) return cudaErrorInvalidValue;
  *attributes = attributes_of(kernel);
  return cudaSuccess;
}

cudaError_t func_set_attribute(KernelKey kernel, cudaFuncAttribute attribute, int value) {
  if (kernel == nullptr) return cudaErrorInvalidValue;
  cudaFuncAttributes attributes = attributes_of(kernel);
  switch (attribute) {
    case cudaFuncAttributeMaxDynamicSharedMemorySize:
      if (value < 0 ||
          value > kSharedPerBlockOptin - static_cast<int>(attributes.sharedSizeBytes)) {
        return cudaErrorInvalidValue;
      }
      attributes.maxDynamicSharedSizeBytes = value;
      break;
    case cudaFuncAttributePreferredSharedMemoryCarveout:
      if (value < -1 || value > 100) return cudaErrorInvalidValue;
      attributes.preferredShmemCarveout = value;
      break;
    default:
      return cudaErrorInvalidValue;
  }
  g_kernel_attributes[kernel] = attributes;
  return cudaSuccess;
}

}  // namespace latro_emu

// ---------------------------------------------------------------- switching stacks
// On x86-64 a switch saves the callee-saved registers and the floating-point control words on
// the old stack and pops them from the new one: a few nanoseconds. Elsewhere ucontext, whose
// swapcontext also saves and restores the signal mask (a system call per switch).
#if defined(__x86_64__)
extern "C" void latro_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .globl latro_emu_switch
  .type latro_emu_switch, @function
latro_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size latro_emu_switch, .-latro_emu_switch
)");

struct Context {
  void* sp = nullptr;
};

// A fresh stack whose first switch "returns" into entry(), aligned as after a call.
inline void make_context(Context& context, char* base, size_t size, void (*entry)()) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(base) + size) & ~uintptr_t{15};
  auto* slots = reinterpret_cast<uint64_t*>(top);
  *--slots = 0;  // entry's return address: none (it never returns)
  *--slots = reinterpret_cast<uint64_t>(entry);
  for (int i = 0; i < 6; ++i) *--slots = 0;  // rbp rbx r12 r13 r14 r15
  uint32_t mxcsr = 0;
  uint16_t fpucw = 0;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  *--slots = static_cast<uint64_t>(mxcsr) | (static_cast<uint64_t>(fpucw) << 32);
  context.sp = slots;
}
inline void switch_context(Context& from, Context& to) { latro_emu_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};
inline void make_context(Context& context, char* base, size_t size, void (*entry)()) {
  getcontext(&context.uc);
  context.uc.uc_stack.ss_sp = base;
  context.uc.uc_stack.ss_size = size;
  context.uc.uc_link = nullptr;
  makecontext(&context.uc, entry, 0);
}
inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

namespace latro_emu {
namespace {

constexpr size_t kStackBytes = size_t{256} << 10;  // per thread; kernels keep small frames
constexpr int kMaxThreads = 1024;

enum class State { Runnable, AtBlockBarrier, AtWarpBarrier, Done };

// A thread's stack: mapped once and reused by every launch, with an inaccessible page below it
// so an overflow faults instead of corrupting a neighbour.
struct Stack {
  char* base = nullptr;  // lowest usable byte
  size_t size = 0;
};

Stack new_stack() {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  void* mapping = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (mapping == MAP_FAILED) throw std::runtime_error("cuda emulator: cannot map a thread stack");
  mprotect(mapping, page, PROT_NONE);
  return Stack{static_cast<char*>(mapping) + page, kStackBytes};
}

struct Fiber {
  Context context;
  Stack stack;
  uint3 thread;
  int warp = 0;
  State state = State::Done;
  const void* waiting_at = nullptr;  // the code address of the barrier it waits at
  const char* wait_file = nullptr;   // and its source line (__syncthreads)
  int wait_line = 0;
  long long block_barriers = 0;      // __syncthreads passed in this launch's block
#if defined(LATRO_EMU_ASAN)
  void* fake_stack = nullptr;
#endif
};

struct BlockRun {
  const std::function<void()>* body = nullptr;
  dim3 grid, block;
  uint3 block_index{0, 0, 0};
  std::vector<Fiber> fibers;  // grows to the largest block seen; stacks are kept
  int threads = 0;
  int current = -1;
  Context scheduler;
  int live = 0;
  int block_arrived = 0;
  std::vector<int> warp_live, warp_arrived, warp_size;
  std::vector<uint64_t> slots;
  bool failed = false;
  std::string error;
#if defined(LATRO_EMU_ASAN)
  void* scheduler_fake_stack = nullptr;
  const void* scheduler_bottom = nullptr;
  size_t scheduler_size = 0;
#endif
};

BlockRun g_run;
bool g_running = false;
Schedule g_schedule = Schedule::Forward;
// The running block's dynamic shared memory (launch's dynamic_shared_bytes).
std::unique_ptr<unsigned char[]> g_dynamic_shared;
uint32_t g_seed = 0;

Fiber& current_fiber() { return g_run.fibers[static_cast<size_t>(g_run.current)]; }

void fail(const std::string& message) {
  if (!g_run.failed) {
    g_run.failed = true;
    g_run.error = message;
  }
}

// Fiber -> scheduler. Returns when the scheduler resumes this fiber.
void switch_to_scheduler() {
  Fiber& self = current_fiber();
#if defined(LATRO_EMU_ASAN)
  __sanitizer_start_switch_fiber(&self.fake_stack, g_run.scheduler_bottom, g_run.scheduler_size);
#endif
  switch_context(self.context, g_run.scheduler);
#if defined(LATRO_EMU_ASAN)
  __sanitizer_finish_switch_fiber(self.fake_stack, nullptr, nullptr);
#endif
}

// The return addresses of a suspended fiber's frames, innermost first, by its frame-pointer
// chain (the emulated kernels are built with -fno-omit-frame-pointer): what a deadlock report
// prints so addr2line can say which barrier each group of threads waits at, and from where.
__attribute__((noinline)) std::vector<const void*> suspended_backtrace(const Fiber& f) {
  std::vector<const void*> frames;
#if defined(__x86_64__)
  const uintptr_t low = reinterpret_cast<uintptr_t>(f.stack.base);
  const uintptr_t high = low + f.stack.size;
  uintptr_t frame;
  if (&f == &current_fiber()) {  // running, not suspended: its own frames
    frame = reinterpret_cast<uintptr_t>(__builtin_frame_address(0));
  } else {
    const auto* saved = static_cast<const uint64_t*>(f.context.sp);  // see latro_emu_switch
    frame = static_cast<uintptr_t>(saved[6]);                        // the saved rbp
  }
  while (frames.size() < 12 && frame >= low && frame + 16 <= high) {
    const auto* slots = reinterpret_cast<const uint64_t*>(frame);
    frames.push_back(reinterpret_cast<const void*>(slots[1]));
    if (slots[0] <= frame) break;  // the chain only goes up the stack
    frame = static_cast<uintptr_t>(slots[0]);
  }
#else
  (void)f;
#endif
  return frames;
}

// "+0x1234" offsets into the executable, for `addr2line -Cfie <binary> <offsets>`.
std::string code_offsets(const std::vector<const void*>& addresses) {
  std::string out;
  for (const void* address : addresses) {
    Dl_info info{};
    const uintptr_t base =
        dladdr(address, &info) ? reinterpret_cast<uintptr_t>(info.dli_fbase) : 0;
    char text[32];
    std::snprintf(text, sizeof(text), "%s0x%zx", out.empty() ? "" : " ",
                  static_cast<size_t>(reinterpret_cast<uintptr_t>(address) - base));
    out += text;
  }
  return out;
}

// Releases the block barrier when every thread of the block is at it. Threads that exited
// never arrive: CUDA allows __syncthreads only where the whole block reaches it, so a kernel
// whose threads return early before a barrier deadlocks here (and is reported).
bool try_release_block() {
  if (g_run.block_arrived < g_run.threads) return false;
  // Every thread must be at the same __syncthreads: threads at different ones (a barrier in
  // code that diverged) would pass each other's barriers, which CUDA does not define.
  const Fiber& first = g_run.fibers[0];
  for (int i = 1; i < g_run.threads; ++i) {
    const Fiber& f = g_run.fibers[static_cast<size_t>(i)];
    if (f.wait_line != first.wait_line || std::strcmp(f.wait_file, first.wait_file) != 0) {
      auto describe = [](const Fiber& t) {
        return std::string(t.wait_file) + ":" + std::to_string(t.wait_line) + " (called from " +
               code_offsets(suspended_backtrace(t)) + ")";
      };
      fail("divergent __syncthreads: thread 0 waits at " + describe(first) + ", thread " +
           std::to_string(i) + " at " + describe(f) +
           " (addr2line -Cfie <test binary> <addresses>)");
      return false;
    }
  }
  for (int i = 0; i < g_run.threads; ++i) {
    Fiber& f = g_run.fibers[static_cast<size_t>(i)];
    if (f.state == State::AtBlockBarrier) {
      f.state = State::Runnable;
      ++f.block_barriers;
    }
  }
  g_run.block_arrived = 0;
  return true;
}

bool try_release_warp(int warp) {
  const size_t w = static_cast<size_t>(warp);
  if (g_run.warp_arrived[w] < g_run.warp_size[w]) return false;
  const int first = warp * 32, last = std::min(first + 32, g_run.threads);
  for (int i = first; i < last; ++i) {
    if (g_run.fibers[static_cast<size_t>(i)].state == State::AtWarpBarrier) {
      g_run.fibers[static_cast<size_t>(i)].state = State::Runnable;
    }
  }
  g_run.warp_arrived[w] = 0;
  return true;
}

void fiber_main() {
#if defined(LATRO_EMU_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &g_run.scheduler_bottom, &g_run.scheduler_size);
#endif
  Fiber& self = current_fiber();
  try {
    (*g_run.body)();
  } catch (const std::exception& error) {
    fail(std::string("thread threw: ") + error.what());
  } catch (...) {
    fail("thread threw a non-standard exception");
  }
  self.state = State::Done;
  --g_run.live;
  --g_run.warp_live[static_cast<size_t>(self.warp)];
#if defined(LATRO_EMU_ASAN)
  __sanitizer_start_switch_fiber(nullptr, g_run.scheduler_bottom, g_run.scheduler_size);
#endif
  switch_context(self.context, g_run.scheduler);  // for good: a finished fiber never resumes
  std::abort();
}

void run_block() {
  const int n = g_run.threads;
  const int warps = (n + 31) / 32;
  g_run.warp_live.assign(static_cast<size_t>(warps), 0);
  g_run.warp_arrived.assign(static_cast<size_t>(warps), 0);
  g_run.warp_size.assign(static_cast<size_t>(warps), 0);
  g_run.slots.assign(static_cast<size_t>(warps) * 32, 0);
  g_run.live = n;
  g_run.block_arrived = 0;
  for (int i = 0; i < n; ++i) {
    Fiber& f = g_run.fibers[static_cast<size_t>(i)];
    const unsigned int bx = g_run.block.x, by = g_run.block.y;
    f.thread = uint3{static_cast<unsigned int>(i) % bx, (static_cast<unsigned int>(i) / bx) % by,
                     static_cast<unsigned int>(i) / (bx * by)};
    f.warp = i / 32;
    f.state = State::Runnable;
    f.block_barriers = 0;
    ++g_run.warp_live[static_cast<size_t>(f.warp)];
    ++g_run.warp_size[static_cast<size_t>(f.warp)];
#if defined(LATRO_EMU_ASAN)
    // The last launch's frames on this stack never returned (a fiber ends by switching away),
    // so their redzones are still poisoned.
    __asan_unpoison_memory_region(f.stack.base, f.stack.size);
#endif
    make_context(f.context, f.stack.base, f.stack.size, fiber_main);
  }
  std::vector<int> order(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) order[static_cast<size_t>(i)] = i;
  if (g_schedule == Schedule::Reverse) std::reverse(order.begin(), order.end());
  std::mt19937 rng(g_seed);
  while (g_run.live > 0 && !g_run.failed) {
    if (g_schedule == Schedule::Shuffled) std::shuffle(order.begin(), order.end(), rng);
    bool progressed = false;
    for (int i : order) {
      Fiber& f = g_run.fibers[static_cast<size_t>(i)];
      if (f.state != State::Runnable) continue;
      g_run.current = i;
#if defined(LATRO_EMU_ASAN)
      __sanitizer_start_switch_fiber(&g_run.scheduler_fake_stack, f.stack.base, f.stack.size);
#endif
      switch_context(g_run.scheduler, f.context);
#if defined(LATRO_EMU_ASAN)
      __sanitizer_finish_switch_fiber(g_run.scheduler_fake_stack, nullptr, nullptr);
#endif
      progressed = true;
      if (g_run.failed) break;
    }
    if (!progressed && !g_run.failed) {
      int at_block = 0, at_warp = 0;
      // Where they wait and after how many __syncthreads, with the call chain of one of them.
      struct Site {
        const void* address;
        long long passed;
        int count;
        int example;
      };
      std::vector<Site> sites;
      for (int i = 0; i < n; ++i) {
        const Fiber& f = g_run.fibers[static_cast<size_t>(i)];
        at_block += f.state == State::AtBlockBarrier;
        at_warp += f.state == State::AtWarpBarrier;
        auto site = std::find_if(sites.begin(), sites.end(), [&](const Site& s) {
          return s.address == f.waiting_at && s.passed == f.block_barriers;
        });
        if (site == sites.end()) {
          sites.push_back(Site{f.waiting_at, f.block_barriers, 1, i});
        } else {
          ++site->count;
        }
      }
      std::string where;
      for (const Site& site : sites) {
        where += (where.empty() ? "" : "; ") + std::to_string(site.count) + " threads (e.g. " +
                 std::to_string(site.example) + ") after " + std::to_string(site.passed) +
                 " __syncthreads, at " + code_offsets({site.address}) + " called from " +
                 code_offsets(suspended_backtrace(g_run.fibers[static_cast<size_t>(site.example)]));
      }
      fail("deadlock: " + std::to_string(at_block) + " threads wait at __syncthreads and " +
           std::to_string(at_warp) + " at a warp barrier, which the " +
           std::to_string(n - g_run.live) + " threads that returned never reach: " + where +
           " (addr2line -Cfie <test binary> <addresses>)");
    }
  }
}

}  // namespace

void set_schedule(Schedule schedule, uint32_t seed) {
  g_schedule = schedule;
  g_seed = seed;
}
Schedule schedule() { return g_schedule; }
const char* last_error_message() { return g_last_error.c_str(); }

void launch(dim3 grid, dim3 block, size_t dynamic_shared_bytes, KernelKey kernel,
            const std::function<void()>& body) {
  const long long threads = static_cast<long long>(block.x) * block.y * block.z;
  const long long blocks = static_cast<long long>(grid.x) * grid.y * grid.z;
  auto launch_failed = [](const std::string& message) {
    g_last_error = "cuda emulator: " + message;
    g_pending = cudaErrorLaunchFailure;
  };
  if (g_running) return launch_failed("a kernel launched another kernel");
  if (threads < 1 || threads > kMaxThreads || blocks < 1) {
    return launch_failed("invalid launch configuration: " + std::to_string(blocks) +
                         " blocks of " + std::to_string(threads) + " threads");
  }
  const int most_dynamic = attributes_of(kernel).maxDynamicSharedSizeBytes;
  if (dynamic_shared_bytes > static_cast<size_t>(most_dynamic)) {
    return launch_failed(std::to_string(dynamic_shared_bytes) +
                         " bytes of dynamic shared memory exceed the kernel's " +
                         std::to_string(most_dynamic) +
                         " (cudaFuncAttributeMaxDynamicSharedMemorySize)");
  }
  while (g_run.fibers.size() < static_cast<size_t>(threads)) {
    g_run.fibers.emplace_back();
    g_run.fibers.back().stack = new_stack();
  }
  // Exactly the bytes asked for (a fresh allocation: ASan reports a read past them; new[]
  // aligns it for any fundamental type, 16 bytes here).
  g_dynamic_shared.reset(dynamic_shared_bytes > 0 ? new unsigned char[dynamic_shared_bytes]
                                                  : nullptr);
  g_running = true;
  g_run.body = &body;
  g_run.grid = grid;
  g_run.block = block;
  g_run.threads = static_cast<int>(threads);
  g_run.failed = false;
  g_run.error.clear();
  for (long long b = 0; b < blocks && !g_run.failed; ++b) {
    const long long plane = static_cast<long long>(grid.x) * grid.y;
    g_run.block_index = uint3{static_cast<unsigned int>(b % grid.x),
                              static_cast<unsigned int>((b / grid.x) % grid.y),
                              static_cast<unsigned int>(b / plane)};
    // Each block finds its dynamic shared memory holding garbage, as on a GPU: a kernel that
    // reads a byte before writing it reads this pattern, not a tidy zero.
    std::fill_n(g_dynamic_shared.get(), dynamic_shared_bytes, static_cast<unsigned char>(0xA5));
    run_block();
  }
  g_running = false;
  g_dynamic_shared.reset();
  if (g_run.failed) {
    launch_failed("block (" + std::to_string(g_run.block_index.x) + ", " +
                  std::to_string(g_run.block_index.y) + ", " +
                  std::to_string(g_run.block_index.z) + "): " + g_run.error);
  }
}

void launch(dim3 grid, dim3 block, const std::function<void()>& body) {
  launch(grid, block, 0, nullptr, body);
}

void* dynamic_shared() { return g_dynamic_shared.get(); }

const uint3& thread_idx() { return current_fiber().thread; }
const uint3& block_idx() { return g_run.block_index; }
const dim3& block_dim() { return g_run.block; }
const dim3& grid_dim() { return g_run.grid; }

void sync_block(const char* file, int line) {
  Fiber& self = current_fiber();
  self.waiting_at = __builtin_return_address(0);
  self.wait_file = file;
  self.wait_line = line;
  ++g_run.block_arrived;
  self.state = State::AtBlockBarrier;
  try_release_block();
  // The last to arrive yields too, so each phase starts in the schedule's order.
  switch_to_scheduler();
}

void sync_warp() {
  Fiber& self = current_fiber();
  self.waiting_at = __builtin_return_address(0);
  self.wait_file = "a warp barrier";
  self.wait_line = 0;
  ++g_run.warp_arrived[static_cast<size_t>(self.warp)];
  self.state = State::AtWarpBarrier;
  try_release_warp(self.warp);
  switch_to_scheduler();
}

int lane_id() { return g_run.current % 32; }
int warp_width() { return g_run.warp_size[static_cast<size_t>(current_fiber().warp)]; }
uint64_t& warp_slot(int lane) {
  return g_run.slots[static_cast<size_t>(current_fiber().warp) * 32 + static_cast<size_t>(lane)];
}

void check_full_mask(unsigned int mask) {
  const int width = warp_width();
  const unsigned int full = width == 32 ? 0xFFFFFFFFu : ((1u << width) - 1u);
  if (mask != full) throw std::logic_error("cuda emulator: only full-warp masks are emulated");
  const Fiber& self = current_fiber();
  if (g_run.warp_live[static_cast<size_t>(self.warp)] != width) {
    throw std::logic_error("cuda emulator: a full-warp shuffle or __syncwarp with exited lanes");
  }
}

}  // namespace latro_emu

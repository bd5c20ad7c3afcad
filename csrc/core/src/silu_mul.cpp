// The gated MLP's silu(gate) * up on the CPU.
#include "decode_elements.h"
#include "cpu_common.h"
#include "latro/latro.h"

namespace latro {

void silu_mul(const SiluMulArgs& args, int64_t begin, int64_t end) {
  detail::check_silu_mul_args(args);
  if (end == -1) end = args.count;
  LATRO_CHECK(begin >= 0 && begin <= end && end <= args.count, "element range [", begin, ", ",
              end, ") is not inside [0, ", args.count, ")");
  LATRO_DISPATCH_DTYPE(args.dtype, T, [&] {
    const T* gate = static_cast<const T*>(args.gate);
    const T* up = static_cast<const T*>(args.up);
    T* out = static_cast<T*>(args.out);
    for (int64_t i = begin; i < end; ++i) {
      out[i] = detail::silu_times<T>(to_float(gate[i]), to_float(up[i]));
    }
  });
}

}  // namespace latro

"""One call of each sampling case that misses its target, for a profiler to look at.

``benchmarks/gpu_check.sh`` runs this under Nsight Compute (its ``profile`` stage, where ``ncu``
is installed) to say what the sampling kernels wait on (occupancy, issue-slot use, warp stall
reasons): timing alone could not tell instructions from latency (the plain kernel took as long
on peaked rows, where most tokens' noise is skipped, as on flat ones, and as long with more
loads in flight). Each case runs once with device seed and offset, checks off; the profiler
flushes the caches before each kernel, so no warm-up is needed. Without a CUDA device it runs
the same calls on the CPU (a check of the code only).

    ncu --kernel-name regex:sample --section SpeedOfLight ... python benchmarks/profile_sample.py
"""

from __future__ import annotations

import os

import torch

from latro_engine import ops


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows, vocab = (256, 128_256) if device.type == "cuda" else (4, 1_000)
    g = torch.Generator(device=device).manual_seed(1)
    flat = torch.randn(rows, vocab, device=device, generator=g) * 2.0
    peaked = torch.randn(rows, vocab, device=device, generator=g) * 8.0
    seeds = torch.arange(rows, device=device) * 7 + 1
    offset = torch.tensor(3, device=device)
    cases = [
        ("plain, float32, flat", flat, {}),
        ("plain, float32, peaked", peaked, {}),
        ("plain, bfloat16, 64 rows (a rollout's: sliced)", flat[:64].to(torch.bfloat16), {}),
        ("top-k 50, flat", flat, {"top_k": 50}),
        ("top-p 0.9, flat", flat, {"top_p": 0.9}),
        ("min-p 0.05, flat", flat, {"min_p": 0.05}),
    ]
    os.environ["LATRO_CUDA_CHECKS"] = "off"  # read at each call: no status read-back
    for name, x, options in cases:
        # ncu prints its reports after the process exits, in launch order; its "==PROF==
        # Profiling" lines interleave with these markers, which says which launch is which case.
        print(f"profile_sample: {name}", flush=True)
        ops.sample(x, seed=seeds[: x.shape[0]], offset=offset, **options)
        if device.type == "cuda":
            torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()

"""How often a warp of the plain CUDA sampler takes its rare branches: a model, no GPU needed.

The plain kernel (csrc/core/src/sample_kernels.cu, plain_pass) streams a row with 512 threads,
one 16-byte vector (four float32 tokens) per thread per iteration, each thread keeping its own
running max and Gumbel argmax (latro/gumbel.h). A warp executes a branch when any of its 32
lanes takes it, so what a row costs depends less on how many tokens need work than on how
many warp-steps have at least one lane that does. This script replays the kernel's skip tests
(the floor below which a token needs no Philox words, the bound below which it needs no
logarithms, the running max) on random rows and prints, per warp and token position:

- the share of warp-iterations in which some lane computes a Philox block (4 tokens),
- the share of token positions in which some lane computes a key's two logarithms,
- the share in which some lane finds a new max (and redoes its skip bounds),

for threads that start from nothing (LATRO_CUDA_SAMPLE_PLAIN_WARM=0) and for threads that
start from the block's max and best key after their first vector (the default). The uniform
draws are torch's, not the kernel's Philox stream: the rates are what matters, not the ids.

It models the loop as the H100 run of 2026-11-27 timed it (four tokens per call, a 32-bit word
per token, the max raised token by token). The kernel has since moved to eight tokens per call
(one coarse Philox block, philox.h), a max raised once per call and skip tests on the coarse
bits; the model keeps the older loop, whose rates are the ones the README quotes.

    python benchmarks/sample_branch_model.py [--vocab 128256] [--scales 2,8]
"""

from __future__ import annotations

import argparse
import math

import torch

THREADS, WARP = 512, 32
CEILING, SPAN = 16.65, 20.0  # gumbel.h's kGumbelCeiling and kGumbelSpan


def _less_slack(key: torch.Tensor) -> torch.Tensor:
    return key - (2.0**-10 + 2.0**-20 * key.abs())


def _bounds(key: torch.Tensor, max_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GumbelArgmax::max_changed: the skip factor and the floor for this bar and max."""
    slack = _less_slack(key)
    factor = torch.exp(max_ - slack) * (1 + 2.0**-10)
    floor = torch.maximum(slack - CEILING, max_ - SPAN)
    return torch.nan_to_num(factor, nan=math.inf), torch.nan_to_num(floor, nan=-math.inf)


def _any_per_warp(mask: torch.Tensor) -> float:
    return mask.view(-1, WARP).any(1).float().sum().item()


def replay(row: torch.Tensor, warm: bool, generator: torch.Generator) -> dict[str, float]:
    vectors = row.numel() // 4
    iterations = -(-vectors // THREADS)
    neg_inf = torch.full((THREADS,), -math.inf)
    max_, best, bar = neg_inf.clone(), neg_inf.clone(), neg_inf.clone()
    factor, floor = _bounds(bar, max_)
    philox = logs = new_max = 0.0
    for it in range(iterations):
        index = torch.arange(THREADS) + it * THREADS
        live = index < vectors
        tokens = torch.full((THREADS, 4), -math.inf)
        tokens[live] = row[(index[live, None] * 4 + torch.arange(4))]
        philox += _any_per_warp(((tokens >= floor[:, None]).any(1)) & live)
        for i in range(4):
            s = tokens[:, i]
            grew = (s > max_) & live
            new_max += _any_per_warp(grew)
            max_ = torch.where(grew, s, max_)
            factor, floor = _bounds(torch.maximum(best, bar), max_)
            p = torch.exp(s - max_)
            u = torch.rand(THREADS, generator=generator)
            computed = (s >= floor) & live & ~((1 - u) > p * factor)
            logs += _any_per_warp(computed)
            key = s - torch.log(-torch.log(u.clamp(2.0**-24, 1 - 2.0**-24)))
            best = torch.where(computed & (key > best), key, best)
        if it == 0 and warm:  # the block's max and best key, shared after the first vector
            max_ = torch.full_like(max_, max_.max().item())
            bar = torch.full_like(bar, best.max().item())
        factor, floor = _bounds(torch.maximum(best, bar), max_)
    warp_steps = iterations * THREADS // WARP
    return {
        "Philox block": philox / warp_steps,
        "logarithms": logs / (4 * warp_steps),
        "new max": new_max / (4 * warp_steps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=128_256)
    parser.add_argument("--scales", default="2,8", help="logits are randn x scale (bench_gpu's)")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    print("| logits | threads start | warp-iterations with a Philox block | positions with "
          "logarithms | positions with a new max |")
    print("|---|---|---:|---:|---:|")
    for scale in (float(x) for x in args.scales.split(",")):
        row = torch.randn(args.vocab, generator=g) * scale
        for warm in (False, True):
            rates = replay(row, warm, g)
            start = "from the block's max and key" if warm else "from nothing"
            print(f"| randn x {scale:g} | {start} | {rates['Philox block']:.2f} | "
                  f"{rates['logarithms']:.3f} | {rates['new max']:.3f} |")


if __name__ == "__main__":
    main()

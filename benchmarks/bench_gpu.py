"""GPU benchmarks of the CUDA backend: ours against the plain-torch way, measured in one run.

Each section prints one markdown table (ours, the torch way, the floor, the ratios the issue
"The CUDA backend and GPU speed" sets as targets), and ``--json PATH`` writes every number:

* ``scorer``: ``ops.linear_token_logprobs`` on bfloat16 ``hidden [N, D]`` and ``weight [V, D]``
  (N=16,384, D=4,096, V=128,256), forward and forward + backward, against the bare LM-head
  matmul (the floor; three matmuls with the backward) and ``log_softmax(logits.float())`` +
  ``gather``, with the peak memory each needs beyond its inputs (and outputs and gradients).
* ``sample``: ``ops.sample`` on float32 ``[256, 128,256]`` logits (``randn * 2``) against
  ``torch.multinomial`` on the softmax, the sort-based top-p of Hugging Face's warpers, and one
  read of the logits (``amax``) as the floor. Ours runs with device seed and offset tensors and
  ``LATRO_CUDA_CHECKS=off`` (no host synchronization, as in a decode loop); one row shows the
  default, which reads the error status back after each call.
* ``attention``: ``ops.decode_attention`` (one decode step's rotary embedding and attention in
  one layer, the rollout model's heads, a 640-slot bf16 cache filled to several lengths) against
  the plain torch rotary and attention over the whole cache (what the static decoder did before)
  and the rotary plus torch's ``scaled_dot_product_attention``, each replayed from a CUDA graph of 16 calls; the floor reads
  the filled keys and values once.
* ``stop``: ``ops.stop_positions_step`` (one decode step's stop detection, 48 rows of 628
  tokens, replayed from a CUDA graph) with 20 stop sequences and with the ``latro`` section's
  855 single tokens, against the pure-torch form in ``latro_engine.reference``.
* ``rollout``: decoding with a random 1.5B-parameter Llama-shaped model (hidden 2048, 16 layers,
  32 heads, 8 KV heads, vocabulary 128,256, bfloat16), batch 64, 128-token prompts, 256 new
  tokens: Hugging Face ``generate``, a static KV cache with the decode step compiled by
  ``torch.compile(mode="reduce-overhead")`` (CUDA graphs), and ours
  (``latro_engine.rollout.sample_rationales``). Per-step time = (time for 256 tokens - time for
  1 token) / 255, so the prefill is not counted.
* ``latro``: one whole LaTRO step (K=16, 3 prompts, L=500, 128-token prompts, same model, in
  bfloat16 and in float32 with bfloat16 autocast, AdamW, micro-batches of 4) done the reference
  implementation's way (:func:`reference_pattern_step`, after /work/shared/LATRO.md) and ours
  (:func:`ours_step`, the engine's rollout, scoring and objective as ``LatroTrainer`` calls
  them), with rationales that never stop (a random model) and with rationales that stop at a
  realistic length (a stop set of V/150 single tokens: about 150 tokens on average).

Kernel and op times are CUDA-event medians after warm-up. The ``sample`` section times every
implementation with :func:`queued_ms` (calls queued behind a spinning kernel, so the host's
launch costs, tens of microseconds per eager call, are not counted; its main table gives ours
timed eagerly too); attention and stop detection replay CUDA graphs. A rollout or a LaTRO step is timed
once, after a whole warm-up run of the same shape, between device synchronizations. Without
a CUDA device the script says so and exits 0; ``--cpu-smoke`` runs every section at toy sizes
on the CPU to check the code paths (its numbers mean nothing). Run on a GPU machine through
``benchmarks/gpu_check.sh``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

RESULTS: dict[str, list[dict[str, Any]]] = {}
SMOKE = False  # --cpu-smoke: every code path once, toy sizes, numbers meaningless
LATRO_WEIGHTS = ("bfloat16", "float32")  # --latro-weights: the LaTRO step's settings to run


# ----------------------------------------------------------------------------- measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(
    fn: Callable[[], Any], device: torch.device, *, warmup: int = 2, repeat: int = 10
) -> float:
    """Median wall time of fn in milliseconds (CUDA events on a GPU)."""
    if SMOKE:
        warmup, repeat = 0, 1
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def queued_ms(fn: Callable[[], Any], device: torch.device, *, calls: int = 16,
              repeat: int = 7) -> float:
    """GPU time of one call of fn, host launch costs excluded: ``calls`` calls back to back,
    queued behind a spinning kernel that outlasts the host's launching of them all, so the GPU
    runs them without waiting for the host; the median over ``repeat`` bursts. Plain time_ms
    off the GPU. fn must not synchronize: each burst checks that the host launched every call
    before the spin ended, doubling the spin until it does; past 2 s of spin fn is taken to
    synchronize (torch.multinomial did before torch 2.5) and timed eagerly, with a note.

    Why: an eager call timed alone between two events counts the time the idle GPU waits for
    the host to reach the launch (tens of microseconds of Python, dispatch and launch), which
    for a kernel of 0.1 ms is a large part of what the events show and varies with the host.
    A decode step's CUDA graph launches nothing from the host; sweeps that read a tuning
    variable at each call cannot be captured, which is why this queues eager calls instead."""
    if device.type != "cuda" or SMOKE:
        return time_ms(fn, device)
    for _ in range(2):
        fn()
    torch.cuda.synchronize(device)
    # The spin's rate: torch.cuda._sleep spins for a number of clock cycles.
    cycles = 1_000_000
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    ms_per_cycle = begin.elapsed_time(end) / cycles
    host_ms = 0.0
    for _ in range(2):  # the host's time to launch a burst (the second run: warm)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        host_ms = (time.perf_counter() - t0) * 1e3
        torch.cuda.synchronize(device)
    spin_ms = 2.0 * host_ms + 0.5
    times = []
    while len(times) < repeat:
        spun, start, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        t0 = time.perf_counter()
        spun.record()
        torch.cuda._sleep(int(spin_ms / ms_per_cycle))
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        launched_ms = (time.perf_counter() - t0) * 1e3
        end.synchronize()
        # The spin began on the GPU after the host queued it, so the host had launched every
        # call before the GPU reached the first one if it took less time than the spin did.
        if launched_ms < spun.elapsed_time(start):
            times.append(start.elapsed_time(end) / calls)
        elif spin_ms > 2e3:
            print(f"queued_ms: {getattr(fn, '__name__', 'a call')} did not get ahead of a 2 s "
                  "spin (it synchronizes): timed eagerly, host launch included")
            return time_ms(fn, device)
        else:
            spin_ms *= 2
    return statistics.median(times)


def graph_ms(fn: Callable[[], Any], device: torch.device, calls: int = 1) -> float:
    """Time of one call of fn replayed from a CUDA graph of ``calls`` calls, so host launch
    costs nothing (as inside the decode step's graph); plain time_ms off the GPU."""
    if device.type != "cuda":
        return time_ms(fn, device)
    fn()
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return time_ms(graph.replay, device, repeat=20) / calls


def peak_gib(
    fn: Callable[[], Any],
    device: torch.device,
    exclude_bytes: int = 0,
    reset: Callable[[], Any] | None = None,
) -> float | None:
    """Peak CUDA memory fn allocates beyond what was allocated before it (its result kept
    alive until the peak is read), minus ``exclude_bytes``; None off the GPU. ``reset`` runs
    first, before the baseline is read: it frees what an earlier call left (gradients), which
    fn would otherwise free inside the measurement, netting its own new allocations out."""
    if reset is not None:
        reset()
    if device.type != "cuda":
        fn()
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    result = fn()
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) - base - exclude_bytes
    del result
    return peak / 2**30


@contextlib.contextmanager
def environment(name: str, value: str | None):
    """Sets (or, for None, unsets) an environment variable for the block; the extension reads
    LATRO_CUDA_CHECKS and the LATRO_CUDA_SAMPLE_* and LATRO_CUDA_LOGPROBS_* tuning variables at
    each call, the scorer LATRO_SCORING_ATTENTION at each forward."""
    before = os.environ.pop(name, None)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)
        if before is not None:
            os.environ[name] = before


def cuda_checks(mode: str | None):
    """LATRO_CUDA_CHECKS for the block (None: unset, the default)."""
    return environment("LATRO_CUDA_CHECKS", mode)


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def table(section: str, title: str, rows: list[dict[str, Any]]) -> None:
    RESULTS.setdefault(section, []).extend(rows)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    print(f"\n### {title}\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" if c == columns[0] else "---:" for c in columns) + "|")
    for row in rows:
        print("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    sys.stdout.flush()


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


# ----------------------------------------------------------------------------- scorer
def bench_scorer(device: torch.device, small: bool) -> None:
    from latro_engine import ops, reference

    n, d, v = (512, 256, 32_000) if small else (16_384, 4_096, 128_256)
    dtype = torch.bfloat16
    if SMOKE:  # bfloat16 matmuls crawl on CPUs without bf16 units
        n, d, v, dtype = 64, 32, 1_000, torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, d, device=device, generator=g).to(dtype)
    weight = (torch.randn(v, d, device=device, generator=g) / d**0.5).to(dtype)
    targets = torch.randint(0, v, (n,), device=device, generator=g)
    upstream = torch.randn(n, device=device, generator=g)

    def torch_fwd():
        logits = hidden @ weight.t()
        return torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None])[:, 0]

    # The default (the op waits once per chunk to raise bad-target errors), without those
    # waits, and with chunks of 4096 rows instead of the default ~512 MiB of logits (2,092 rows
    # here).
    variants = [
        ("ours", None, None),
        ("ours, LATRO_CUDA_CHECKS=off", "off", None),
        ("ours, checks off, chunk_size=4096", "off", 4096),
    ]

    def ours_fwd(chunk=None):
        return ops.linear_token_logprobs(hidden, weight, targets, chunk_size=chunk)

    def compare(case, ours, plain, floor, target, exclude_bytes=0, variants=variants,
                reset=None):
        """One row per variant: ours (ours(chunk)) against plain torch and the floor."""
        t_torch = time_ms(plain, device)
        m_torch = peak_gib(plain, device, exclude_bytes, reset)
        for label, mode, chunk in variants:
            with cuda_checks(mode):
                t_ours = time_ms(lambda c=chunk: ours(c), device)
                m_ours = peak_gib(lambda c=chunk: ours(c), device, exclude_bytes, reset)
            rows.append(
                {
                    "case": f"{case}, {label}",
                    "ours ms": t_ours,
                    "torch ms": t_torch,
                    "floor ms": floor,
                    "ours / floor": _ratio(t_ours, floor),
                    "torch / ours": _ratio(t_torch, t_ours),
                    "ours extra GiB": m_ours,
                    "torch extra GiB": m_torch,
                    "target": target,
                }
            )

    diff = (ours_fwd() - torch_fwd()).abs().max().item()
    rows: list[dict[str, Any]] = []
    compare(
        "forward",
        ours_fwd,
        torch_fwd,
        time_ms(lambda: hidden @ weight.t(), device),
        "<= 1.15x floor, < 1 GiB",
    )

    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    # The gradients are outputs: excluded from "extra", and freed before each measurement (the
    # timing runs leave them allocated; counted in the baseline, then freed inside the call,
    # they would be subtracted twice).
    grad_bytes = h.numel() * h.element_size() + w.numel() * w.element_size()

    def clear_grads():
        h.grad = w.grad = None

    def ours_fb(chunk=None):
        h.grad = w.grad = None
        ops.linear_token_logprobs(h, w, targets, chunk_size=chunk).backward(upstream)
        return h.grad, w.grad

    def torch_fb():
        h.grad = w.grad = None
        logits = h @ w.t()
        torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None])[:, 0].backward(upstream)
        return h.grad, w.grad

    three_matmuls = _three_matmuls_ms(hidden, weight, device)
    compare("forward + backward", ours_fb, torch_fb, three_matmuls, "<= 1.2x floor, < 1 GiB",
            grad_bytes, reset=clear_grads)

    # The same gradient when the upstream weights are known before the forward (a loss linear in
    # the log-probabilities, LaTRO's once its advantages are): linear_weighted_logprob_sum takes
    # it in the forward, three matmuls per chunk of rows instead of four.
    def ours_weighted(chunk=None):
        h.grad = w.grad = None
        total, _ = ops.linear_weighted_logprob_sum(h, w, targets, upstream, chunk_size=chunk)
        total.backward()
        return h.grad, w.grad

    compare(
        "forward + backward, weights known (linear_weighted_logprob_sum)",
        ours_weighted,
        torch_fb,
        three_matmuls,
        "<= 1.2x floor, < 1 GiB",
        grad_bytes,
        # 2,048 rows: 0.5 GiB of bf16 logits per chunk, 8 chunks (8 additions into grad_weight)
        variants[:2] + [("ours, checks off, chunk_size=2048", "off", 2048)],
        reset=clear_grads,
    )
    table(
        "scorer",
        f"linear_token_logprobs, {str(dtype)[6:]}, N={n:,}, D={d:,}, V={v:,} (max |ours - torch| = {diff:.2e}; "
        "floor: the bare LM-head matmul, three matmuls with the backward)",
        rows,
    )

    # Where the forward's time beyond the bare matmul goes, per chunk size: the op's vocabulary
    # blocks' matmuls alone (into its buffer, one -inf column wider rounded up to 64 columns,
    # and into one exactly as wide as a block) against the whole op (checks off). The blocks
    # are csrc/torch/registration.cpp's resolve_block_columns: chunk rows x V logits over N
    # rows, rounded up to 128 columns.
    def blocked_matmuls(columns: int, width: int) -> Callable[[], None]:
        buffer = torch.empty(n, width, device=device, dtype=dtype)

        def run() -> None:
            for begin in range(0, v, columns):
                m = min(columns, v - begin)
                torch.mm(hidden, weight[begin : begin + m].t(), out=buffer[:, :m])

        return run

    bare = time_ms(lambda: hidden @ weight.t(), device)
    parts = []
    default_chunk = reference.default_chunk_size(n, v, hidden.element_size())
    # 1,046 rows: the default before 2026-11-27's run (2^27 logits).
    for chunk in sorted({max(1, (1 << 27) // v), default_chunk, 4096}):
        columns = min(v, _round_up(-(-chunk * v // n), 128))
        width = _round_up(columns + 1, 64)
        with cuda_checks("off"):
            t_op = time_ms(lambda c=chunk: ours_fwd(c), device)
        t_buffer = time_ms(blocked_matmuls(columns, width), device)
        t_exact = time_ms(blocked_matmuls(columns, columns), device)
        parts.append({
            "chunk rows": chunk,
            "block columns": columns,
            "op ms": t_op,
            "block matmuls, op's buffer ms": t_buffer,
            "block matmuls, exact width ms": t_exact,
            "bare matmul ms": bare,
            "op / bare": _ratio(t_op, bare),
            "op - block matmuls ms": t_op - t_buffer,
        })
    table("scorer_parts", "linear_token_logprobs forward: the vocabulary blocks' matmuls alone "
          "against the whole op (checks off)", parts)

    # The log-sum-exp kernel's threads per row (LATRO_CUDA_LOGPROBS_VECTORS: 16-byte vectors a
    # thread, 8 by default; 2 was the mapping before 2026-11-27's run), default chunks.
    sweep_row = {"chunk rows": default_chunk, "bare matmul ms": bare}
    for vectors in (2, 4, 8, 16, 32):
        with cuda_checks("off"), environment("LATRO_CUDA_LOGPROBS_VECTORS", str(vectors)):
            sweep_row[f"{vectors} a thread ms"] = time_ms(lambda: ours_fwd(None), device)
    table("scorer_vectors", "linear_token_logprobs forward (checks off), 16-byte vectors per "
          "thread of the log-sum-exp kernel (LATRO_CUDA_LOGPROBS_VECTORS)", [sweep_row])


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _three_matmuls_ms(hidden: torch.Tensor, weight: torch.Tensor, device: torch.device) -> float:
    """The backward's floor: the forward matmul and the two gradient matmuls."""
    grad_logits = hidden @ weight.t()  # any [N, V] matrix of the dtype will do
    return time_ms(
        lambda: (hidden @ weight.t(), grad_logits @ weight, grad_logits.t() @ hidden), device
    )


# ----------------------------------------------------------------------------- sample
def torch_top_p(logits: torch.Tensor, top_p: float, temperature: float = 1.0) -> torch.Tensor:
    """Hugging Face's TopPLogitsWarper + multinomial: sort, cumsum, mask, scatter back."""
    scores = logits / temperature
    sorted_logits, sorted_idx = torch.sort(scores, descending=False)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(1, sorted_idx, remove_sorted)
    scores = scores.masked_fill(remove, -float("inf"))
    return torch.multinomial(scores.softmax(-1), 1)[:, 0]


def bench_sample(device: torch.device, small: bool) -> None:
    from latro_engine import ops

    b, v = (64, 32_000) if small else (256, 128_256)
    if SMOKE:
        b, v = 8, 1_000
    g = torch.Generator(device=device).manual_seed(1)
    logits = torch.randn(b, v, device=device, generator=g) * 2.0
    seeds = torch.arange(b, device=device) * 7 + 1
    offset = torch.tensor(3, device=device)
    # GPU times (queued_ms: host launch costs excluded, for ours and torch's ways alike, as in a
    # decode step's CUDA graph); the main table also gives ours timed eagerly, launch included.
    floor = queued_ms(lambda: logits.amax(-1), device)
    t_multinomial = queued_ms(lambda: torch.multinomial(torch.softmax(logits, -1), 1), device)
    t_sort_top_p = queued_ms(lambda: torch_top_p(logits, 0.9), device, calls=4)
    cases = [
        ("temperature 1", dict(temperature=1.0)),
        ("top-k 50", dict(top_k=50)),
        ("top-p 0.9", dict(top_p=0.9)),
        ("min-p 0.05", dict(min_p=0.05)),
        ("top-k 50, top-p 0.9, min-p 0.05", dict(top_k=50, top_p=0.9, min_p=0.05)),
    ]

    def case_rows(x: torch.Tensor, **columns: Any) -> list[dict[str, Any]]:
        """Each case on logits ``x``, checks off, against the baselines timed above."""
        out = []
        with cuda_checks("off"):
            for name, options in cases:
                def call(o=options):
                    return ops.sample(x, seed=seeds, offset=offset, **o)

                t = queued_ms(call, device)
                out.append(
                    {"case": name, "ours ms": t,
                     "ours ms, eager (host launch included)": time_ms(call, device, repeat=50),
                     "multinomial ms": t_multinomial}
                    | columns
                    | {"read-once floor ms": floor, "multinomial / ours": _ratio(t_multinomial, t)}
                )
        return out

    rows = [
        row | {"target": "<= 0.1 ms, >= 5x multinomial"}
        for row in case_rows(logits, **{"sort top-p ms": t_sort_top_p})
    ]
    t = time_ms(
        lambda: ops.sample(logits, seed=seeds, offset=offset, top_k=50, top_p=0.9),
        device,
        repeat=50,
    )
    rows.append(
        {
            "case": "top-k 50, top-p 0.9, default checks (one sync per call)",
            "ours ms, eager (host launch included)": t,  # a sync per call: no queueing
            "multinomial ms": t_multinomial,
            "read-once floor ms": floor,
        }
    )
    table("sample", f"sample, float32 logits [{b}, {v:,}] (randn x 2)", rows)

    # The same on peaked rows (randn x 8), closer to a trained model's: the nucleus is a handful
    # of tokens, which pass 1 keeps in shared memory, so every filter reads the row once.
    peaked = torch.randn(b, v, device=device, generator=g) * 8.0
    table("sample_peaked", f"sample, float32 logits [{b}, {v:,}] (randn x 8)", case_rows(peaked))

    def sweep(variable: str, values: list[int], column: Callable[[int], str], inputs) -> list:
        """The filtered cases on each (label, logits) of ``inputs``, one column per value of the
        tuning variable (which the extension reads at each call), checks off."""
        out = []
        with cuda_checks("off"):
            for label, x in inputs:
                for name, options in cases[1:]:
                    row: dict[str, Any] = {"case": f"{name}{label}"}
                    for value in values:
                        with environment(variable, str(value)):
                            row[column(value)] = queued_ms(
                                lambda o=options, x=x: ops.sample(x, seed=seeds, offset=offset, **o),
                                device,
                            )
                    out.append(row)
        return out

    # The filtered kernel's grid: one block per row (the default) against fewer blocks looping
    # over rows, whose logits may then stay in L2 between the filter's passes.
    sms = 1
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    grids = sorted({0, sms // 4, sms // 2, (3 * sms) // 4, sms, 2 * sms} - {b})
    table(
        "sample_grid",
        f"sample with filters, blocks in flight ({sms} SMs; 'rows' = one block per row)",
        sweep("LATRO_CUDA_SAMPLE_GRID", grids, lambda g: f"grid {g or 'rows'} ms", [("", logits)]),
    )

    # The filtered kernel's L2 prefetch distance (iterations ahead; 0 = none, 2 = the default),
    # on flat and peaked rows: more of the row in flight without the registers the kernel lacks.
    table(
        "sample_prefetch",
        "sample with filters, L2 prefetch iterations ahead (0 = none, 2 = the default)",
        sweep("LATRO_CUDA_SAMPLE_PREFETCH", [0, 2, 4, 8, 16], lambda a: f"prefetch {a} ms",
              [(", flat", logits), (", peaked", peaked)]),
    )

    def plain_ms(x: torch.Tensor) -> float:
        """Plain sampling (temperature 1) of the rows of ``x``, under the tuning in effect."""
        return queued_ms(lambda: ops.sample(x, seed=seeds[: x.shape[0]], offset=offset), device)

    # Plain sampling with each row split over blocks (LATRO_CUDA_SAMPLE_SLICES; 0 = the plan's
    # choice, about two blocks per SM), for as many rows as the benchmark's and as a rollout's.
    slice_rows = []
    with cuda_checks("off"):
        for rows_n, dtype in ((b, torch.float32), (64, torch.float32), (64, torch.bfloat16),
                              (16, torch.float32)):
            x = logits[:rows_n].to(dtype)
            row: dict[str, Any] = {"rows, dtype": f"{x.shape[0]}, {str(dtype).removeprefix('torch.')}"}
            for slices in (1, 0, 2, 4, 8, 16):
                with environment("LATRO_CUDA_SAMPLE_SLICES", str(slices)):
                    row[f"slices {slices or 'planned'} ms"] = plain_ms(x)
            slice_rows.append(row)
    table("sample_slices", f"plain sampling (temperature 1), rows of {v:,} logits split over "
          f"blocks ({sms} SMs)", slice_rows)

    # The plain kernels' warm start (LATRO_CUDA_SAMPLE_PLAIN_WARM: 1, the default, shares the
    # block's max and best key after each thread's first vector; 0 starts every thread from
    # nothing) and L2 prefetch distance (LATRO_CUDA_SAMPLE_PLAIN_PREFETCH, iterations ahead;
    # 0 = none, the default), whole rows and the rollout's sliced rows.
    warm_rows = []
    with cuda_checks("off"):
        for label, x in (("float32, flat", logits), ("float32, peaked", peaked),
                         ("bfloat16, flat (a rollout's: sliced)", logits[:64].to(torch.bfloat16))):
            for warm in (1, 0):
                row = {"rows, dtype, logits": f"{x.shape[0]}, {label}", "warm start": warm}
                for ahead in (0, 2):
                    with environment("LATRO_CUDA_SAMPLE_PLAIN_PREFETCH", str(ahead)), \
                            environment("LATRO_CUDA_SAMPLE_PLAIN_WARM", str(warm)):
                        row[f"prefetch {ahead} ms"] = plain_ms(x)
                warm_rows.append(row)
    table("sample_plain_warm", "plain sampling (temperature 1) with and without the warm start "
          "(1 = the default), L2 prefetch iterations ahead (0 = the default)", warm_rows)


# ----------------------------------------------------------------------------- attention
def torch_rotary(x, cos, sin):
    """The models' rotary embedding of x [b, heads, d] (cos / sin [b, d], x's dtype)."""
    half = x.shape[-1] // 2
    return x * cos[:, None] + torch.cat((-x[..., half:], x[..., :half]), -1) * sin[:, None]


def rotate_and_write(q, cache_k, cache_v, new_k, new_v, slot, cos, sin):
    """The torch way's first steps: rotate q and the new key, write the new key and value into
    the caches at ``slot``; returns the rotated q."""
    cache_k.index_copy_(2, slot, torch_rotary(new_k, cos, sin)[:, :, None])
    cache_v.index_copy_(2, slot, new_v[:, :, None])
    return torch_rotary(q, cos, sin)


def torch_decode_attention(q, cache_k, cache_v, new_k, new_v, mask, slot, scale, cos, sin):
    """The static decoder's attention before ops.decode_attention (plain torch over the whole
    cache): rotate q and k, write the new key and value, q @ K^T, mask, float32 softmax, @ V."""
    b, h, d = q.shape
    kv = cache_k.shape[1]
    q = rotate_and_write(q, cache_k, cache_v, new_k, new_v, slot, cos, sin)
    scores = torch.matmul(q.view(b, kv, h // kv, d), cache_k.transpose(-1, -2)).float() * scale
    scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(torch.float32).min)
    probs = scores.softmax(-1).to(cache_v.dtype)
    return torch.matmul(probs, cache_v).view(b, h, d)


def sdpa_decode_attention(q, cache_k, cache_v, new_k, new_v, mask, slot, scale, cos, sin):
    """The same through torch's scaled_dot_product_attention (grouped heads, boolean mask)."""
    q = rotate_and_write(q, cache_k, cache_v, new_k, new_v, slot, cos, sin)
    out = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None],
        cache_k,
        cache_v,
        attn_mask=mask[:, None, None, :],
        scale=scale,
        enable_gqa=True,
    )
    return out[:, :, 0]


def attention_row(
    device: torch.device, batch: int, length: int, heads: int, kv: int, dim: int, slots: int
) -> dict[str, Any]:
    """One case of bench_attention: every implementation on the same bf16 cache."""
    from latro_engine import ops

    g = torch.Generator(device=device).manual_seed(batch + length)

    def randn(*shape):
        return torch.randn(*shape, device=device, generator=g).to(torch.bfloat16)

    scale = dim**-0.5
    q, new_k, new_v = randn(batch, heads, dim), randn(batch, kv, dim), randn(batch, kv, dim)
    cache_k, cache_v = randn(batch, kv, slots, dim), randn(batch, kv, slots, dim)
    mask = (torch.arange(slots, device=device)[None, :] < length).expand(batch, slots)
    mask = mask.contiguous()
    length_t = torch.tensor(length, device=device)
    angles = torch.arange(batch, device=device)[:, None] + torch.rand(dim, device=device)
    cos, sin = angles.cos(), angles.sin()  # float32 tables; the torch way uses them in bf16
    tables = (cos.to(torch.bfloat16), sin.to(torch.bfloat16))
    args = (q, cache_k, cache_v, new_k, new_v, mask, (length_t - 1).view(1), scale, *tables)
    ours = graph_ms(
        lambda: ops.decode_attention(
            q,
            cache_k,
            cache_v,
            length=length_t,
            new_k=new_k,
            new_v=new_v,
            slot_mask=mask,
            rotary=(cos, sin),
            scale=scale,
        ),
        device,
        calls=16,
    )
    plain = graph_ms(lambda: torch_decode_attention(*args), device, calls=16)
    try:
        sdpa = graph_ms(lambda: sdpa_decode_attention(*args), device, calls=16)
    except Exception as error:  # enable_gqa needs torch >= 2.5
        print(f"  SDPA failed: {type(error).__name__}: {error}")
        sdpa = None
    floor = graph_ms(
        lambda: (cache_k[:, :, :length].amax((2, 3)), cache_v[:, :, :length].amax((2, 3))),
        device,
        calls=16,
    )
    return {
        "rows x length": f"{batch} x {length}",
        "ours ms": ours,
        "torch (whole cache) ms": plain,
        "SDPA ms": sdpa,
        "read K, V once ms": floor,
        "torch / ours": _ratio(plain, ours),
        "SDPA / ours": _ratio(sdpa, ours),
    }


def bench_attention(device: torch.device, small: bool) -> None:
    """One decode step's attention in one layer with its rotary embedding (the rollout model's
    heads: 32 query heads over 8 KV heads of dim 64, bf16), in a KV cache of 640 slots (a 128-token prompt and 500-token
    rationales, the LaTRO step's shape) at several fill lengths; each implementation replayed
    from a CUDA graph of 16 calls (one per layer), as in the decode step."""
    heads, kv, dim, slots = 32, 8, 64, 640
    cases = [(64, 129), (64, 384), (64, 628), (48, 628), (8, 628)]
    if small:
        heads, kv, dim, slots, cases = 8, 2, 16, 96, [(4, 40), (2, 90)]
    rows = [attention_row(device, b, n, heads, kv, dim, slots) for b, n in cases]
    table(
        "attention",
        f"decode attention, one layer: {heads} heads over {kv} KV heads of dim {dim}, bf16, "
        f"{slots}-slot cache",
        rows,
    )


def bench_stop(device: torch.device, small: bool) -> None:
    """One decode step's stop detection (``ops.stop_positions_step``, replayed from a CUDA graph
    as in the decode step) for the LaTRO step's rows and cache length, with a stop set of the
    size a tokenizer's answer-template variants give and with the LaTRO section's V/150
    single-token set, against the pure-torch form (``latro_engine.reference``: a few ops per
    stop sequence)."""
    from latro_engine import ops, reference

    rows, length, vocab = (4, 40, 512) if small else (48, 628, 128_256)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(3, vocab, (rows, length), generator=g).to(device)
    positions = torch.full((rows,), length, dtype=torch.int64, device=device)
    step = torch.tensor(length - 1, device=device)
    templates = [torch.randint(3, vocab, (int(n),), generator=g).tolist() for n in [1, 2, 3, 4] * 5]
    sets = {
        "20 sequences of 1-4 tokens": templates,
        f"{vocab // 150} single tokens": [[t] for t in range(3, 3 + vocab // 150)],
    }
    out = []
    for label, sequences in sets.items():
        ours = functools.partial(ops.stop_positions_step, tokens, ops.StopSequences(sequences, device),
                                 step=step, positions=positions)
        plain = functools.partial(reference.stop_positions_step, tokens, sequences, step=step,
                                  positions=positions)
        ours_ms, plain_ms = graph_ms(ours, device, calls=16), time_ms(plain, device)
        out.append({"stop set": label, "ours us": ours_ms * 1e3, "torch us": plain_ms * 1e3,
                    "torch / ours": _ratio(plain_ms, ours_ms)})
    table("stop", f"stop detection for one decode step, {rows} rows of {length} tokens", out)


# ----------------------------------------------------------------------------- models
def llama(device: torch.device, small: bool, dtype: torch.dtype) -> torch.nn.Module:
    """A randomly initialized Llama-shaped causal LM: the issue's 1.5B shape, or a toy one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if small:
        shape = dict(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    else:
        shape = dict(
            vocab_size=128_256,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
        )
    config = LlamaConfig(
        **shape,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        rope_theta=500_000.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def random_prompts(n: int, length: int, vocab: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, length), generator=g).to(device)
    return ids, torch.ones_like(ids)


def _cache_kwarg(model: torch.nn.Module) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def hf_generate(model, ids, mask, new_tokens: int, **extra):
    """Full-length sampling with Hugging Face ``generate`` (``extra``: more of its options)."""
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=0,
        **extra,
    )


def static_compiled_decoder(model, batch: int, max_len: int, device: torch.device):
    """The best plain-torch loop: a static KV cache and the decode step (forward + softmax +
    multinomial) compiled with torch.compile(mode="reduce-overhead"), i.e. CUDA graphs."""
    from transformers import StaticCache

    cache_name = _cache_kwarg(model)
    cache = StaticCache(config=model.config, max_cache_len=max_len)

    def forward(tokens, positions):
        out = model(
            input_ids=tokens,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{cache_name: cache},
        )
        probs = torch.softmax(out.logits[:, -1].float(), -1)
        return torch.multinomial(probs, 1)

    step = torch.compile(forward, mode="reduce-overhead") if device.type == "cuda" else forward

    def run(ids, new_tokens: int):
        cache.reset()
        p = ids.shape[1]
        positions = torch.arange(p, device=device)[None].expand(batch, p)
        token = forward(ids, positions)  # the prefill, eager
        for i in range(new_tokens - 1):
            token = step(token, torch.full((batch, 1), p + i, device=device)).clone()
        return token

    return run


def ours_rollout(model, ids, mask, new_tokens: int, stops=(), k: int = 1, seed: int = 0):
    from latro_engine.rollout import sample_rationales

    return sample_rationales(
        model,
        ids,
        mask,
        k=k,
        max_new_tokens=new_tokens,
        stop_sequences=list(stops),
        pad_token_id=0,
        seed=seed,
        decoder="static",
    )


def bench_rollout(device: torch.device, small: bool) -> None:
    batch, prompt, new = (4, 8, 16) if small else (64, 128, 256)
    model = llama(device, small, torch.bfloat16)
    ids, mask = random_prompts(batch, prompt, model.config.vocab_size, device)

    def per_step(run: Callable[[int], Any]) -> float:
        # warm-up at both lengths, for every implementation alike: compilation, graph capture,
        # our decoders (kept per length), and the allocator's pool at the full length (which
        # generate's growing cache reaches only then)
        run(1)
        run(new)
        one = time_ms(lambda: run(1), device, warmup=0, repeat=1)
        full = time_ms(lambda: run(new), device, warmup=0, repeat=1)
        return (full - one) / (new - 1)

    results: dict[str, float | str] = {}
    runners = {  # ours first: a later baseline that runs out of time must not hide it
        "ours (sample_rationales)": lambda n: ours_rollout(model, ids, mask, n),
        "Hugging Face generate": lambda n: hf_generate(model, ids, mask, n),
        "static cache + torch.compile reduce-overhead": None,
    }
    for name, run in runners.items():
        start = time.perf_counter()
        try:
            with torch.no_grad():
                if run is None:
                    decoder = static_compiled_decoder(model, batch, prompt + new, device)
                    run = lambda n, decoder=decoder: decoder(ids, n)  # noqa: E731
                results[name] = per_step(run)
        except Exception as error:  # one failed baseline must not hide the others
            results[name] = f"failed: {type(error).__name__}: {error}"[:200]
        print(f"  {name}: {_fmt(results[name])} ms per step ({time.perf_counter() - start:.0f} s)")
        if "reduce-overhead" in name and device.type == "cuda":
            # Inductor says only in a silent log when it runs a step without CUDA graphs; a
            # baseline that fell back would be the weaker one, so its count is printed.
            from torch._dynamo.utils import counters

            skips = counters["inductor"].get("cudagraph_skips", 0)
            print(f"  {name}: CUDA graph skips {skips}" + (" (NOT graphed)" if skips else ""))
        if name.startswith("ours"):
            floor = linear_floor_ms(model, batch, device)
            print(f"  floor (the linear layers' matmuls alone): {floor:.3f} ms")
            try:
                with torch.no_grad():
                    profile_kernels(lambda: ours_rollout(model, ids, mask, 32),
                                    "one 32-token rollout (ours)", device, warm_up=True)
            except Exception as error:  # a diagnostic only
                print(f"profile failed: {type(error).__name__}: {error}")
    results["floor: the linear layers' matmuls alone (CUDA graph)"] = floor
    ours = results["ours (sample_rationales)"]
    rows = []
    for name, value in results.items():
        ms = value if isinstance(value, float) else None
        rows.append(
            {
                "implementation": name,
                "ms per step": ms if ms is not None else value,
                "this / ours": _ratio(ms, ours) if isinstance(ours, float) else None,
                "ours / this": _ratio(ours, ms) if isinstance(ours, float) else None,
            }
        )
    rows.append(
        {
            "implementation": "targets",
            "ms per step": "generate / ours >= 8; ours / compiled static loop <= 0.8",
        }
    )
    table(
        "rollout",
        f"rollout decoding, batch {batch}, {prompt}-token prompts, {new} new tokens, "
        f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, bf16",
        rows,
    )


def linear_floor_ms(model, batch: int, device: torch.device) -> float:
    """One decode step's matmuls alone: [batch, in] @ W^T for every linear layer (weights read
    once), replayed as one CUDA graph so launches cost nothing."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {
        m.in_features: torch.randn(batch, m.in_features, device=device, dtype=m.weight.dtype)
        for m in linears
    }

    def step():
        return [torch.nn.functional.linear(inputs[m.in_features], m.weight) for m in linears]

    with torch.no_grad():
        return graph_ms(step, device)


def profile_kernels(
    run: Callable[[], Any],
    label: str,
    device: torch.device,
    *,
    warm_up: bool = False,
    host_calls: bool = False,
) -> None:
    """Where ``run``'s time goes: its CUDA kernels by GPU time and, with ``host_calls``, the
    host calls by their own time (synchronizations and allocations show there), so a step
    slower than expected says why. ``warm_up``: run it once unprofiled first (builds, CUDA
    graph captures)."""
    if device.type != "cuda" or SMOKE:
        return
    from torch.profiler import ProfilerActivity, profile

    if warm_up:
        run()

    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if host_calls else [])
    with profile(activities=activities) as prof:
        run()
        torch.cuda.synchronize(device)
    averages = prof.key_averages()
    print(f"\n{label}: kernels by GPU time:\n")
    print(averages.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70))
    if host_calls:
        print(f"\n{label}: host calls by their own time:\n")
        print(averages.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=70))


# ----------------------------------------------------------------------------- LaTRO step
def _cut(
    rationales: torch.Tensor, stops: list[list[int]], pad: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rationales cut at the first stop sequence (matched by token ids), the rest padding."""
    from latro_engine import reference

    lengths = (
        reference.stop_positions(rationales, stops)
        if stops
        else torch.full((rationales.shape[0],), rationales.shape[1], device=rationales.device)
    )
    beyond = torch.arange(rationales.shape[1], device=rationales.device)[None] >= lengths[:, None]
    return rationales.masked_fill(beyond, pad), lengths


def _left_pad(
    parts: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenates (ids, mask) parts and moves every pad to the left, as the reference code."""
    ids = torch.cat([p[0] for p in parts], 1)
    mask = torch.cat([p[1] for p in parts], 1)
    order = torch.argsort(mask, dim=1, stable=True)  # zeros (pads) first, real tokens in order
    ids, mask = ids.gather(1, order), mask.gather(1, order)
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def _full_vocab_sums(model, ids, mask, positions, weight_mask) -> torch.Tensor:
    """Sum of log p(token) over the positions in weight_mask, from a float32 log_softmax over
    the whole vocabulary and sequence (the reference code's scoring, ``get_logprob_reward``:
    its forward keeps every layer's hidden states, and its transformers gave float32 logits,
    so only the float32 logits and their log_softmax are alive at once: the bf16 ones are
    dropped as soon as they are cast)."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                output_hidden_states=True)
    logits = out.logits.float()
    del out
    logp = torch.log_softmax(logits, -1)
    del logits
    token_logp = logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    return (token_logp * weight_mask[:, 1:]).sum(-1)


class PhaseStats:
    """Seconds and peak CUDA memory of each phase of a LaTRO step (rollout, scoring, training),
    so the table says where the time and the peak come from. Each phase synchronizes the device
    at its ends and resets the peak counters, so the step's peak is the largest phase peak; off
    the GPU only the seconds are recorded. Besides the tensors' peak (the targets' measure), the
    caching allocator's reserved peak: what it held from the device (the CUDA context aside)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}
        self.peaks: dict[str, float] = {}
        self.reserved: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        """A phase entered more than once (the reference pattern's rollout and scoring, once
        per rollout batch) adds its seconds and keeps its largest peak."""
        _sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        yield
        _sync(self.device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**30
            reserved = torch.cuda.max_memory_reserved(self.device) / 2**30
            self.peaks[name] = max(self.peaks.get(name, 0.0), peak)
            self.reserved[name] = max(self.reserved.get(name, 0.0), reserved)

    def step_peak(self) -> float | None:
        return max(self.peaks.values()) if self.peaks else None

    def step_reserved(self) -> float | None:
        return max(self.reserved.values()) if self.reserved else None

    def summary(self) -> str:
        return " / ".join(
            f"{name} {seconds:.2f} s" + (f", {self.peaks[name]:.1f} GiB" if name in self.peaks else "")
            for name, seconds in self.seconds.items()
        )


def _no_phases(name: str):
    return contextlib.nullcontext()


def reference_pattern_step(
    model,
    ref_model,
    optimizer,
    prompt_ids,
    prompt_mask,
    answer,
    *,
    k: int,
    max_len: int,
    stops: list[list[int]],
    kl_coef: float = 0.05,
    micro: int = 4,
    rollout_batch: int | None = None,
    seed: int = 0,
    amp: Callable[[], Any] = contextlib.nullcontext,
    phase: Callable[[str], Any] = _no_phases,
) -> float:
    """One LaTRO step the reference implementation's way (/work/shared/LATRO.md; its
    ``LatroTrainer.train`` and ``utils/trainer_utils.py``): per batch of ``rollout_batch`` rows
    (None: ``LATRO_REFERENCE_BATCH``), full-length sampling with ``generate`` keeping the
    scores, which its helper stacks into one tensor before they are dropped (so the rollout
    holds them twice), the rationales cut at stop strings afterwards, and three separate
    no-grad forwards over those rows with a float32 log_softmax over the whole vocabulary and
    sequence (policy on x+z, reference on x+z, policy on x+z+y); then leave-one-out advantages
    with the non-stop penalty 2 x the batch's mean reward, micro-batches of ``micro`` with two
    grad forwards each (x+z for log p(z|x), x+z+y for log p(y|x,z)) and one optimizer step.
    Forwards run under ``amp()``, backwards outside it (as the trainer does). Left out: the
    reference code's ~150 ``gc.collect()`` / ``torch.cuda.empty_cache()`` calls a step (the
    issue's 7.75 s leaves them out too; they would only slow the baseline). ``seed`` seeds
    the sampling. Returns the rationales' mean length in tokens."""
    device = prompt_ids.device
    ids = prompt_ids.repeat_interleave(k, 0)
    mask = prompt_mask.repeat_interleave(k, 0)
    n = ids.shape[0]
    batch = rollout_batch or LATRO_REFERENCE_BATCH
    y = answer.to(device)[None].expand(n, -1)
    y_mask = torch.ones_like(y)
    zero = lambda t: torch.zeros_like(t)  # noqa: E731
    torch.manual_seed(seed)
    parts: dict[str, list[torch.Tensor]] = {"z": [], "ref": [], "y": [], "length": []}
    inputs: dict[str, list[torch.Tensor]] = {"xz": [], "xz_w": [], "xzy": [], "xzy_w": []}
    for b in range(0, n, batch):
        s = slice(b, b + batch)
        model.eval()
        with phase("rollout"), torch.no_grad(), amp():
            out = hf_generate(model, ids[s], mask[s], max_len, output_scores=True,
                              return_dict_in_generate=True)
            scores = torch.stack(out.scores, 1)  # the helper's copy, then both are dropped
            sequences = out.sequences
            del out, scores
        model.train()
        rationale, lengths = _cut(sequences[:, ids.shape[1] :], stops, 0)
        z_mask = (torch.arange(max_len, device=device)[None] < lengths[:, None]).long()
        # [x, z] and [x, z, y] with pads on the left; which tokens to score, aligned the same way.
        xz = _left_pad([(ids[s], mask[s]), (rationale, z_mask)])
        xz_w = _left_pad([(zero(ids[s]), mask[s]), (z_mask, z_mask)])[0]
        xzy = _left_pad([(ids[s], mask[s]), (rationale, z_mask), (y[s], y_mask[s])])
        xzy_w = _left_pad(
            [(zero(ids[s]), mask[s]), (zero(rationale), z_mask), (y_mask[s], y_mask[s])]
        )[0]
        with phase("scoring"), torch.no_grad(), amp():
            parts["z"].append(_full_vocab_sums(model, *xz, xz_w))
            parts["ref"].append(_full_vocab_sums(ref_model, *xz, xz_w))
            parts["y"].append(_full_vocab_sums(model, *xzy, xzy_w))
        parts["length"].append(lengths)
        for key, value in (("xz", xz), ("xz_w", xz_w), ("xzy", xzy), ("xzy_w", xzy_w)):
            inputs[key].append(value)
    logp_z, ref_z, logp_y, lengths = (torch.cat(parts[key]) for key in ("z", "ref", "y", "length"))
    xz = tuple(torch.cat([t[i] for t in inputs["xz"]]) for i in range(3))
    xzy = tuple(torch.cat([t[i] for t in inputs["xzy"]]) for i in range(3))
    xz_w, xzy_w = torch.cat(inputs["xz_w"]), torch.cat(inputs["xzy_w"])
    finished = lengths < max_len
    # The penalty replaces the answer's log-prob (2 x its mean), then the KL term is added.
    reward = torch.where(finished, logp_y, 2.0 * logp_y.mean()) - kl_coef * (logp_z - ref_z)
    r = reward.view(-1, k)
    advantage = (r - (r.sum(-1, keepdim=True) - r) / (k - 1)).view(-1)
    with phase("training"):
        for b in range(0, n, micro):
            s = slice(b, b + micro)
            with amp():
                lz = _full_vocab_sums(model, xz[0][s], xz[1][s], xz[2][s], xz_w[s])
                ly = _full_vocab_sums(model, xzy[0][s], xzy[1][s], xzy[2][s], xzy_w[s])
                loss = -(advantage[s] * lz).mean() - ly.mean()
            (loss * (lz.shape[0] / n)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return lengths.float().mean().item()


def ours_step(
    model,
    ref_model,
    optimizer,
    prompt_ids,
    prompt_mask,
    answer,
    *,
    k: int,
    max_len: int,
    stops: list[list[int]],
    kl_coef: float = 0.05,
    micro: int | None = 4,
    seed: int = 0,
    amp: Callable[[], Any] = contextlib.nullcontext,
    phase: Callable[[str], Any] = _no_phases,
    checkpointing: bool = False,
    torch_attention: bool = False,
    micro_tokens: int = 0,
) -> float:
    """One LaTRO step with the engine: the rollout (stop detection and compaction), then the
    trainer's own two passes (``latro_engine.trainer.advantages_pass`` and ``gradient_pass``,
    what ``LatroTrainer.train_step`` runs) and the optimizer step. With micro-batches of 4,
    which do not hold whole groups, the rewards come from a no-grad scoring pass over
    [x, z, y] and a reference pass over [x, z] first, and each micro-batch's grad pass takes its
    gradient as it goes (the loss is then linear in the scores: ``linear_weighted_logprob_sum``);
    with micro-batches of whole groups (``micro`` a multiple of ``k``) each micro-batch scores
    its reference and gets its rewards from its own grad pass: two forwards per sequence
    instead of three. Forwards run under ``amp()``, backwards outside it, as in the trainer.
    ``checkpointing``: the grad passes keep only each decoder layer's input and recompute the
    rest in the backward (the trainer's ``gradient_checkpointing`` option), trading about a
    third more training compute for most of the activation memory. ``torch_attention``: the
    scoring and training forwards let torch pick their SDPA kernel (cuDNN on an H100) instead
    of ``scoring_attention``'s (``LATRO_SCORING_ATTENTION=default``). ``micro_tokens``: the
    trainer's ``micro_batch_tokens`` (micro-batches of up to ``micro`` rows and this many
    tokens). Returns the rationales' mean length in tokens."""
    from latro_engine.config import LatroConfig
    from latro_engine.distributed import Distributed
    from latro_engine.offload import prefetch
    from latro_engine.scoring import reference_logprobs, score_sequences
    from latro_engine.trainer import (
        advantages_pass,
        gradient_pass,
        no_grad_batch,
        set_activation_checkpointing,
    )

    if torch_attention:
        with environment("LATRO_SCORING_ATTENTION", "default"):
            return ours_step(model, ref_model, optimizer, prompt_ids, prompt_mask, answer, k=k,
                             max_len=max_len, stops=stops, kl_coef=kl_coef, micro=micro,
                             seed=seed, amp=amp, phase=phase, checkpointing=checkpointing,
                             micro_tokens=micro_tokens)
    model.eval()
    with phase("rollout"), amp():
        # As the trainer: a host-resident reference's upload overlaps the rollout (inside the
        # phase, whose timer starts after a device-wide synchronize).
        prefetch(ref_model, prompt_ids.device)
        rollout = ours_rollout(model, prompt_ids, prompt_mask, max_len, stops, k=k, seed=seed)
    model.train()
    micro = micro or k  # None: one whole group per micro-batch
    config = LatroConfig(k=k, micro_batch_size=micro, micro_batch_tokens=micro_tokens,
                         kl_coef=kl_coef, nonstop_penalty=-10.0, penalty_mode="constant",
                         sft_weight=1.0)
    answers = [answer.tolist()] * rollout.batch_size
    args = (rollout.prompt_ids, rollout.prompt_mask, rollout.rationale_ids, rollout.rationale_lengths)

    def score(rows, *, micro_batch_size=None, max_tokens=None, weights=None):
        with amp():
            return score_sequences(model, *(t[rows] for t in args), [answers[i] for i in rows.tolist()],
                                   micro_batch_size=micro_batch_size, max_tokens=max_tokens,
                                   loss_weights=weights)

    def reference(rows):
        with amp():
            return reference_logprobs(model, ref_model, *(t[rows] for t in args),
                                      **no_grad_batch(config)).rationale_logp

    dist = Distributed(config, prompt_ids.device)
    with phase("scoring"):
        advantages, _ = advantages_pass(rollout, config, score, reference, dist)
    if checkpointing:
        set_activation_checkpointing(model, True)
    try:
        with phase("training"):
            answer_lengths = [len(a) for a in answers]
            gradient_pass(rollout, advantages, config, score, reference, dist, answer_lengths)
            guarded_update(
                model, optimizer, dist, advantages,
                again=lambda: gradient_pass(rollout, advantages, config, score, reference, dist,
                                            answer_lengths),
            )
    finally:
        if checkpointing:
            set_activation_checkpointing(model, False)
    return rollout.rationale_lengths.float().mean().item()


def guarded_update(model, optimizer, dist, advantages, again: Callable[[], Any]) -> None:
    """The trainer's update (``LatroTrainer._apply_gradients``): clip to norm 1 and step, or,
    where the gradient norm is not finite, skip the update, so that the weights stay finite
    for the rows after this one, and raise with what the next run needs to find the cause: the
    parameters whose gradients are non-finite, whether the advantages were, and the backward
    op that made the first NaN (``again`` repeats the gradient pass under anomaly detection)."""
    from latro_engine.trainer import nonfinite_gradients

    params = [p for p in model.parameters() if p.requires_grad]
    norm = dist.clip_grad_norm(params, 1.0)
    if bool(torch.isfinite(norm)):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return
    bad = ", ".join(nonfinite_gradients(model))
    optimizer.zero_grad(set_to_none=True)
    found = "anomaly detection: a second gradient pass raised nothing"
    try:
        with torch.autograd.detect_anomaly(check_nan=True):
            again()
    except RuntimeError as error:
        found = f"anomaly detection: {str(error).splitlines()[0]}"
    optimizer.zero_grad(set_to_none=True)
    advantages_finite = advantages is None or bool(torch.isfinite(advantages).all())
    raise FloatingPointError(
        f"gradient norm {float(norm)}, update skipped; non-finite gradients: {bad}; "
        f"advantages finite: {advantages_finite}; {found}"
    )


# The step's implementations, the baseline first, by the key ``--latro-settings`` names them
# with: (name, step, reference kept in host memory, AdamW moments kept in host memory). The
# last two are the trainer's memory options (``gradient_checkpointing``, ``reference_on_host``,
# ``optimizer_on_host``).
IMPLEMENTATIONS: dict[str, tuple[str, Callable[..., None], bool, bool]] = {
    "reference": ("reference pattern", reference_pattern_step, False, False),
    "ours": ("ours", ours_step, False, False),
    "ours-torch-attention": (
        "ours, torch's choice of attention kernel (cuDNN)",
        functools.partial(ours_step, torch_attention=True),
        False,
        False,
    ),
    "checkpointing": (
        "ours, gradient checkpointing",
        functools.partial(ours_step, checkpointing=True),
        False,
        False,
    ),
    "reference-on-host": (
        "ours, checkpointing + reference on host",
        functools.partial(ours_step, checkpointing=True),
        True,
        False,
    ),
    "all-on-host": (
        "ours, checkpointing + reference and AdamW state on host",
        functools.partial(ours_step, checkpointing=True),
        True,
        True,
    ),
    # Without checkpointing's recompute: smaller micro-batches keep the activations small
    # instead (the memory a third of the baseline's asks for is mostly the gradients then).
    "all-on-host-micro-2": (
        "ours, reference and AdamW state on host, micro-batches of 2",
        functools.partial(ours_step, micro=2),
        True,
        True,
    ),
    "all-on-host-micro-1": (
        "ours, reference and AdamW state on host, micro-batches of 1",
        functools.partial(ours_step, micro=1),
        True,
        True,
    ),
    # Micro-batches by tokens without the memory settings: fewer, larger training passes (at
    # full length 6 rows of 640 columns instead of 4) for the activations of 4,096 tokens.
    "ours-tokens-4k": (
        "ours, micro-batches of 4,096 tokens",
        functools.partial(ours_step, micro=48, micro_tokens=4096),
        False,
        False,
    ),
    # Checkpointing keeps a few KB per token (each layer's input): micro-batches can then be
    # large, cut by a token budget (micro_batch_tokens) instead of 4 rows, which divides the
    # host-paced launches of the training passes (up to all 48 rows of short rationales in one).
    "all-on-host-tokens-4k": (
        "ours, checkpointing + reference and AdamW state on host, micro-batches of 4,096 tokens",
        functools.partial(ours_step, checkpointing=True, micro=48, micro_tokens=4096),
        True,
        True,
    ),
    "all-on-host-tokens-8k": (
        "ours, checkpointing + reference and AdamW state on host, micro-batches of 8,192 tokens",
        functools.partial(ours_step, checkpointing=True, micro=48, micro_tokens=8192),
        True,
        True,
    ),
    "whole-groups": (
        "ours, checkpointing, micro-batches of whole groups",
        functools.partial(ours_step, checkpointing=True, micro=None),
        False,
        False,
    ),
}
LATRO_SETTINGS = tuple(IMPLEMENTATIONS)  # --latro-settings: the reference pattern always runs
# --latro-rationales: rationales that never stop (the random model's own behaviour) and ones
# that stop at a realistic length.
LATRO_RATIONALES = ("full", "stop")
# --latro-reference-batch: the reference code's rollout_batch_size, the rows of each generate
# call and of each of its no-grad scoring forwards. 48 (all rows at once) is the setting of
# the measurement (one generate of 5.9 s; its 63.5 GiB peak is a 48-row scoring
# forward's float32 logits); the code's default is 16 (three generate calls a step).
LATRO_REFERENCE_BATCH = 48


def bench_latro(device: torch.device, small: bool) -> None:
    """The reference pattern and each of our settings (IMPLEMENTATIONS) on the same model, with
    bfloat16 weights (the issue's setting for every target, where the reference pattern's
    memory is mostly its activations) and with float32 weights under bfloat16 autocast (what
    training at lr 5e-7 needs: a bfloat16 weight cannot take such small steps), whose float32
    state alone (weights, gradients, AdamW, reference: 16 bytes and more per parameter) caps
    how far the peak can fall."""
    from latro_engine.offload import HostStateAdamW, keep_on_host
    from latro_engine.static_decoder import release_static_decoder

    k, prompts, max_len, prompt_len = (4, 2, 12, 8) if small else (16, 3, 500, 128)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16)

    settings = {
        "bfloat16": ("bfloat16", torch.bfloat16, contextlib.nullcontext),
        "float32": ("float32 + bf16 autocast", torch.float32, autocast),
    }
    rows = []
    parameters = 0.0
    for weights, dtype, amp in (settings[w] for w in LATRO_WEIGHTS):
        model = llama(device, small, dtype).train()
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        host_ref = keep_on_host(copy.deepcopy(ref_model))  # offload.py: visits for its pass
        parameters = sum(p.numel() for p in model.parameters()) / 1e9
        vocab = model.config.vocab_size
        ids, mask = random_prompts(prompts, prompt_len, vocab, device, seed=1)
        answer = torch.randint(3, vocab, (8,), generator=torch.Generator().manual_seed(2))
        never = [[vocab + 1]]  # no token ever equals it: every rationale runs to the limit
        realistic = [[t] for t in range(3, 3 + vocab // 150)]  # ~1/150 per token, flat model
        rationales = {"full": (never, "full length"), "stop": (realistic, "stop after ~150 tokens")}
        for stops, label in (rationales[r] for r in LATRO_RATIONALES):
            baseline: dict[str, Any] = {}
            for name, step, reference_on_host, optimizer_on_host in (
                IMPLEMENTATIONS[key] for key in LATRO_SETTINGS
            ):
                row: dict[str, Any] = {"weights": weights, "rationales": label, "implementation": name}
                reference = host_ref if reference_on_host else ref_model
                if reference_on_host:  # the device copy is not this row's: off the device
                    ref_model.to("cpu")
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                optimizer_cls = HostStateAdamW if optimizer_on_host else torch.optim.AdamW
                optimizer = optimizer_cls(model.parameters(), lr=1e-7)
                kwargs = dict(k=k, stops=stops, amp=amp)
                try:
                    # Warm-up: one whole step, the same for every implementation: kernels,
                    # library heuristics and the allocator's pool for these shapes, AdamW state,
                    # and for ours the decoder's buffers and CUDA graphs, kept between steps as
                    # in training. Its seconds are printed too: a first step far slower than the
                    # second is a one-time cost, not the implementation's speed.
                    t0 = time.perf_counter()
                    step(model, reference, optimizer, ids, mask, answer, max_len=max_len,
                         seed=0, **kwargs)
                    _sync(device)
                    warm_seconds = time.perf_counter() - t0
                    state = None  # weights, reference, AdamW state (and our kept decoder)
                    if device.type == "cuda":
                        state = torch.cuda.memory_allocated(device) / 2**30
                    phases = PhaseStats(device)
                    t0 = time.perf_counter()
                    mean_length = step(
                        model,
                        reference,
                        optimizer,
                        ids,
                        mask,
                        answer,
                        max_len=max_len,
                        phase=phases,
                        seed=1,  # new draws: not the warm-up's lengths and shapes again
                        **kwargs,
                    )
                    _sync(device)
                    seconds = time.perf_counter() - t0
                    peak = phases.step_peak()
                    row |= {
                        "samples/s": k * prompts / seconds,
                        "s": seconds,
                        "peak GiB": peak,
                        "reserved GiB": phases.step_reserved(),
                        "state GiB": state,
                        "mean rationale tokens": mean_length,
                        "phases (s, peak GiB)": phases.summary() or None,
                    }
                    print(
                        f"  {weights}, {label}, {name}: {seconds:.2f} s, peak {_fmt(peak)} GiB, "
                        f"{mean_length:.0f} rationale tokens "
                        f"(state {_fmt(state)}; {phases.summary()}; warm-up {warm_seconds:.2f} s)"
                    )
                    if name == "ours":
                        again = functools.partial(step, model, reference, optimizer, ids, mask,
                                                  answer, max_len=max_len, seed=2, **kwargs)
                        profile_kernels(again, f"{weights}, {label}, {name}: one more step",
                                        device, host_calls=True)
                        del again  # it holds the optimizer (its AdamW state) alive
                except Exception as error:
                    row["s"] = f"failed: {type(error).__name__}: {error}"[:200]
                    print(f"  {weights}, {label}, {name}: failed: {type(error).__name__}: {error}")
                # Nothing of this row stays on the device for the next one to be charged for:
                # the AdamW state, our kept decoder (KV cache, weight copy).
                del optimizer
                release_static_decoder(model)
                if reference_on_host:
                    ref_model.to(device)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                baseline = baseline or row
                if row is not baseline:
                    row["speedup (>= 4x)"] = _ratio(row.get("samples/s"), baseline.get("samples/s"))
                    row["memory ratio (<= 1/3)"] = _ratio(row.get("peak GiB"), baseline.get("peak GiB"))
                rows.append(row)
        del model, ref_model, host_ref
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    table(
        "latro",
        f"one LaTRO step, K={k}, {prompts} prompts, L={max_len}, {prompt_len}-token "
        f"prompts, {parameters:.2f}B parameters, AdamW; the reference pattern's rollout batch "
        f"{LATRO_REFERENCE_BATCH} rows",
        rows,
    )


def write_json(path: str, gpu: str) -> None:
    """Writes the results, keeping sections an earlier run (one process per section, as
    gpu_check.sh runs them) left in the file."""
    results: dict[str, Any] = {}
    if os.path.exists(path):
        with open(path) as f:
            results = json.load(f).get("results", {})
    results.update(RESULTS)
    with open(path, "w") as f:
        json.dump(
            {"device": gpu, "torch": torch.__version__, "results": results},
            f,
            indent=1,
            default=str,
        )


SECTIONS = {
    "scorer": bench_scorer,
    "sample": bench_sample,
    "attention": bench_attention,
    "stop": bench_stop,
    "rollout": bench_rollout,
    "latro": bench_latro,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections of {', '.join(SECTIONS)}",
    )
    parser.add_argument("--json", help="write every number to this file")
    parser.add_argument("--quick", action="store_true", help="toy sizes (a smoke test)")
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="run every section at toy sizes on the CPU (checks the code only)",
    )
    parser.add_argument(
        "--latro-weights",
        default="bfloat16,float32",
        help="the LaTRO step's weight settings, comma-separated: bfloat16 (the issue's "
        "setting), float32 (float32 weights under bfloat16 autocast)",
    )
    parser.add_argument(
        "--latro-settings",
        default=",".join(IMPLEMENTATIONS),
        help="the LaTRO step's implementations to time, comma-separated, of "
        f"{', '.join(IMPLEMENTATIONS)} (the reference pattern always runs: every ratio is to it)",
    )
    parser.add_argument(
        "--latro-reference-batch",
        type=int,
        default=48,
        help="the reference pattern's rollout batch: rows per generate call and per no-grad "
        "scoring forward (48: the issue's measurement; the reference code's default is 16)",
    )
    parser.add_argument(
        "--latro-rationales",
        default="full,stop",
        help="the LaTRO step's rationale lengths, comma-separated: full (never stop, L tokens), "
        "stop (stop after about 150 tokens)",
    )
    args = parser.parse_args(argv)
    global LATRO_WEIGHTS, LATRO_SETTINGS, LATRO_RATIONALES, LATRO_REFERENCE_BATCH
    if args.latro_reference_batch < 1:
        parser.error(f"--latro-reference-batch must be >= 1, got {args.latro_reference_batch}")
    LATRO_REFERENCE_BATCH = args.latro_reference_batch
    chosen = {w.strip() for w in args.latro_settings.split(",") if w.strip()}
    if chosen - set(IMPLEMENTATIONS):
        parser.error(f"--latro-settings: unknown {sorted(chosen - set(IMPLEMENTATIONS))}; "
                     f"choose from {', '.join(IMPLEMENTATIONS)}")
    LATRO_SETTINGS = tuple(key for key in IMPLEMENTATIONS if key in chosen | {"reference"})
    rationales = [r.strip() for r in args.latro_rationales.split(",") if r.strip()]
    if not rationales or set(rationales) - {"full", "stop"}:
        parser.error(f"--latro-rationales takes full and/or stop, got {args.latro_rationales!r}")
    LATRO_RATIONALES = tuple(r for r in ("full", "stop") if r in rationales)
    LATRO_WEIGHTS = tuple(w.strip() for w in args.latro_weights.split(",") if w.strip())
    if not LATRO_WEIGHTS or any(w not in ("bfloat16", "float32") for w in LATRO_WEIGHTS):
        parser.error(f"--latro-weights takes bfloat16 and/or float32, got {args.latro_weights!r}")
    if args.cpu_smoke:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print(
            "bench_gpu: no CUDA device on this machine; nothing to benchmark "
            "(run it on a GPU machine, e.g. through benchmarks/gpu_check.sh)"
        )
        return 0
    else:
        device = torch.device("cuda")
    import latro_engine

    if device.type == "cuda" and not latro_engine.native_has_cuda():
        print(
            "bench_gpu: the native extension has no CUDA kernels; build it with "
            "LATRO_FORCE_CUDA=1 (see benchmarks/gpu_check.sh)"
        )
        return 1
    small = args.quick or args.cpu_smoke
    global SMOKE
    SMOKE = args.cpu_smoke
    names = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke run)"
    print(
        f"## bench_gpu on {gpu}, torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}, {time.strftime('%Y-%m-%d')}"
    )
    failed = []
    for name in names:
        start = time.perf_counter()
        try:
            SECTIONS[name](device, small)
        except Exception as error:  # report and go on: the other sections still count
            failed.append(name)
            print(f"\n### {name}: FAILED: {type(error).__name__}: {error}")
        print(f"({name}: {time.perf_counter() - start:.0f} s)")
        gc.collect()  # the section's models and tensors, before the next one measures memory
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if args.json:
            write_json(args.json, gpu)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark latro_engine's native CPU ops against the plain-torch way of doing the same thing.

One run prints one markdown table: for each case and vocabulary size, the median wall time of
our op and of the plain-torch equivalent, the speedup (the median over repeats of torch time /
our time, each pair timed back to back) with its interquartile range, and the peak extra memory
each one needs.

Cases (at V = 32,000 and V = 128,256):

* ``token_logprobs`` on float32 and bfloat16 logits ``[N, V]`` vs
  ``torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None])``;
* the same, forward + backward (float32);
* ``linear_token_logprobs`` (chunked) forward and forward + backward from ``hidden [N, D]`` and
  ``weight [V, D]`` vs ``(hidden @ weight.T).float().log_softmax(-1).gather(...)``, at D = 256
  (``--dim``) and, at V = 32,000, at a model's width, D = 2,048, where the matmuls dominate;
* ``linear_weighted_logprob_sum`` forward + backward (per-token weights known in advance, the
  gradient taken in the forward) vs the same plain-torch scorer's weighted sum and backward;
* ``sample`` on ``[B, V]`` logits: plain (temperature 1), top-p 0.9 and top-k 50 vs
  ``torch.multinomial(torch.softmax(logits / T, -1), 1)`` and the usual Hugging-Face-style
  top-p (sort, softmax, cumsum, mask, scatter back, softmax, multinomial) and top-k
  (``topk`` threshold, mask, softmax, multinomial) warpers.

``linear_token_logprobs`` runs with ``chunk_size = N // 4`` rows (``--chunk-rows`` changes it):
the library's default, about 512 MiB of logits per chunk, would not chunk at all at these N. Its
backward recomputes the logits (in vocabulary blocks), one matmul more than torch's autograd does;
``linear_weighted_logprob_sum`` does torch's three.

Time: each case runs once as warm-up and its results are checked before anything is timed
(scores and gradients against torch's; sampled ids equal to the pure-torch reference sampler's
for the same seed, torch's within the vocabulary); then ours and torch's run back to back, in
alternating order, for at least 9 repeats (more for fast cases, within a time budget); the table
shows the median time of each and the median and interquartile range of the per-pair speedups.
Other processes may share the cores, so the machine's load average is printed with the results,
and the repository's commit.

Peak extra memory: tracemalloc does not see tensor storage, so memory is measured as growth of
the process's resident set (RSS), which counts every allocation (torch's and the native
kernels' alike). All memory measurements run in one fresh child process (this script
re-launched with a hidden flag) before the timings, with glibc's malloc told to serve every
block of 64 KiB or more with mmap and to trim freed heap at once (``MALLOC_MMAP_THRESHOLD_`` /
``MALLOC_TRIM_THRESHOLD_``), so freed memory goes back to the system and one measurement cannot
hide in pages cached by an earlier one. For each (case, implementation) the child:

1. runs the op once on a 2-row input (loads code, starts the thread pool);
2. builds the full-size inputs, then resets the kernel's RSS high-water mark to the current RSS
   (writing ``5`` to ``/proc/self/clear_refs``) and reads the current RSS as the baseline;
3. runs the op once, keeping its result alive, and reads the high-water mark (``VmHWM``).

Peak extra = high-water mark - baseline: everything the op needs beyond its inputs, including
its outputs (for the backward cases that includes the gradients, e.g. the ``[N, V]`` float32
gradient of the logits that both implementations must produce). Where the high-water mark
cannot be reset, each measurement gets its own fresh child instead (the baseline is then the
RSS after building the inputs, and an earlier, larger high-water mark from start-up can only
make the figure an overestimate). The kernel's RSS counters are accurate to within about a
MiB. Without ``/proc`` (not Linux) memory is reported as n/a.

Run from anywhere with the project's interpreter, e.g.::

    .venv/bin/python benchmarks/bench_ops.py            # full run, about ten minutes on 2 cores
    .venv/bin/python benchmarks/bench_ops.py --quick    # smoke test, well under a minute

The native extension must be built (and ``LATRO_BACKEND`` unset, ``auto`` or ``native``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
VOCABS = (32_000, 128_256)
MIB = 1024 * 1024
CHILD_FLAG = "--_memory-child"

Thunk = Callable[[], tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class Case:
    """One benchmark row: what to run and at which size."""

    kind: str  # tl | tl_bf16 | tl_bwd | linear | linear_bwd | linear_weighted | sample | ...
    vocab: int
    rows: int  # N (token_logprobs, linear) or B (sample)
    dim: int = 0  # D for the linear cases
    chunk: int = 0  # rows per chunk for linear_token_logprobs

    @property
    def label(self) -> str:
        shape = f"N={self.rows}, D={self.dim}, chunk={self.chunk}"
        names = {
            "tl": f"token_logprobs fp32 (N={self.rows})",
            "tl_bf16": f"token_logprobs bf16 (N={self.rows})",
            "tl_bwd": f"token_logprobs fp32 fwd+bwd (N={self.rows})",
            "linear": f"linear_token_logprobs fwd ({shape})",
            "linear_bwd": f"linear_token_logprobs fwd+bwd ({shape})",
            "linear_weighted": f"linear_weighted_logprob_sum fwd+bwd ({shape})",
            "sample": f"sample T=1 (B={self.rows})",
            "sample_top_p": f"sample top_p=0.9 (B={self.rows})",
            "sample_top_k": f"sample top_k=50 (B={self.rows})",
        }
        return names[self.kind]


@dataclass(frozen=True)
class Settings:
    """Sizes and repeat counts of one run."""

    tl_rows: dict[int, int]
    linear_rows: dict[int, int]
    linear_dim: int
    wide_dim: int  # the linear cases again at a model's width (V = 32,000 only)
    wide_rows: int
    sample_rows: int
    min_repeats: int
    max_repeats: int
    budget_s: float  # target time per case for the repeats (ours + torch)


def settings_for(quick: bool, rows_scale: float, dim: int) -> Settings:
    def scaled(rows: dict[int, int]) -> dict[int, int]:
        return {v: max(2, round(n * rows_scale)) for v, n in rows.items()}

    if quick:
        return Settings(
            tl_rows=scaled({32_000: 64, 128_256: 16}),
            linear_rows=scaled({32_000: 16, 128_256: 8}),
            linear_dim=dim or 32,
            wide_dim=64,
            wide_rows=8,
            sample_rows=4,
            min_repeats=2,
            max_repeats=3,
            budget_s=0.2,
        )
    return Settings(
        tl_rows=scaled({32_000: 1024, 128_256: 256}),
        linear_rows=scaled({32_000: 512, 128_256: 256}),
        linear_dim=dim or 256,
        wide_dim=2048,
        wide_rows=max(2, round(256 * rows_scale)),
        sample_rows=64,
        min_repeats=9,
        max_repeats=31,
        budget_s=3.0,
    )


def make_cases(settings: Settings, chunk_rows: int) -> list[Case]:
    cases: list[Case] = []
    for vocab in VOCABS:
        n_tl = settings.tl_rows[vocab]
        n_lin = settings.linear_rows[vocab]
        chunk = min(n_lin, chunk_rows) if chunk_rows > 0 else max(1, n_lin // 4)
        cases += [
            Case("tl", vocab, n_tl),
            Case("tl_bf16", vocab, n_tl),
            Case("tl_bwd", vocab, n_tl),
            Case("linear", vocab, n_lin, settings.linear_dim, chunk),
            Case("linear_bwd", vocab, n_lin, settings.linear_dim, chunk),
            Case("linear_weighted", vocab, n_lin, settings.linear_dim, chunk),
            Case("sample", vocab, settings.sample_rows),
            Case("sample_top_p", vocab, settings.sample_rows),
            Case("sample_top_k", vocab, settings.sample_rows),
        ]
    n_wide = settings.wide_rows
    chunk = min(n_wide, chunk_rows) if chunk_rows > 0 else max(1, n_wide // 4)
    cases += [Case(kind, 32_000, n_wide, settings.wide_dim, chunk)
              for kind in ("linear", "linear_bwd", "linear_weighted")]
    return cases


# ----------------------------------------------------------------------------- the ops
def load_ops() -> ModuleType:
    """Imports latro_engine.ops, exiting with a clear message unless the native ops will run."""
    backend = os.environ.get("LATRO_BACKEND", "").strip().lower()
    if backend not in ("", "auto", "native"):
        sys.exit(f"error: LATRO_BACKEND={backend!r} would benchmark the pure-torch reference; "
                 "unset it (or set it to 'native') to benchmark the native ops")
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # we report a missing extension below
        engine = importlib.import_module("latro_engine")
    if not engine.native_available():
        sys.exit("error: the latro_engine native extension is not available; build it first "
                 "(`pip install --no-build-isolation -e .`, see scripts/setup.sh)")
    return importlib.import_module("latro_engine.ops")


def torch_top_p_sample(logits: torch.Tensor, top_p: float, temperature: float) -> torch.Tensor:
    """Hugging Face's TopPLogitsWarper followed by softmax + multinomial."""
    scores = logits / temperature
    sorted_scores, sorted_idx = torch.sort(scores, dim=-1, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    sorted_remove = cumulative <= (1 - top_p)
    sorted_remove[..., -1:] = False  # always keep the most likely token
    remove = sorted_remove.scatter(1, sorted_idx, sorted_remove)
    scores = scores.masked_fill(remove, float("-inf"))
    return torch.multinomial(torch.softmax(scores, dim=-1), 1).squeeze(-1)


def torch_top_k_sample(logits: torch.Tensor, top_k: int, temperature: float) -> torch.Tensor:
    """Hugging Face's TopKLogitsWarper followed by softmax + multinomial."""
    scores = logits / temperature
    remove = scores < torch.topk(scores, top_k, dim=-1)[0][..., -1, None]
    scores = scores.masked_fill(remove, float("-inf"))
    return torch.multinomial(torch.softmax(scores, dim=-1), 1).squeeze(-1)


def build(case: Case, impl: str, rows: int, ops: ModuleType) -> Thunk:
    """Makes the inputs of ``case`` with ``rows`` rows; returns a thunk that runs it once."""
    gen = torch.Generator().manual_seed(1234)
    vocab = case.vocab
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    ours = impl == "ours"

    if case.kind in ("tl", "tl_bf16", "tl_bwd"):
        dtype = torch.bfloat16 if case.kind == "tl_bf16" else torch.float32
        logits = torch.randn(rows, vocab, generator=gen, dtype=dtype)

        def forward() -> torch.Tensor:
            if ours:
                return ops.token_logprobs(logits, targets)
            return torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None]).squeeze(-1)

        if case.kind != "tl_bwd":
            return lambda: (forward(),)
        logits.requires_grad_(True)

        def forward_backward() -> tuple[torch.Tensor, ...]:
            logits.grad = None
            out = forward()
            out.sum().backward()
            assert logits.grad is not None
            return out.detach(), logits.grad

        return forward_backward

    if case.kind in ("linear", "linear_bwd", "linear_weighted"):
        hidden = torch.randn(rows, case.dim, generator=gen)
        weight = torch.randn(vocab, case.dim, generator=gen) * case.dim**-0.5
        chunk = max(1, min(case.chunk, rows))
        backward = case.kind != "linear"
        token_weights = torch.randn(rows, generator=gen)
        hidden.requires_grad_(backward)
        weight.requires_grad_(backward)

        def linear_forward() -> torch.Tensor:
            if ours:
                return ops.linear_token_logprobs(hidden, weight, targets, chunk_size=chunk)
            logits = (hidden @ weight.T).float()
            return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)

        if not backward:
            return lambda: (linear_forward(),)

        def weighted_forward_backward() -> tuple[torch.Tensor, ...]:
            hidden.grad = None
            weight.grad = None
            if ours:
                total, _ = ops.linear_weighted_logprob_sum(
                    hidden, weight, targets, token_weights, chunk_size=chunk
                )
            else:
                total = (linear_forward() * token_weights).sum()
            total.backward()
            assert hidden.grad is not None and weight.grad is not None
            return total.detach(), hidden.grad, weight.grad

        if case.kind == "linear_weighted":
            return weighted_forward_backward

        def linear_forward_backward() -> tuple[torch.Tensor, ...]:
            hidden.grad = None
            weight.grad = None
            out = linear_forward()
            out.sum().backward()
            assert hidden.grad is not None and weight.grad is not None
            return out.detach(), hidden.grad, weight.grad

        return linear_forward_backward

    logits = torch.randn(rows, vocab, generator=gen)
    temperature = 1.0
    top_p = 0.9 if case.kind == "sample_top_p" else 1.0
    top_k = 50 if case.kind == "sample_top_k" else 0

    def draw() -> tuple[torch.Tensor, ...]:
        if ours:
            ids, _ = ops.sample(logits, seed=0, temperature=temperature, top_p=top_p, top_k=top_k)
            return (ids,)
        if top_p < 1.0:
            return (torch_top_p_sample(logits, top_p, temperature),)
        if top_k > 0:
            return (torch_top_k_sample(logits, top_k, temperature),)
        return (torch.multinomial(torch.softmax(logits / temperature, -1), 1).squeeze(-1),)

    return draw


def check_agree(
    case: Case, ours: tuple[torch.Tensor, ...], ref: tuple[torch.Tensor, ...], ops: ModuleType
) -> None:
    """Exits if the two implementations disagree (so we never time the wrong thing). Samplers
    draw from other random streams: ours must give the ids of the pure-torch reference sampler
    for the same seed (it filters and draws as the spec says), torch's ids within the
    vocabulary."""
    if case.kind.startswith("sample"):
        ids, torch_ids = ours[0], ref[0]
        if torch_ids.shape != (case.rows,) or int(torch_ids.min()) < 0 or int(torch_ids.max()) >= case.vocab:
            sys.exit(f"error: {case.label}, V={case.vocab}: torch's sampled ids out of range")
        previous = os.environ.get("LATRO_BACKEND")
        os.environ["LATRO_BACKEND"] = "torch"
        try:
            (want,) = build(case, "ours", case.rows, ops)()
        finally:
            if previous is None:
                del os.environ["LATRO_BACKEND"]
            else:
                os.environ["LATRO_BACKEND"] = previous
        if not torch.equal(ids, want):
            sys.exit(f"error: {case.label}, V={case.vocab}: ours drew other ids than the "
                     f"reference sampler in {int((ids != want).sum())} rows")
        return
    for a, b in zip(ours, ref, strict=True):
        if a.shape != b.shape or not torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-3):
            diff = (a.float() - b.float()).abs().max().item() if a.shape == b.shape else "shape"
            sys.exit(f"error: {case.label}, V={case.vocab}: ours and torch disagree ({diff})")


# ----------------------------------------------------------------------------- memory
def _proc_status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.M)
    if match is None:
        raise OSError(f"no {field} in /proc/self/status")
    return int(match.group(1))


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def memory_child(payload: dict[str, Any]) -> None:
    """Measures peak extra RSS for each spec in the payload; prints the results as JSON.

    Without a resettable high-water mark only the first spec is measured (the parent launches a
    fresh child for each of the others).
    """
    if payload["threads"]:
        torch.set_num_threads(payload["threads"])
    ops = load_ops()
    resettable = _reset_high_water_mark()
    specs = payload["specs"] if resettable else payload["specs"][:1]
    results: list[float] = []
    for spec in specs:
        case = Case(**spec["case"])
        build(case, spec["impl"], 2, ops)()  # warm-up: code, thread pool
        run = build(case, spec["impl"], case.rows, ops)
        _reset_high_water_mark()
        base = _proc_status_kib("VmRSS")
        out = run()
        peak = _proc_status_kib("VmHWM")
        del out, run
        results.append(max(0, peak - base) * 1024 / MIB)
    print(json.dumps({"resettable": resettable, "peak_mib": results}))


def measure_memory(cases: list[Case], threads: int | None) -> dict[tuple[Case, str], float]:
    """Peak extra MiB per (case, impl), measured in fresh child processes (see the docstring)."""
    if not Path("/proc/self/status").exists():
        return {}
    specs = [{"case": asdict(c), "impl": impl} for c in cases for impl in ("ours", "torch")]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    peaks: list[float] = []
    while len(peaks) < len(specs):
        payload = json.dumps({"threads": threads, "specs": specs[len(peaks):]})
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), CHILD_FLAG],
            input=payload, capture_output=True, text=True, env=env, check=False,
        )
        if proc.returncode != 0:
            sys.exit(f"error: the memory-measuring child failed:\n{proc.stderr.strip()}")
        peaks += json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"]
    return {(Case(**s["case"]), s["impl"]): p for s, p in zip(specs, peaks, strict=True)}


# ----------------------------------------------------------------------------- timing
@dataclass
class Timing:
    ours_ms: float  # medians
    torch_ms: float
    speedup: float  # median of the per-pair torch / ours
    speedup_q1: float  # its interquartile range
    speedup_q3: float
    repeats: int


def time_pair(
    case: Case, ours: Thunk, ref: Thunk, settings: Settings, ops: ModuleType
) -> Timing:
    """One warm-up call of each, whose results are checked (check_agree) before any timing;
    then back-to-back pairs in alternating order (neither side always runs on the other's
    freshly freed memory)."""
    start = time.perf_counter()
    ours_out = ours()
    ref_out = ref()
    warm = time.perf_counter() - start
    check_agree(case, ours_out, ref_out, ops)
    del ours_out, ref_out
    repeats = max(settings.min_repeats,
                  min(settings.max_repeats, math.ceil(settings.budget_s / max(warm, 1e-9))))
    ours_s: list[float] = []
    ref_s: list[float] = []
    for i in range(repeats):
        pair = ((ours, ours_s), (ref, ref_s))
        for fn, samples in pair if i % 2 == 0 else pair[::-1]:
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
    ratios = [r / o for o, r in zip(ours_s, ref_s)]
    q1, _, q3 = (statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1
                 else (ratios[0],) * 3)
    return Timing(statistics.median(ours_s) * 1e3, statistics.median(ref_s) * 1e3,
                  statistics.median(ratios), q1, q3, repeats)


# ----------------------------------------------------------------------------- report
def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        if match:
            cpu = match.group(1).strip()
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    try:
        commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               check=True).stdout.strip()
        commit += " (with uncommitted changes)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "commit": commit,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in load] if load else None,
    }


def fmt_mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smaller sizes and fewer repeats (smoke test, < 1 minute)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads(N) (default: torch's choice)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="also write the rows (and the machine info) as JSON")
    parser.add_argument("--rows-scale", type=float, default=1.0,
                        help="multiply N of the token_logprobs and linear cases by this")
    parser.add_argument("--chunk-rows", type=int, default=0,
                        help="linear_token_logprobs chunk_size in rows (default: N // 4)")
    parser.add_argument("--dim", type=int, default=0,
                        help="D of the linear cases (default 256; the D=2048 rows stay)")
    parser.add_argument(CHILD_FLAG, action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be positive")
        torch.set_num_threads(args.threads)
    if args._memory_child:
        memory_child(json.loads(sys.stdin.read()))
        return 0
    if args.rows_scale <= 0:
        parser.error("--rows-scale must be positive")
    if args.dim < 0:
        parser.error("--dim must be positive")

    ops = load_ops()
    settings = settings_for(args.quick, args.rows_scale, args.dim)
    cases = make_cases(settings, args.chunk_rows)
    info = machine_info()
    print(f"# latro_engine native CPU ops vs plain torch{' (--quick)' if args.quick else ''}\n")
    print(f"- CPU: {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable)")
    threads = info["torch_threads"]
    print(f"- torch {info['torch']}, {threads} thread{'s' if threads != 1 else ''}, "
          f"Python {info['python']}")
    print(f"- commit {info['commit']}; load average at start: {info['load_average']}\n")

    memory = measure_memory(cases, args.threads)
    rows: list[dict[str, Any]] = []
    for case in cases:
        t = time_pair(case, build(case, "ours", case.rows, ops),
                      build(case, "torch", case.rows, ops), settings, ops)
        rows.append({
            "case": case.label,
            "kind": case.kind,
            "vocab": case.vocab,
            "rows": case.rows,
            "dim": case.dim or None,
            "chunk": case.chunk or None,
            "ours_ms": round(t.ours_ms, 3),
            "torch_ms": round(t.torch_ms, 3),
            "speedup": round(t.speedup, 3),
            "speedup_iqr": [round(t.speedup_q1, 3), round(t.speedup_q3, 3)],
            "ours_peak_extra_mib": memory.get((case, "ours")),
            "torch_peak_extra_mib": memory.get((case, "torch")),
            "repeats": t.repeats,
        })

    print("| case | V | ours ms | torch ms | speedup | speedup IQR | ours peak extra MiB "
          "| torch peak extra MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        q1, q3 = r["speedup_iqr"]
        print(f"| {r['case']} | {r['vocab']:,} | {r['ours_ms']:.1f} | {r['torch_ms']:.1f} "
              f"| {r['speedup']:.2f}x | {q1:.2f}-{q3:.2f}x | {fmt_mib(r['ours_peak_extra_mib'])} "
              f"| {fmt_mib(r['torch_peak_extra_mib'])} |")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"\nTimes: median of {settings.min_repeats}-{settings.max_repeats} back-to-back pairs "
          "in alternating order after a checked warm-up; speedup = the median of the pairs' "
          "torch ms / ours ms, with its interquartile range (a range that spans 1x is no "
          "measured difference). Peak extra: RSS high-water mark growth over the inputs "
          "(outputs and gradients included), one run in a fresh child process."
          + (f" Load average at end: {[round(x, 2) for x in load]}." if load else ""))
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": info, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

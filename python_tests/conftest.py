"""Shared fixtures: devices, backends, dtypes and the one tolerance table."""

from __future__ import annotations

import math
import os

import pytest
import torch

import latro_engine

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ODD_SIZES = [1, 7, 97, 1025]
LLAMA3_VOCAB = 128_256

# Absolute slack added to "at most 2x plain torch's error at the same dtype" (flash-attention's
# rule for reductions), per input dtype.
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5, torch.float64: 1e-10}

# Under pytest-xdist (-n N, or --dist with --tx) the controller process sees every worker's
# reports through the same hooks: only the processes that run the tests record them (else each
# outcome counts twice), except a test whose worker died, which only the controller hears of.
_XDIST_CONTROLLER = False


def pytest_configure(config):
    global _XDIST_CONTROLLER
    _XDIST_CONTROLLER = getattr(config.option, "dist", "no") != "no" and not hasattr(
        config, "workerinput"
    )


def _write_progress(text: str) -> None:
    path = os.environ.get("LATRO_TEST_PROGRESS")
    if path and not _XDIST_CONTROLLER:
        with open(path, "w") as progress:
            progress.write(text)


def pytest_runtest_logstart(nodeid, location):
    """With LATRO_TEST_PROGRESS set, the id of the test about to run goes to that file (and is
    cleared once it is done): when a test kills the process (a signal, not a failure),
    scripts/pytest_through_crashes.sh reads which one it was and goes on after it."""
    _write_progress(nodeid)


# Each test's outcome so far (LATRO_TEST_OUTCOMES): written when the test is done, so a test
# that kills the process in its teardown is counted once, as crashed.
_OUTCOMES: dict[str, str] = {}


def pytest_runtest_logreport(report):
    """With LATRO_TEST_OUTCOMES set, each test's outcome goes to that file once the test is done
    (passed, failed, error for a failing setup or teardown, skipped, xfailed, xpassed), so that
    scripts/pytest_through_crashes.sh can total the runs that crashes cut the selection into."""
    path = os.environ.get("LATRO_TEST_OUTCOMES")
    if not path:
        return
    if _XDIST_CONTROLLER:
        if report.when == "???":  # xdist's report for the test its worker died in
            with open(path, "a") as outcomes:
                outcomes.write(f"crashed {report.nodeid}\n")
        return
    if report.when == "call":
        outcome = report.outcome
        if hasattr(report, "wasxfail"):
            outcome = "xfailed" if report.skipped else "xpassed"
        _OUTCOMES[report.nodeid] = outcome
    elif report.failed:
        _OUTCOMES[report.nodeid] = "error"
    elif report.skipped and report.when == "setup":
        _OUTCOMES[report.nodeid] = "xfailed" if hasattr(report, "wasxfail") else "skipped"


def pytest_runtest_logfinish(nodeid, location):
    _write_progress("")  # a crash after this test (at exit, say) is not its fault
    path = os.environ.get("LATRO_TEST_OUTCOMES")
    if path and nodeid in _OUTCOMES:
        with open(path, "a") as outcomes:
            outcomes.write(f"{_OUTCOMES.pop(nodeid)} {nodeid}\n")


requires_native = pytest.mark.skipif(
    not latro_engine.native_available(), reason="the native extension is not built"
)


def backends_for(device: str) -> list[str]:
    """The backends an op can run on for tensors of ``device``: the reference always, native
    where the extension has kernels for that device."""
    names = ["torch"]
    if latro_engine.native_available() and (device == "cpu" or latro_engine.native_has_cuda()):
        names.append("native")
    return names


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine the
    thread pool's spinning makes each 32-wide matmul ~10x slower. Modules of tiny-model tests
    take it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture
def use_backend(monkeypatch):
    """use_backend("torch" | "native") switches LATRO_BACKEND for the rest of the test."""

    def switch(name: str) -> None:
        monkeypatch.setenv("LATRO_BACKEND", name)

    return switch


def device_backend_pairs() -> list[tuple[str, str]]:
    return [(d, b) for d in DEVICES for b in backends_for(d)]


# ----------------------------------------------------------------------------- LM-head scorers
# (rows, hidden dim, vocabulary, chunk_size) for linear_token_logprobs and
# linear_weighted_logprob_sum: one row, odd sizes, a chunk per few rows, Llama 3's vocabulary.
LINEAR_SHAPES = [(1, 8, 7, None), (7, 16, 97, 3), (97, 32, 1025, 10), (33, 24, LLAMA3_VOCAB, 16)]


def linear_problem(n, d, v, dtype, device, bias=False, seed=0, token_weights=False):
    """(hidden [n, d], weight [v, d] / sqrt(d), bias [v] or None, targets [n] with the middle
    one ignored (-100)), and with ``token_weights`` a float32 weight per token after them."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(dtype).to(device)
    weight = (torch.randn(v, d, generator=g) / d**0.5).to(dtype).to(device)
    b = torch.randn(v, generator=g).to(dtype).to(device) if bias else None
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    if n > 2:
        targets[n // 2] = -100
    if not token_weights:
        return hidden, weight, b, targets
    return hidden, weight, b, targets, torch.randn(n, generator=g).to(device)


def stop_positions_by_brute_force(
    tokens: list[list[int]], stops: list[list[int]], start: int
) -> list[int]:
    """Per row, where the first stop sequence begins at or after ``start`` (else the length)."""
    out = []
    for row in tokens:
        found = len(row)
        for begin in range(start, len(row)):
            if any(row[begin : begin + len(s)] == s for s in stops):
                found = begin
                break
        out.append(found)
    return out


def assert_close_to_oracle(actual: torch.Tensor, oracle: torch.Tensor, plain: torch.Tensor, dtype):
    """actual's error against the float64 oracle is at most 2x plain torch's error plus ATOL."""
    actual_err = (actual.double() - oracle).abs()
    plain_err = (plain.double() - oracle).abs()
    bound = 2 * plain_err.max() + ATOL[dtype] * (1 + oracle.abs().max())
    assert actual_err.max() <= bound, f"max error {actual_err.max():.3g} > bound {bound:.3g}"


# ----------------------------------------------------------------------------- decode attention
# rows, heads, kv heads, slots, head dim, length: odd sizes, groups of 1 to 8 query heads,
# head dims on and off the 16-byte vector, a single slot, a full cache.
DECODE_ATTENTION_SHAPES = [
    (3, 6, 2, 37, 24, 37),
    (2, 5, 5, 41, 5, 19),
    (2, 5, 1, 70, 64, 53),
    (2, 8, 1, 29, 256, 23),
    (5, 4, 4, 3, 8, 1),
]
DECODE_ATTENTION_ATOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


def decode_attention_problem(rows, heads, kv, slots, dim, length, dtype, seed=0, masked=True):
    """Inputs in dtype; caches are rows of a larger buffer, poisoned with NaN where the op
    must not read (beyond the length, masked slots, the slot new_k / new_v will fill)."""
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(rows, heads, dim, generator=g).to(dtype)
    buffers = torch.randn(2, rows + 2, kv, slots, dim, generator=g).to(dtype)
    cache_k, cache_v = buffers[0, :rows], buffers[1, :rows]
    new_k, new_v = torch.randn(2, rows, kv, dim, generator=g).to(dtype)
    mask = torch.rand(rows, slots, generator=g) < 0.75
    mask[:, length - 1] = True
    if masked and rows > 1:
        mask[1] = False  # a row that may attend nothing: zeros
    if not masked:
        mask[:] = True
    for cache in (cache_k, cache_v):
        cache[:, :, length - 1 :] = math.nan
        cache.masked_fill_(~mask[:, None, :, None], math.nan)
    return query, cache_k, cache_v, new_k, new_v, mask


def put_non_finite(query, new_k, new_v):
    """NaN and infinity where decode attention reads them, in place: a NaN in row 0's first
    query head (all its scores NaN), +inf in its last query head, a NaN in the last row's new
    key of the last KV head and +inf in its new value of the first. Outputs NaN where a score
    is NaN, as torch's attention has them, not the zeros of a row with no allowed slot."""
    query[0, 0, 0] = math.nan
    query[0, -1, -1] = math.inf
    new_k[-1, -1, -1] = math.nan
    new_v[-1, 0, 0] = math.inf


def rotary_tables(rows: int, dim: int, base: float = 10000.0, dtype=torch.float32):
    """cos / sin [rows, dim] of positions 3, 4, ... as Llama computes them (in float32), in
    ``dtype`` (a half model's own tables: the rotation then rounds in it)."""
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    freqs = (torch.arange(rows, dtype=torch.float32) + 3)[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


# decode_attention's rotary settings: none, float32 tables, tables of the op's dtype
ROTARY = ["", "rotary", "rotary-in-dtype"]


def rotary_for(setting: str, rows: int, dim: int, dtype):
    """The rotary tables of a ROTARY setting for a problem of ``dtype``, or None."""
    if not setting:
        return None
    return rotary_tables(rows, dim, dtype=dtype if setting == "rotary-in-dtype" else torch.float32)


def rotate_as_stored(x, rotary):
    """x [rows, heads, dim] rotated in float64 (x * cos + rotate_half(x) * sin) and rounded to
    x's dtype, as the op stores it; with tables of x's bf16 / fp16 (a half model's own), each
    product and the sum rounded to it (exact products in float64, then rounded: torch's
    half ops); x itself without rotary."""
    if rotary is None:
        return x
    half_tables = rotary[0].dtype == x.dtype and x.dtype.itemsize == 2
    cos, sin = (t.double()[:, None] for t in rotary)
    half = x.shape[-1] // 2
    x64 = x.double()
    direct, turned = x64 * cos, torch.cat((-x64[..., half:], x64[..., :half]), -1) * sin
    if half_tables:
        direct, turned = direct.to(x.dtype).double(), turned.to(x.dtype).double()
    return (direct + turned).to(x.dtype)


def decode_attention_oracle(
    query, cache_k, cache_v, new_k, new_v, mask, length, scale, rotary=None
):
    """float64, through torch's own attention with the KV heads repeated (query and new_k
    rotated first when ``rotary`` is given)."""
    query, new_k = rotate_as_stored(query, rotary), rotate_as_stored(new_k, rotary)
    rows, heads, dim = query.shape
    kv = cache_k.shape[1]
    keys, values = cache_k.double().clone(), cache_v.double().clone()
    keys[:, :, length - 1], values[:, :, length - 1] = new_k.double(), new_v.double()
    keys, values = keys[:, :, :length], values[:, :, :length]
    allowed = mask[:, :length]
    keys = keys.masked_fill(~allowed[:, None, :, None], 0)
    values = values.masked_fill(~allowed[:, None, :, None], 0)
    out = torch.nn.functional.scaled_dot_product_attention(
        query.double()[:, :, None],
        keys.repeat_interleave(heads // kv, dim=1),
        values.repeat_interleave(heads // kv, dim=1),
        attn_mask=allowed[:, None, None, :],
        scale=scale,
    )[:, :, 0]
    return torch.where(allowed.any(-1)[:, None, None], out, 0.0)  # SDPA gives NaN there

"""Pure-torch reference implementations of the ops in :mod:`latro_engine.ops`.

They serve twice: as the fallback backend when the native extension is not built (or
``LATRO_BACKEND=torch``), and as the oracle in the tests (pass float64 logits to get float64
results). They check their arguments exactly like the native ops and raise the same errors:
``TypeError`` for a wrong dtype, ``ValueError`` for everything else, each naming the argument.
Semantics are documented once, in ``csrc/core/include/latro/latro.h`` and in ``ops``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

_MASK32 = 0xFFFFFFFF
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------- checks
def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_dtype(t: torch.Tensor, dtypes: Sequence[torch.dtype], name: str) -> None:
    if t.dtype not in dtypes:
        allowed = ", ".join(_name(d) for d in dtypes)
        raise TypeError(f"{name} must be {allowed}, got {_name(t.dtype)}")


def _check_same_device(t: torch.Tensor, ref: torch.Tensor, name: str, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def _check_like(t: torch.Tensor, ref: torch.Tensor, name: str, ref_name: str) -> None:
    """t has the dtype and the device of ``ref`` (the op's tensors that must match one)."""
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must be {ref.dtype} like {ref_name}, got {t.dtype}")
    _check_same_device(t, ref, name, ref_name)


def _check_logits(logits: torch.Tensor, name: str = "logits") -> None:
    # float64 is accepted here only: it is how the tests ask for the float64 oracle.
    _check_dtype(logits, (*_FLOAT_DTYPES, torch.float64), name)
    if logits.dim() < 1:
        raise ValueError(f"{name} must have at least 1 dimension (the vocabulary)")
    if logits.shape[-1] == 0:
        raise ValueError(f"{name} has an empty vocabulary dimension")


def _check_targets(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        value = int(targets[index])
        raise ValueError(
            f"targets[{', '.join(map(str, index))}] = {value} is out of range for vocab size "
            f"{vocab} (ignore_index is {ignore_index})"
        )


def check_sampling_options(temperature: float, top_k: int, top_p: float, min_p: float) -> None:
    """Raises ValueError for options the sampler cannot honour (NaN temperature, ...)."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if not (0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not (0 <= min_p <= 1):
        raise ValueError(f"min_p must be in [0, 1], got {min_p}")


def as_float32(value: float) -> float:
    """``value`` rounded to float32, as the native kernels receive scalar options (1e-300 -> 0,
    1e300 -> inf), so that both backends judge and use the same number."""
    return float(torch.tensor(float(value), dtype=torch.float32))


def _result_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- scoring
def token_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100
) -> torch.Tensor:
    """``log_softmax(logits.float(), -1)`` gathered at ``targets``; 0 where ignored."""
    _check_logits(logits)
    _check_dtype(targets, (torch.int64,), "targets")
    _check_same_device(targets, logits, "targets", "logits")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"targets must have shape logits.shape[:-1] = {list(logits.shape[:-1])}, "
            f"got {list(targets.shape)}"
        )
    _check_targets(targets, logits.shape[-1], ignore_index)
    ignored = targets == ignore_index
    safe = torch.where(ignored, torch.zeros_like(targets), targets)
    logp = torch.log_softmax(logits.to(_result_dtype(logits)), dim=-1)
    picked = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(ignored, torch.zeros_like(picked), picked)


def _check_linear(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
) -> None:
    _check_dtype(hidden, (*_FLOAT_DTYPES, torch.float64), "hidden")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must have 2 dimension(s), got shape {list(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must have 2 dimension(s), got shape {list(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}"
        )
    _check_same_device(weight, hidden, "weight", "hidden")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"weight must have shape [V, D] with D = {hidden.shape[1]} (hidden's last dim), "
            f"got {list(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary dimension")
    if bias is not None:
        if bias.dtype != hidden.dtype:
            raise TypeError(
                f"bias must have the dtype of hidden ({hidden.dtype}), got {bias.dtype}"
            )
        _check_same_device(bias, hidden, "bias", "hidden")
        if bias.shape != (weight.shape[0],):
            raise ValueError(
                f"bias must have shape [V] = [{weight.shape[0]}], got {list(bias.shape)}"
            )
    _check_dtype(targets, (torch.int64,), "targets")
    _check_same_device(targets, hidden, "targets", "hidden")
    if targets.shape != (hidden.shape[0],):
        raise ValueError(
            f"targets must have shape [N] = [{hidden.shape[0]}], got {list(targets.shape)}"
        )


def default_chunk_size(rows: int, vocab: int, element_size: int) -> int:
    """Rows per chunk: about 512 MiB of logits of ``element_size`` bytes, as the native op
    chooses."""
    return max(1, min(max(rows, 1), (1 << 29) // (vocab * element_size)))


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.addmm(bias, h, weight.t()) if bias is not None else h @ weight.t()


class _ChunkedLinearLogprobs(torch.autograd.Function):
    """The LM-head scorer in plain torch: chunks of rows, logits recomputed in the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, ignore_index):  # type: ignore[override]
        out = torch.empty(hidden.shape[0], dtype=_result_dtype(hidden), device=hidden.device)
        lse = torch.empty_like(out)
        for begin in range(0, hidden.shape[0], chunk):
            logits = _chunk_logits(hidden[begin : begin + chunk], weight, bias)
            logits = logits.to(out.dtype)
            t = targets[begin : begin + chunk]
            ignored = t == ignore_index
            chunk_lse = torch.logsumexp(logits, dim=-1)
            # log_softmax, not picked - lse: a row holding +inf is NaN throughout, as in
            # token_logprobs (logsumexp alone would give -inf for its finite entries).
            logp = torch.log_softmax(logits, dim=-1)
            picked = logp.gather(-1, torch.where(ignored, 0, t).unsqueeze(-1)).squeeze(-1)
            out[begin : begin + chunk] = torch.where(ignored, 0.0, picked)
            lse[begin : begin + chunk] = chunk_lse
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk, ctx.ignore_index = chunk, ignore_index
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        # bf16/fp16 weight and bias gradients are summed in float32 and rounded once at the end,
        # as in the native op: a low-precision running sum is rounded after every chunk.
        acc_dtype = torch.promote_types(weight.dtype, torch.float32)
        grad_weight = torch.zeros_like(weight, dtype=acc_dtype)
        grad_bias = torch.zeros_like(bias, dtype=acc_dtype) if bias is not None else None
        for begin in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[begin : begin + ctx.chunk]
            logits = _chunk_logits(h, weight, bias).to(lse.dtype)
            t = targets[begin : begin + ctx.chunk]
            ignored = t == ctx.ignore_index
            g = torch.where(ignored, 0.0, grad_out[begin : begin + ctx.chunk].to(lse.dtype))
            # softmax, not exp(logits - lse): near the float32 maximum lse rounds to the row max
            # (even in float64), and two tied logits would each get probability 1.
            grad_logits = -torch.softmax(logits, dim=-1) * g[:, None]
            grad_logits.scatter_add_(-1, torch.where(ignored, 0, t)[:, None], g[:, None])
            grad_logits = grad_logits.to(hidden.dtype)
            grad_hidden[begin : begin + ctx.chunk] = grad_logits @ weight
            grad_weight.addmm_(grad_logits.t().to(acc_dtype), h.to(acc_dtype))
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0, dtype=acc_dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight.to(weight.dtype), grad_bias, None, None, None


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """``token_logprobs(hidden @ weight.T + bias, targets)`` computed chunk by chunk."""
    _check_linear(hidden, weight, bias, targets)
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive (or None), got {chunk_size}")
    _check_targets(targets, weight.shape[0], ignore_index)
    chunk = chunk_size or default_chunk_size(
        hidden.shape[0], weight.shape[0], hidden.element_size()
    )
    return _ChunkedLinearLogprobs.apply(hidden, weight, bias, targets, chunk, ignore_index)


def linear_weighted_logprob_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_weights: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_i w_i logp_i, logp.detach())`` with ``logp = linear_token_logprobs(...)``; ignored
    rows add nothing. The gradient goes through :func:`linear_token_logprobs`' backward."""
    _check_linear(hidden, weight, bias, targets)
    _check_dtype(token_weights, (torch.float64, *_FLOAT_DTYPES), "token_weights")
    _check_same_device(token_weights, hidden, "token_weights", "hidden")
    if token_weights.shape != (hidden.shape[0],):
        raise ValueError(
            f"token_weights must have shape [N] = [{hidden.shape[0]}], "
            f"got {list(token_weights.shape)}"
        )
    logp = linear_token_logprobs(
        hidden, weight, targets, bias=bias, chunk_size=chunk_size, ignore_index=ignore_index
    )
    terms = torch.where(targets == ignore_index, 0.0, logp.double() * token_weights.double())
    return terms.sum().to(logp.dtype), logp.detach()


# ----------------------------------------------------------------------------- sampling
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * b for uint32 values held in int64 without overflow."""
    p_lo = a * (b & 0xFFFF)
    p_hi = a * (b >> 16)
    t = ((p_hi & 0xFFFF) << 16) + p_lo
    return (p_hi >> 16) + (t >> 32), t & _MASK32


def philox4x32_10(
    counter: Sequence[torch.Tensor], key: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Philox4x32-10 on broadcastable int64 tensors holding uint32 words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mulhilo32(_PHILOX_M[0], c0)
        hi1, lo1 = _mulhilo32(_PHILOX_M[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _PHILOX_W[0]) & _MASK32
        k1 = (k1 + _PHILOX_W[1]) & _MASK32
    return [c0, c1, c2, c3]


_FINE_BLOCKS = 0x80000000  # philox.h's kFineBlocks: the first block of the fine bits' range


def _sampling_blocks(
    seeds: torch.Tensor, streams: torch.Tensor, step: int, blocks: torch.Tensor
) -> torch.Tensor:
    """Philox blocks ``blocks`` [n] of each row's stream: int64 words [B, n, 4]."""
    step_t = torch.tensor(step, dtype=torch.int64, device=seeds.device)
    counter = (
        blocks[None, :],
        (streams & _MASK32)[:, None],
        (step_t & _MASK32).expand(1, 1),
        ((step_t >> 32) & _MASK32).expand(1, 1),
    )
    key = ((seeds & _MASK32)[:, None], ((seeds >> 32) & _MASK32)[:, None])
    return torch.stack(torch.broadcast_tensors(*philox4x32_10(counter, key)), dim=-1)


def gumbel_noise(seeds: torch.Tensor, streams: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """The sampler's Gumbel noise, float32 [B, vocab], for per-row seeds and streams [B].

    Token v's uniform is u = (n + 0.5) / 2^23 with n = coarse * 2^7 + fine (philox.h): coarse,
    16 bits, is half v % 2 of word (v / 2) % 4 of block v / 8; fine, the low 7 bits of byte
    v % 4 of word (v / 4) % 4 of block 2^31 + v / 16.
    """
    device = seeds.device
    v = torch.arange(vocab, dtype=torch.int64, device=device)
    coarse_blocks = torch.arange((vocab + 7) // 8, dtype=torch.int64, device=device)
    fine_blocks = _FINE_BLOCKS + torch.arange((vocab + 15) // 16, dtype=torch.int64, device=device)
    coarse_words = _sampling_blocks(seeds, streams, step, coarse_blocks).reshape(seeds.shape[0], -1)
    fine_words = _sampling_blocks(seeds, streams, step, fine_blocks).reshape(seeds.shape[0], -1)
    coarse = (coarse_words[:, v >> 1] >> (16 * (v & 1))) & 0xFFFF
    fine = (fine_words[:, v >> 2] >> (8 * (v & 3))) & 0x7F
    uniform = (((coarse << 7) | fine).to(torch.float32) + 0.5) * 2.0**-23
    return -torch.log(-torch.log(uniform))


def kept_mask(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
) -> torch.Tensor:
    """The tokens the sampler may draw from, bool [B, V] (semantics in latro.h)."""
    scaled = logits.float() / torch.tensor(temperature, dtype=torch.float32)
    if bool(torch.isnan(scaled).any()):
        row = int(torch.isnan(scaled).any(-1).nonzero()[0])
        raise ValueError(f"logits row {row} contains NaN")
    m = scaled.max(-1, keepdim=True).values
    if bool((m == -math.inf).any()):
        raise ValueError(
            f"logits row {int((m[:, 0] == -math.inf).nonzero()[0])} has no finite value"
        )
    if bool((m == math.inf).any()):
        row = int((m[:, 0] == math.inf).nonzero()[0])
        raise ValueError(f"logits row {row} contains +inf (after dividing by the temperature)")
    keep = scaled > -math.inf
    vocab = scaled.shape[-1]
    if 0 < top_k < vocab:
        keep &= scaled >= scaled.topk(top_k, dim=-1).values[:, -1:]
    if min_p > 0:
        keep &= (scaled - m) >= torch.tensor(math.log(min_p), dtype=torch.float32)
    if top_p < 1:
        weights = torch.where(keep, torch.exp(scaled.double() - m.double()), 0.0)
        order = torch.sort(-scaled, dim=-1, stable=True).indices
        cumulative = weights.gather(-1, order).cumsum(-1)
        target = top_p * weights.sum(-1, keepdim=True)
        last = torch.searchsorted(cumulative, target).clamp(max=vocab - 1)
        floor = scaled.gather(-1, order.gather(-1, last))
        keep &= scaled >= floor
    return keep


def _as_seed_tensor(
    seed: int | torch.Tensor, rows: int, device: torch.device
) -> tuple[torch.Tensor, bool]:
    if isinstance(seed, torch.Tensor):
        _check_dtype(seed, (torch.int64,), "seed")
        if seed.dim() == 1 and seed.shape[0] == rows:
            return seed.to(device), True
        if seed.dim() == 0:
            return seed.to(device).reshape(1).expand(rows), False
        raise ValueError(
            f"seed must be an int, a 0-d tensor or a tensor of shape [B] = [{rows}], "
            f"got shape {list(seed.shape)}"
        )
    return torch.full((rows,), int(seed), dtype=torch.int64, device=device), False


def sample(
    logits: torch.Tensor,
    *,
    seed: int | torch.Tensor,
    offset: int | torch.Tensor = 0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gumbel-max sampling with Philox noise: the same draws as the native sampler."""
    _check_dtype(logits, _FLOAT_DTYPES, "logits")
    if logits.dim() != 2:
        raise ValueError(f"logits must have 2 dimension(s), got shape {list(logits.shape)}")
    if logits.shape[1] == 0:
        raise ValueError("logits has an empty vocabulary dimension")
    temperature, top_p, min_p = as_float32(temperature), as_float32(top_p), as_float32(min_p)
    check_sampling_options(temperature, top_k, top_p, min_p)
    if isinstance(offset, torch.Tensor):
        _check_dtype(offset, (torch.int64,), "offset")
        if offset.dim() != 0:
            raise ValueError(
                f"offset must be an int or a 0-d tensor, got shape {list(offset.shape)}"
            )
    step = int(offset)
    if step < 0:
        raise ValueError(f"offset must be >= 0, got {step}")
    rows, vocab = logits.shape
    seeds, per_row = _as_seed_tensor(seed, rows, logits.device)
    if rows == 0:
        empty = torch.empty(0, device=logits.device)
        return empty.long(), empty.float()
    if temperature == 0:
        if bool(torch.isnan(logits).any()):
            raise ValueError(
                f"logits row {int(torch.isnan(logits).any(-1).nonzero()[0])} contains NaN"
            )
        ids = logits.float().argmax(-1)
        return ids, torch.zeros(rows, dtype=torch.float32, device=logits.device)
    keep = kept_mask(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    scaled = logits.float() / torch.tensor(temperature, dtype=torch.float32)
    streams = torch.zeros_like(seeds) if per_row else torch.arange(rows, device=logits.device)
    keys = torch.where(keep, scaled + gumbel_noise(seeds, streams, step, vocab), -math.inf)
    ids = keys.argmax(-1)
    m = scaled.max(-1).values.double()
    mass = torch.where(keep, torch.exp(scaled.double() - m[:, None]), 0.0).sum(-1)
    chosen = scaled.gather(-1, ids[:, None])[:, 0].double()
    return ids, (chosen - m - torch.log(mass)).float()


# ----------------------------------------------------------------------------- stops
def check_stop_sequences(stop_sequences: Sequence[Sequence[int]]) -> list[list[int]]:
    """Validates a list of token-id lists and returns it as plain lists of ints."""
    if isinstance(stop_sequences, torch.Tensor) or isinstance(stop_sequences, (str, bytes)):
        raise ValueError("stop_sequences must be a list of token-id lists")
    result = []
    for i, seq in enumerate(stop_sequences):
        ids = seq.tolist() if isinstance(seq, torch.Tensor) else list(seq)
        if len(ids) == 0:
            raise ValueError(f"stop_sequences[{i}] is empty")
        if not all(isinstance(t, int) for t in ids):
            raise ValueError(f"stop_sequences[{i}] must hold integer token ids, got {ids!r}")
        result.append([int(t) for t in ids])
    return result


def _check_tokens(tokens: torch.Tensor, start: int) -> None:
    _check_dtype(tokens, (torch.int64,), "tokens")
    if tokens.dim() != 2:
        raise ValueError(f"tokens must have 2 dimension(s), got shape {list(tokens.shape)}")
    if not 0 <= start <= tokens.shape[1]:
        raise ValueError(f"start must be in [0, {tokens.shape[1]}], got {start}")


def _matches_at(tokens: torch.Tensor, seq: list[int], begin: int) -> torch.Tensor:
    window = tokens[:, begin : begin + len(seq)]
    return (window == torch.tensor(seq, dtype=tokens.dtype, device=tokens.device)).all(-1)


def stop_positions(
    tokens: torch.Tensor, stop_sequences: Sequence[Sequence[int]], *, start: int = 0
) -> torch.Tensor:
    """Index where the earliest stop sequence at or after ``start`` begins, else T. int64 [B]."""
    _check_tokens(tokens, start)
    seqs = check_stop_sequences(stop_sequences)
    rows, length = tokens.shape
    found = torch.full((rows,), length, dtype=torch.int64, device=tokens.device)
    for seq in seqs:
        n = len(seq)
        if length - n + 1 <= start:
            continue
        windows = tokens.unfold(1, n, 1)[:, start:]  # [B, T - n + 1 - start, n]
        hits = (windows == torch.tensor(seq, dtype=tokens.dtype, device=tokens.device)).all(-1)
        first = torch.where(hits.any(-1), hits.int().argmax(-1) + start, length)
        found = torch.minimum(found, first)
    return found


def stop_positions_step(
    tokens: torch.Tensor,
    stop_sequences: Sequence[Sequence[int]],
    *,
    step: int | torch.Tensor,
    positions: torch.Tensor,
    start: int = 0,
) -> torch.Tensor:
    """The incremental form: rows still at T get the start of the first stop ending at ``step``."""
    _check_tokens(tokens, start)
    seqs = check_stop_sequences(stop_sequences)
    rows, length = tokens.shape
    _check_dtype(positions, (torch.int64,), "positions")
    if positions.shape != (rows,):
        raise ValueError(f"positions must have shape [B] = [{rows}], got {list(positions.shape)}")
    if isinstance(step, torch.Tensor):  # as the native op takes it
        _check_dtype(step, (torch.int64,), "step")
        if step.dim() != 0:
            raise ValueError(f"step must be an int or a 0-d tensor, got shape {list(step.shape)}")
    step = int(step)
    if not 0 <= step < length:
        raise ValueError(f"step must be in [0, {length}), got {step}")
    outside = (positions < 0) | (positions > length)
    if bool(outside.any()):
        row = int(outside.nonzero()[0])
        raise ValueError(f"positions[{row}] = {int(positions[row])} is outside [0, {length}]")
    result = positions.clone()
    open_rows = positions == length
    for seq in seqs:
        begin = step + 1 - len(seq)
        if begin < start:
            continue
        hit = open_rows & _matches_at(tokens, seq, begin)
        result = torch.where(hit, begin, result)
        open_rows &= ~hit
    return result


# ----------------------------------------------------------------------------- rewards
def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """``A_i = r_i - (sum of its group - r_i) / (k - 1)``; rewards grouped k per prompt."""
    _check_dtype(rewards, (torch.float32, torch.float64), "rewards")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must have 1 dimension(s), got shape {list(rewards.shape)}")
    if k < 2:
        raise ValueError(f"k must be >= 2 for a leave-one-out baseline, got {k}")
    if rewards.shape[0] == 0:
        raise ValueError("rewards is empty")
    if rewards.shape[0] % k:
        raise ValueError(
            f"k = {k} does not divide the {rewards.shape[0]} rewards (they must be grouped by "
            f"prompt, k per group)"
        )
    r = rewards.double().view(-1, k)
    baseline = (r.sum(-1, keepdim=True) - r) / (k - 1)
    return (r - baseline).view(-1).to(rewards.dtype)


PENALTY_MODES = ("constant", "batch_mean")


def latro_rewards(
    answer_logp: torch.Tensor,
    rationale_logp: torch.Tensor,
    ref_rationale_logp: torch.Tensor,
    finished: torch.Tensor,
    *,
    kl_coef: float,
    nonstop_penalty: float,
    penalty_mode: str = "constant",
) -> torch.Tensor:
    """``r = R - kl_coef * (rationale_logp - ref_rationale_logp)`` with the self-reward ``R =
    answer_logp`` for finished rows and the penalty for the others (it replaces the self-reward,
    not the KL term, as in the reference code)."""
    _check_dtype(answer_logp, (torch.float32, torch.float64), "answer_logp")
    if answer_logp.dim() != 1:
        raise ValueError(
            f"answer_logp must have 1 dimension(s), got shape {list(answer_logp.shape)}"
        )
    if answer_logp.shape[0] == 0:
        raise ValueError("answer_logp is empty")
    for t, name in ((rationale_logp, "rationale_logp"), (ref_rationale_logp, "ref_rationale_logp")):
        _check_dtype(t, (answer_logp.dtype,), name)
        _check_same_device(t, answer_logp, name, "answer_logp")
        if t.shape != answer_logp.shape:
            raise ValueError(
                f"{name} must have the shape of answer_logp {list(answer_logp.shape)}, got {list(t.shape)}"
            )
    _check_dtype(finished, (torch.bool,), "finished")
    _check_same_device(finished, answer_logp, "finished", "answer_logp")
    if finished.shape != answer_logp.shape:
        raise ValueError(
            f"finished must have the shape of answer_logp {list(answer_logp.shape)}, got {list(finished.shape)}"
        )
    if penalty_mode not in PENALTY_MODES:
        raise ValueError(f"penalty_mode must be 'constant' or 'batch_mean', got '{penalty_mode}'")
    for value, name in ((kl_coef, "kl_coef"), (nonstop_penalty, "nonstop_penalty")):
        if not math.isfinite(as_float32(value)):
            raise ValueError(f"{name} must be finite in float32, got {value}")
    kl_coef, nonstop_penalty = as_float32(kl_coef), as_float32(nonstop_penalty)
    a = answer_logp.double()
    penalty = (
        nonstop_penalty * a.mean()
        if penalty_mode == "batch_mean"
        else torch.tensor(float(nonstop_penalty), dtype=torch.float64, device=a.device)
    )
    self_reward = torch.where(finished, a, penalty)
    kl = rationale_logp.double() - ref_rationale_logp.double()
    return (self_reward - kl_coef * kl).to(answer_logp.dtype)


# ----------------------------------------------------------------------------- decode attention
MAX_DECODE_HEAD_DIM = 256


def _check_decode_attention(
    query, cache_k, cache_v, new_k, new_v, slot_mask, rotary_cos, rotary_sin, length, scale
):
    _check_dtype(query, (*_FLOAT_DTYPES, torch.float64), "query")
    for t, name, dim in ((query, "query", 3), (cache_k, "cache_k", 4), (cache_v, "cache_v", 4)):
        if t.dim() != dim:
            raise ValueError(f"{name} must have {dim} dimension(s), got shape {list(t.shape)}")
    _check_like(cache_k, query, "cache_k", "query")
    _check_like(cache_v, query, "cache_v", "query")
    rows, heads, head_dim = query.shape
    if cache_k.shape[0] != rows or cache_k.shape[3] != head_dim:
        raise ValueError(
            f"cache_k must have shape [rows, kv_heads, slots, head_dim] with rows = {rows} and "
            f"head_dim = {head_dim} as query, got shape {list(cache_k.shape)}"
        )
    if cache_v.shape != cache_k.shape:
        raise ValueError(
            f"cache_v must have the shape of cache_k {list(cache_k.shape)}, got "
            f"{list(cache_v.shape)}"
        )
    kv_heads, slots = cache_k.shape[1], cache_k.shape[2]
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(
            f"query's {heads} heads must be a multiple of cache_k's {kv_heads} KV heads"
        )
    if not 1 <= head_dim <= MAX_DECODE_HEAD_DIM:
        raise ValueError(f"head_dim must be in [1, {MAX_DECODE_HEAD_DIM}], got {head_dim}")
    if slots == 0:
        raise ValueError("cache_k has no slots")
    if (new_k is None) != (new_v is None):
        raise ValueError("new_k and new_v must be given together")
    if new_k is not None:
        for t, name in ((new_k, "new_k"), (new_v, "new_v")):
            _check_like(t, query, name, "query")
            if t.shape != (rows, kv_heads, head_dim):
                raise ValueError(
                    f"{name} must have shape [rows, kv_heads, head_dim] = "
                    f"[{rows}, {kv_heads}, {head_dim}], got {list(t.shape)}"
                )
    if slot_mask is not None:
        _check_dtype(slot_mask, (torch.bool,), "slot_mask")
        _check_same_device(slot_mask, query, "slot_mask", "query")
        if slot_mask.shape != (rows, slots):
            raise ValueError(
                f"slot_mask must have shape [rows, slots] = [{rows}, {slots}], got "
                f"{list(slot_mask.shape)}"
            )
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together")
    if rotary_cos is not None:
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for a rotary embedding, got {head_dim}")
        for t, name in ((rotary_cos, "rotary_cos"), (rotary_sin, "rotary_sin")):
            if t.dtype not in (torch.float32, query.dtype):
                raise TypeError(
                    f"{name} must be float32 or the query's dtype {_name(query.dtype)}, got "
                    f"{_name(t.dtype)}"
                )
            _check_same_device(t, query, name, "query")
            if t.shape != (rows, head_dim):
                raise ValueError(
                    f"{name} must have shape [rows, head_dim] = [{rows}, {head_dim}], got "
                    f"{list(t.shape)}"
                )
        if rotary_cos.dtype != rotary_sin.dtype:
            raise TypeError(
                "rotary_cos and rotary_sin must have the same dtype, got "
                f"{_name(rotary_cos.dtype)} and {_name(rotary_sin.dtype)}"
            )
    _check_dtype(length, (torch.int64,), "length")
    _check_same_device(length, query, "length", "query")
    if length.dim() != 0:
        raise ValueError(f"length must be an int or a 0-d tensor, got shape {list(length.shape)}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    capturing = length.is_cuda and torch.cuda.is_current_stream_capturing()
    if not capturing and not 1 <= int(length) <= slots:
        raise ValueError(f"length must be in [1, slots = {slots}], got {int(length)}")


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The models' rotary embedding of ``x [B, heads, D]`` in float32 (float64 for float64), or
    in x's bf16 / fp16 where the tables come in it (a half model's own), rounded back to x's
    dtype: the same element-wise ops, so the same roundings."""
    compute = x.dtype if cos.dtype == x.dtype else _result_dtype(x)
    x32 = x.to(compute)
    half = x.shape[-1] // 2
    turned = torch.cat((-x32[..., half:], x32[..., :half]), dim=-1)
    cos, sin = cos.to(compute)[:, None], sin.to(compute)[:, None]
    return (x32 * cos + turned * sin).to(x.dtype)


def decode_attention(
    query: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    *,
    length: torch.Tensor,
    new_k: torch.Tensor | None = None,
    new_v: torch.Tensor | None = None,
    slot_mask: torch.Tensor | None = None,
    rotary_cos: torch.Tensor | None = None,
    rotary_sin: torch.Tensor | None = None,
    scale: float,
) -> torch.Tensor:
    """Attention of one query token per row over slots ``[0, length)`` of a KV cache, in float32
    (float64 for float64 inputs); rotates the query and new_k first when given the rotary
    tables, and writes new_k / new_v at slot ``length - 1``. No host synchronization while a
    CUDA graph is captured (the length stays on the device)."""
    _check_decode_attention(
        query, cache_k, cache_v, new_k, new_v, slot_mask, rotary_cos, rotary_sin, length, scale
    )
    if rotary_cos is not None:
        query = _rotary(query, rotary_cos, rotary_sin)
        if new_k is not None:
            new_k = _rotary(new_k, rotary_cos, rotary_sin)
    rows, heads, head_dim = query.shape
    kv_heads, slots = cache_k.shape[1], cache_k.shape[2]
    if new_k is not None:
        newest = (length - 1).reshape(1)
        cache_k.index_copy_(2, newest, new_k[:, :, None])
        cache_v.index_copy_(2, newest, new_v[:, :, None])
    compute = _result_dtype(query)
    allowed = torch.arange(slots, device=query.device) < length
    if slot_mask is not None:
        allowed = allowed & slot_mask
    allowed = allowed.expand(rows, slots)[:, None, :, None]  # [rows, 1, slots, 1]
    # Slots never attended may hold anything (even NaN): they are zeroed, not multiplied by 0.
    keys = cache_k.to(compute).masked_fill(~allowed, 0)
    values = cache_v.to(compute).masked_fill(~allowed, 0)
    scale = scale if compute == torch.float64 else as_float32(scale)  # what the kernels get
    q = query.to(compute).view(rows, kv_heads, heads // kv_heads, head_dim) * scale
    scores = (q @ keys.transpose(-1, -2)).masked_fill(~allowed.transpose(-1, -2), -math.inf)
    top = scores.amax(-1, keepdim=True)
    top = torch.where(top == -math.inf, 0.0, top)  # no allowed slot: zeros, not NaN
    weights = torch.exp(scores - top)
    total = weights.sum(-1, keepdim=True)
    out = (weights @ values) / torch.where(total > 0, total, 1.0)
    return out.reshape(rows, heads, head_dim).to(query.dtype)


# ----------------------------------------------------------------------------- RMSNorm
def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, *, residual: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * (s / sqrt(mean(s^2) + eps)).to(dtype), s) with s = x (+ residual), in float32
    with the mean of squares in float64 (all float64 for float64 inputs); s is empty without a
    residual."""
    _check_dtype(x, (*_FLOAT_DTYPES, torch.float64), "x")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension, got shape {list(x.shape)}")
    _check_like(weight, x, "weight", "x")
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"weight must have shape [D] = [{x.shape[-1]}], got {list(weight.shape)}")
    if residual is not None:
        _check_like(residual, x, "residual", "x")
        if residual.shape != x.shape:
            raise ValueError(
                f"residual must have the shape of x {list(x.shape)}, got {list(residual.shape)}"
            )
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    total = x + residual if residual is not None else x.new_empty(0)
    s = total if residual is not None else x
    if x.dtype == torch.float64:
        inverse = torch.rsqrt((s * s).mean(-1, keepdim=True) + eps)
        return weight * (s * inverse), total
    v = s.float()
    mean = (v.double() * v.double()).mean(-1, keepdim=True).float()
    inverse = 1.0 / torch.sqrt(mean + as_float32(eps))
    return (weight.float() * (v * inverse).to(x.dtype).float()).to(x.dtype), total


# ----------------------------------------------------------------------------- silu_mul
def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` with the models' roundings (torch's own silu and product)."""
    _check_dtype(gate, (*_FLOAT_DTYPES, torch.float64), "gate")
    _check_like(up, gate, "up", "gate")
    if up.shape != gate.shape:
        raise ValueError(f"up must have the shape of gate {list(gate.shape)}, got {list(up.shape)}")
    return torch.nn.functional.silu(gate) * up

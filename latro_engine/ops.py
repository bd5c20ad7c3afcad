"""The tensor ops of latro_engine: one documented wrapper per op.

Each wrapper runs the native kernel (``torch.ops.latro_engine.*``) or the pure-torch reference
in :mod:`latro_engine.reference`, chosen per call by :func:`latro_engine._extension.use_native`.
Both backends return the same results and raise the same errors (``TypeError`` for a wrong
dtype, ``ValueError`` for other bad input, each naming the argument).

On CUDA, errors that depend on tensor contents (a target out of range, a NaN logit, an offset
held on the device) are found by the kernels; to raise them the op waits for the GPU once per
call. It never waits while a CUDA graph is being captured, nor with ``LATRO_CUDA_CHECKS=off``
(for decode loops): bad rows then come back as NaN log-probabilities or id -1 instead.
"""

from __future__ import annotations

import math
import operator
import struct
from collections.abc import Sequence
from functools import lru_cache

import torch

from latro_engine import reference
from latro_engine._extension import native_available, use_native

__all__ = [
    "StopSequences",
    "decode_attention",
    "latro_rewards",
    "linear_token_logprobs",
    "linear_weighted_logprob_sum",
    "rms_norm",
    "silu_mul",
    "rloo_advantages",
    "sample",
    "stop_positions",
    "stop_positions_step",
    "token_logprobs",
]


def token_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100
) -> torch.Tensor:
    """Log-probability of each target token.

    Args:
        logits: ``[..., V]`` float32, bfloat16 or float16 (any strides); float64 runs the
            reference on every backend (for gradcheck and oracles).
        targets: int64 ``[...]`` (``logits.shape[:-1]``), each in ``[0, V)`` or ``ignore_index``.
    Returns:
        float32 ``[...]``: ``log_softmax(logits.float(), -1)`` gathered at ``targets``, 0 where
        the target is ``ignore_index``. Differentiable w.r.t. ``logits``. The native forward
        reads the logits once (online log-sum-exp in float32) and keeps no ``[..., V]`` copy.
    """
    ignore_index = _int_arg(ignore_index, "ignore_index")
    if use_native(logits.device) and logits.dtype != torch.float64:
        return torch.ops.latro_engine.token_logprobs(logits, targets, ignore_index)[0]
    return reference.token_logprobs(logits, targets, ignore_index=ignore_index)


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Token log-probabilities straight from hidden states and an LM head.

    Args:
        hidden: ``[N, D]``; weight: ``[V, D]``; bias: optional ``[V]`` (all one float dtype;
            float64 runs the reference on every backend).
        targets: int64 ``[N]``.
        chunk_size: bounds the logits held at once to about ``chunk_size x V`` (default: about
            512 MiB of logits in their dtype); the native op holds them as vocabulary blocks of
            all N rows (multiples of 128 columns but the last), so each pass reads the LM head
            once. Rows whose log-sum-exp is extreme (|lse| >= 64) are redone over whole rows,
            ``chunk_size`` at a time.
    Returns:
        float32 ``[N]`` equal to ``token_logprobs(hidden @ weight.T + bias, targets)`` while never
        holding more than about ``chunk_size x V`` logits. Differentiable w.r.t. hidden, weight and
        bias; the backward recomputes each chunk and accepts any per-token upstream gradient.
    """
    chunk_size, ignore_index = _chunk_size(chunk_size), _int_arg(ignore_index, "ignore_index")
    if use_native(hidden.device) and hidden.dtype != torch.float64:
        return torch.ops.latro_engine.linear_token_logprobs(
            hidden, weight, bias, targets, chunk_size or 0, ignore_index
        )[0]
    return reference.linear_token_logprobs(
        hidden, weight, targets, bias=bias, chunk_size=chunk_size, ignore_index=ignore_index
    )


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
    """A loss linear in the token log-probabilities, ``sum_i token_weights_i * logp_i``, with its
    gradient computed in the forward.

    When the coefficients of a loss are known before its forward (LaTRO's, once the advantages
    are: see :func:`latro_engine.objective.loss_weights`), the gradient w.r.t. the logits of
    each row, ``w_i (onehot - softmax)``, can be formed as soon as the row's logits are, so the
    native op takes the forward and the backward in one pass: three matmuls per chunk of rows
    (logits, hidden gradient, weight gradient) where :func:`linear_token_logprobs` followed by
    its backward does four (it must recompute the logits). The backward then only scales the
    stored gradients by the upstream gradient of the total.

    Args:
        hidden, weight, targets, bias, ignore_index: as :func:`linear_token_logprobs`.
        token_weights: floating ``[N]`` (used in float32; float64 with float64 inputs): the
            loss's coefficients, not differentiated.
        chunk_size: rows per chunk, about ``chunk_size x V`` logits held at once (default: about
            512 MiB of logits). With gradients, every chunk reads the LM head three times and
            adds into the weight gradient in the weight's dtype (bf16: one rounding per chunk, as
            accumulating micro-batch gradients in a bf16 ``.grad``); without, the op is
            :func:`linear_token_logprobs`' forward.
    Returns:
        ``(total, logprobs)``: the float32 0-d total, differentiable w.r.t. hidden, weight and
        bias (the gradients wanted are those of the inputs that require grad when grad mode is
        on; a graph through it can be backpropagated once), and the float32 ``[N]``
        log-probabilities, without gradient (0 where ignored). Ignored rows add nothing.
    """
    chunk_size, ignore_index = _chunk_size(chunk_size), _int_arg(ignore_index, "ignore_index")
    if not isinstance(token_weights, torch.Tensor) or not token_weights.is_floating_point():
        what = token_weights.dtype if isinstance(token_weights, torch.Tensor) else type(token_weights)
        raise TypeError(f"token_weights must be a floating tensor, got {what}")
    token_weights = token_weights.detach()  # coefficients of the loss, not differentiated
    if use_native(hidden.device) and hidden.dtype != torch.float64:
        grad = torch.is_grad_enabled()
        wants = [grad and t is not None and t.requires_grad for t in (hidden, weight, bias)]
        total, logprobs, *_ = torch.ops.latro_engine.linear_weighted_logprob_sum(
            hidden, weight, bias, targets, token_weights.to(torch.float32), chunk_size or 0,
            ignore_index, *wants,
        )
        return total, logprobs
    return reference.linear_weighted_logprob_sum(
        hidden, weight, targets, token_weights, bias=bias, chunk_size=chunk_size,
        ignore_index=ignore_index,
    )


# ----------------------------------------------------------------------------- scalar arguments
# Checked here, for both backends alike: the native ops take int64 and float arguments, and
# pybind's own errors for what does not fit name no argument.
_INT64 = (-(2**63), 2**63 - 1)


def _int_arg(value: object, name: str) -> int:
    """``value`` as an int64: Python and NumPy ints and integer 0-d tensors pass; floats, bools
    and text are a TypeError (``int()`` would silently run 2.5 as 2, and True as 1)."""
    if not isinstance(value, bool) and getattr(value, "dtype", None) != torch.bool:
        try:
            number = operator.index(value)
        except TypeError:
            pass
        else:
            if not _INT64[0] <= number <= _INT64[1]:
                raise ValueError(f"{name} must fit in int64, got {number}")
            return number
    raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")


def _float_arg(value: object, name: str) -> float:
    """``value`` as a float: ints, floats and 0-d tensors of them, not bools or text."""
    if not isinstance(value, (bool, str, bytes)):
        try:
            return float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            pass
    raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")


def _float32_finite(value: float) -> bool:
    """Whether ``value`` stays finite as the float32 the kernels compute with (1e39 does not)."""
    return math.isfinite(struct.unpack("f", struct.pack("f", value))[0])


def check_top_k(top_k: object) -> int:
    """``top_k`` as an int (see _int_arg); the rollout checks it before keying its decoder."""
    return _int_arg(top_k, "top_k")


def _chunk_size(chunk_size: object) -> int | None:
    if chunk_size is None:
        return None
    chunk_size = _int_arg(chunk_size, "chunk_size")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive (or None), got {chunk_size}")
    return chunk_size


def _device_int(value: int | torch.Tensor, device: torch.device, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int or an int64 tensor, got {type(value).__name__}")
    if not _INT64[0] <= value <= _INT64[1]:
        raise ValueError(f"{name} must fit in 64 bits, got {value}")
    return torch.tensor(value, dtype=torch.int64, device=device)


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
    """Draws one token per row.

    Args:
        logits: ``[B, V]`` float32, bfloat16 or float16.
        seed: an int (one stream per row index) or an int64 tensor ``[B]`` (each row its own
            seed, so a row's draws do not depend on where it sits in the batch).
        offset: the decode step, an int or a 0-d int64 tensor on the logits' device (keeps the
            device path free of host synchronization and CUDA-graph capturable; an int is
            copied to the device on every call, and a seed too).
        temperature: 0 means greedy. top_k (an int, 0 = off), top_p (1 = off), min_p (0 = off):
            top-k and min-p first, then top-p over the renormalized survivors; ties at a
            threshold are kept.
    Returns:
        ``(ids, logprobs)``: int64 ``[B]`` and the float32 log-probability of each id under the
        distribution actually sampled from (0 for greedy). Counter-based (Philox) Gumbel-max:
        the same inputs give the same ids on every call and backend; never an id outside the
        kept set or of probability 0.
    """
    logits = logits.detach()
    if isinstance(offset, int) and not isinstance(offset, bool) and offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")  # before any kernel, any batch
    top_k = check_top_k(top_k)
    temperature = _float_arg(temperature, "temperature")
    top_p, min_p = _float_arg(top_p, "top_p"), _float_arg(min_p, "min_p")
    if isinstance(seed, int) and 2**63 <= seed < 2**64:
        seed -= 2**64  # a uint64 seed: the same 64 bits as an int64
    seed_t = _device_int(seed, logits.device, "seed")
    offset_t = _device_int(offset, logits.device, "offset")
    if use_native(logits.device):
        return torch.ops.latro_engine.sample(
            logits, seed_t, offset_t, temperature, top_k, top_p, min_p
        )
    return reference.sample(
        logits,
        seed=seed_t,
        offset=offset_t,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
    )


class StopSequences:
    """Stop sequences packed for the ops: flat token ids and offsets on one device.

    Build it once per decode loop; the stop ops also accept a plain list of token-id lists.
    """

    def __init__(self, sequences: Sequence[Sequence[int]], device: torch.device | str = "cpu"):
        self.sequences = reference.check_stop_sequences(sequences)
        flat = [t for seq in self.sequences for t in seq]
        offsets = [0]
        for seq in self.sequences:
            offsets.append(offsets[-1] + len(seq))
        self.tokens = torch.tensor(flat, dtype=torch.int64, device=device)
        self.offsets = torch.tensor(offsets, dtype=torch.int64, device=device)

    def __len__(self) -> int:
        return len(self.sequences)

    def __repr__(self) -> str:
        return f"StopSequences({self.sequences})"


@lru_cache(maxsize=64)
def _packed(sequences: tuple[tuple[int, ...], ...], device: torch.device) -> StopSequences:
    return StopSequences(sequences, device)


def _as_stop_sequences(
    stops: Sequence[Sequence[int]] | StopSequences, device: torch.device
) -> StopSequences:
    if isinstance(stops, StopSequences):
        if stops.tokens.device != device:
            raise ValueError(
                f"stop_sequences are on {stops.tokens.device} but tokens are on {device}"
            )
        return stops
    checked = reference.check_stop_sequences(stops)
    return _packed(tuple(tuple(seq) for seq in checked), device)


def stop_positions(
    tokens: torch.Tensor,
    stop_sequences: Sequence[Sequence[int]] | StopSequences,
    *,
    start: int = 0,
) -> torch.Tensor:
    """Where each row's earliest stop sequence begins.

    Args:
        tokens: int64 ``[B, T]``. stop_sequences: token-id lists (each non-empty).
        start: occurrences must begin at or after this index.
    Returns:
        int64 ``[B]``: the start index of the earliest occurrence of any stop sequence, or T.
    """
    if not isinstance(tokens, torch.Tensor):
        raise TypeError("tokens must be an int64 tensor")
    stops = _as_stop_sequences(stop_sequences, tokens.device)
    start = _int_arg(start, "start")
    if use_native(tokens.device):
        return torch.ops.latro_engine.stop_positions(tokens, stops.tokens, stops.offsets, start)
    return reference.stop_positions(tokens, stops.sequences, start=start)


def stop_positions_step(
    tokens: torch.Tensor,
    stop_sequences: Sequence[Sequence[int]] | StopSequences,
    *,
    step: int | torch.Tensor,
    positions: torch.Tensor,
    start: int = 0,
) -> torch.Tensor:
    """The incremental form of :func:`stop_positions` for decode loops.

    Only stop sequences that end exactly at ``step`` (the newest token) are checked. Rows whose
    ``positions`` entry is still T (not stopped) get the start of the first stop sequence (in
    list order) ending there and beginning at or after ``start``; other rows keep theirs.
    Called at every step it reports where each row first *completed* a stop sequence, which is
    what a decode loop can know (it can differ from :func:`stop_positions` only when a longer
    stop sequence that began earlier completes later).
    Returns the new positions, int64 ``[B]``.
    """
    if not isinstance(tokens, torch.Tensor):
        raise TypeError("tokens must be an int64 tensor")
    stops = _as_stop_sequences(stop_sequences, tokens.device)
    step_t = _device_int(step, tokens.device, "step")
    start = _int_arg(start, "start")
    if use_native(tokens.device):
        return torch.ops.latro_engine.stop_positions_step(
            tokens, stops.tokens, stops.offsets, step_t, positions, start
        )
    return reference.stop_positions_step(
        tokens, stops.sequences, step=step_t, positions=positions, start=start
    )


def decode_attention(
    query: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    *,
    length: int | torch.Tensor,
    new_k: torch.Tensor | None = None,
    new_v: torch.Tensor | None = None,
    slot_mask: torch.Tensor | None = None,
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of one new token per row against a static KV cache (a decode step).

    Args:
        query: ``[B, H, D]`` float32, bfloat16 or float16 (float64 runs the reference);
            D <= 256.
        cache_k, cache_v: ``[B, G, S, D]`` of query's dtype, dense within each row (rows of a
            contiguous cache, e.g. ``cache[:b]``); G divides H and query head h reads KV head
            ``h // (H // G)``, as grouped-query attention does.
        length: slots ``[0, length)`` are attended, ``1 <= length <= S``; an int or a 0-d int64
            tensor on the query's device (the device form keeps a decode step free of host
            synchronization and CUDA-graph capturable).
        new_k, new_v: optional ``[B, G, D]``: the new token's key and value, written into the
            caches at slot ``length - 1`` (in place) before attending.
        slot_mask: optional bool ``[B, S]``: the slots each row may attend (false for the padding
            of a left-padded prompt). A row with no allowed slot gets zeros.
        rotary: optional ``(cos, sin)``, ``[B, D]``, D even, float32 or of the query's dtype:
            the query and new_k are rotated first, ``x * cos + rotate_half(x) * sin``, rounded
            as torch's element-wise ops round them on tables of that dtype (float32 products
            and sum; with a bf16 / fp16 model's own tables, each product and the sum rounded to
            that dtype, as the model's forward does), then to the query's dtype; the cache
            receives the rotated key. This is the models' rotary embedding fused into the op
            (without it, pass query and new_k already rotated).
        scale: the softmax scale, ``D ** -0.5`` by default.
    Returns:
        ``[B, H, D]`` in query's dtype: ``softmax(scale * q . K) V`` over the allowed slots, in
        float32 arithmetic. The native kernels read each key and value of ``[0, length)`` once
        for all the query heads that share it and never touch the slots beyond the length.
        No gradient (it serves decoding).
    """
    if isinstance(query, torch.Tensor) and query.dim() == 3 and 0 in query.shape[1:]:
        raise ValueError(f"query needs heads and head_dim >= 1, got shape {list(query.shape)}")
    if scale is None:
        scale = query.shape[-1] ** -0.5
    scale = _float_arg(scale, "scale")
    if not _float32_finite(scale):
        raise ValueError(f"scale must be finite (in float32), got {scale}")
    query = query.detach()
    new_k = None if new_k is None else new_k.detach()
    new_v = None if new_v is None else new_v.detach()
    cos, sin = (None, None) if rotary is None else rotary
    length_t = _device_int(length, query.device, "length")
    if use_native(query.device) and query.dtype != torch.float64:
        return torch.ops.latro_engine.decode_attention(
            query, cache_k, cache_v, new_k, new_v, slot_mask, cos, sin, length_t, scale
        )
    return reference.decode_attention(
        query,
        cache_k,
        cache_v,
        length=length_t,
        new_k=new_k,
        new_v=new_v,
        slot_mask=slot_mask,
        rotary_cos=cos,
        rotary_sin=sin,
        scale=scale,
    )


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, *, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The RMSNorm of Llama-family models, optionally fused with the residual addition before it.

    Args:
        x: ``[..., D]`` float32, bfloat16 or float16 (float64 runs the reference).
        weight: ``[D]`` of x's dtype. eps: finite, >= 0.
        residual: optional, x's shape and dtype: the norm is then of ``s = x + residual``.
    Returns:
        ``weight * (s / sqrt(mean(s^2) + eps)).to(dtype)`` with the models' roundings (float32
        arithmetic, the mean of squares summed in float64); with a residual, the pair
        ``(normed, s)``. One kernel on CUDA where the models' forward takes five. No gradient
        (it serves decoding).
    """
    eps = _float_arg(eps, "eps")
    if not (_float32_finite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and >= 0 (as a float32), got {eps}")
    x, weight = x.detach(), weight.detach()
    residual = None if residual is None else residual.detach()
    if use_native(x.device) and x.dtype != torch.float64:
        out, total = torch.ops.latro_engine.rms_norm(x, weight, residual, eps)
    else:
        out, total = reference.rms_norm(x, weight, residual=residual, eps=eps)
    return out if residual is None else (out, total)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, the gated MLP's activation, as the models compute it: the silu in
    float32 rounded to the dtype, then the product rounded (float32, bfloat16 or float16, one
    shape; float64 runs the reference). One kernel on CUDA where the models' forward takes two.
    No gradient (it serves decoding)."""
    gate, up = gate.detach(), up.detach()
    if use_native(gate.device) and gate.dtype != torch.float64:
        return torch.ops.latro_engine.silu_mul(gate, up)
    return reference.silu_mul(gate, up)


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """Leave-one-out advantages: ``A_i = r_i - (sum of its group - r_i) / (k - 1)``.

    rewards: float32 ``[G * k]``, grouped contiguously by prompt (k samples each; float64 runs
    the reference on every backend); k >= 2.
    """
    rewards, k = rewards.detach(), _int_arg(k, "k")
    if use_native(rewards.device) and rewards.dtype != torch.float64:
        return torch.ops.latro_engine.rloo_advantages(rewards, k)
    return reference.rloo_advantages(rewards, k)


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
    """LaTRO's per-sample reward, float32 ``[N]``.

    ``r = R - kl_coef * (rationale_logp - ref_rationale_logp)``, the self-reward ``R`` being
    ``answer_logp`` for rows that finished; rows that never stopped get a penalty instead of it
    (the KL term stays, as in the reference code): ``nonstop_penalty``
    (``penalty_mode="constant"``) or ``nonstop_penalty * mean(answer_logp)`` over all rows
    (``"batch_mean"``, the reference code's choice). ``finished`` is bool ``[N]``; the
    log-probabilities float32 (float64 runs the reference on every backend). No gradient flows
    through the result.
    """
    answer_logp, rationale_logp, ref_rationale_logp = (
        answer_logp.detach(),
        rationale_logp.detach(),
        ref_rationale_logp.detach(),
    )
    kl_coef = _float_arg(kl_coef, "kl_coef")
    nonstop_penalty = _float_arg(nonstop_penalty, "nonstop_penalty")
    if not isinstance(penalty_mode, str):
        raise TypeError(f"penalty_mode must be a string, got {type(penalty_mode).__name__}")
    if use_native(answer_logp.device) and answer_logp.dtype != torch.float64:
        return torch.ops.latro_engine.latro_rewards(
            answer_logp,
            rationale_logp,
            ref_rationale_logp,
            finished,
            kl_coef,
            nonstop_penalty,
            penalty_mode,
        )
    return reference.latro_rewards(
        answer_logp,
        rationale_logp,
        ref_rationale_logp,
        finished,
        kl_coef=kl_coef,
        nonstop_penalty=nonstop_penalty,
        penalty_mode=penalty_mode,
    )


if native_available():
    from latro_engine import _registration  # noqa: F401  (fake kernels and autograd)

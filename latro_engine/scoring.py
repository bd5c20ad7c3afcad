"""Self-reward scoring: log p(z|x) and log p(y|x,z) from ONE forward pass per model.

The reference code runs separate no-grad forwards over [x, z] and [x, z, y], each with a float32
log_softmax over the whole vocabulary and sequence (see /work/shared/LATRO.md). A causal model
gives both sums from a single pass over [x, z, y]: the positions that predict z see only x and
the earlier z tokens. Here that pass runs the decoder body only (no LM head), gathers the hidden
states at the positions that predict rationale and answer tokens, and feeds just those rows to
:func:`latro_engine.ops.linear_token_logprobs`, which never holds [tokens, V] logits in float32.

Rows are right-padded: each starts with its prompt's tokens (its pads dropped) at column 0, and
its position ids are ``cumsum(mask) - 1`` clamped at 0, which is what sampling used, so scores
match the sampler's view of each sequence. The forward gets no attention mask: under causal
attention no real token sees the pads after it. (The reference code pads on the left and masks
the pads; the sums are the same, but a pad query then sees no key at all, which some attention
kernels turn into NaN: see :func:`_attention_width` and :func:`scoring_attention`.)
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from latro_engine import ops
from latro_engine.offload import visiting
from latro_engine.rollout import Rollout, prompt_mask_flags, raise_for_prompt_mask

logger = logging.getLogger(__name__)

__all__ = [
    "SequenceScores",
    "as_padded",
    "length_batches",
    "pack_sequences",
    "reference_logprobs",
    "reference_model",
    "score_reference",
    "score_rollout",
    "score_sequences",
    "scoring_attention",
]

#: Config fields that transform the LM head's output (soft-capping, scaling); a model that sets
#: one of them to a non-neutral value is scored through its full logits.
_LOGIT_TRANSFORMS: dict[str, object] = {
    "final_logit_softcapping": None,
    "logit_scale": 1.0,
    "logits_scaling": 1.0,
    "scale_width": 1.0,
    "dim_model_base": None,
}

# model -> whether hidden @ lm_head.weight.T (+ bias) reproduces its logits (checked once).
_fast_path_ok: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class SequenceScores:
    """Per-row sums, float32 ``[B]`` (differentiable when computed with grad), and counts.

    Attributes:
        rationale_logp: sum of log p(z_t | x, z_<t) over the rationale tokens (0 if empty).
        answer_logp: sum of log p(y_t | x, z, y_<t) over the answer tokens (0 if not scored).
        rationale_tokens, answer_tokens: int64 ``[B]`` token counts.
        loss: with ``loss_weights`` (see :func:`score_sequences`), the float32 0-d
            ``sum_b rationale_weight_b * rationale_logp_b + answer_weight_b * answer_logp_b``,
            which then alone carries the gradient; else None.
    """

    rationale_logp: torch.Tensor
    answer_logp: torch.Tensor
    rationale_tokens: torch.Tensor
    answer_tokens: torch.Tensor
    loss: torch.Tensor | None = None


def as_padded(
    seqs: torch.Tensor | Sequence[Sequence[int]] | None,
    lengths: torch.Tensor | None,
    rows: int,
    group_size: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, A], lengths [B]) from token lists or a right-padded tensor plus lengths.

    Per-prompt answers (``rows / group_size`` of them) are repeated over the prompt's samples.
    """
    if lengths is not None and not isinstance(seqs, torch.Tensor):
        # token lists carry their lengths; silently ignoring these would hide a caller's mistake
        raise ValueError("answer_lengths is only for a right-padded answer_ids tensor, got "
                         f"answer_ids as {'None' if seqs is None else 'token lists'}")
    if seqs is None:
        return torch.zeros(rows, 0, dtype=torch.int64, device=device), torch.zeros(
            rows, dtype=torch.int64, device=device)
    if isinstance(seqs, torch.Tensor):
        _check_integer(seqs, "answer_ids")
        if seqs.dim() != 2:
            raise ValueError(f"answer_ids must be [B, A], got {list(seqs.shape)}")
        ids = seqs.to(device=device, dtype=torch.int64)
        if lengths is None:
            lens = torch.full((ids.shape[0],), ids.shape[1], dtype=torch.int64, device=device)
        else:
            _check_integer(lengths, "answer_lengths", (ids.shape[0],))
            lens = lengths.to(device=device, dtype=torch.int64)
    else:
        lists = [list(map(int, s)) for s in seqs]
        width = max((len(s) for s in lists), default=0)
        ids = torch.zeros(len(lists), width, dtype=torch.int64)
        for i, s in enumerate(lists):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.int64)
        ids, lens = ids.to(device), torch.tensor([len(s) for s in lists], dtype=torch.int64, device=device)
    if ids.shape[0] != rows:
        if group_size > 1 and ids.shape[0] * group_size == rows:
            ids, lens = ids.repeat_interleave(group_size, 0), lens.repeat_interleave(group_size, 0)
        else:
            raise ValueError(f"expected {rows} answers (one per row) or {rows // max(group_size, 1)} "
                             f"(one per prompt), got {ids.shape[0]}")
    return ids, lens


def _check_integer(
    value: object, name: str, shape: tuple[int, ...] | None = None, device: torch.device | None = None
) -> None:
    """TypeError unless ``value`` is an integer tensor; ValueError unless it has ``shape`` and
    is on ``device`` (each when given)."""
    dtype = value.dtype if isinstance(value, torch.Tensor) else None
    if dtype is None or dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got "
                        f"{dtype if dtype is not None else type(value).__name__}")
    if shape is not None and tuple(value.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(value.shape)}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} is on {value.device} but prompt_ids is on {device}")


def _check_lengths(lengths: torch.Tensor, ids: torch.Tensor, name: str, ids_name: str) -> None:
    """ValueError naming the first row whose length is outside ``[0, ids.shape[1]]``."""
    bad = ((lengths < 0) | (lengths > ids.shape[1])).nonzero()
    if len(bad):
        row = int(bad[0])
        raise ValueError(f"{name} must be in [0, {ids.shape[1]}] (the width of {ids_name}), "
                         f"got {int(lengths[row])} for row {row}")


# Scoring forwards on CUDA run at widths of whole steps of this many tokens (see _attention_width).
ATTENTION_WIDTH_STEP = 32


def _attention_width(width: int, device: torch.device) -> int:
    """The width a scoring forward over rows of at most ``width`` tokens runs at (the extra
    columns are padding): ``width`` on the CPU; on CUDA the next multiple of 32 tokens that is
    not 64 mod 128. PyTorch 2.11's cuDNN attention returns NaN query gradients at sequence
    lengths of 64 mod 128 when a row's log-sum-exp is below about -88.7, as a query that sees
    no key has (pytorch/pytorch#196678): with left padding that made the LaTRO step's weights
    NaN on the H100 run of 2026-11-27, and this rule fixed it on the run after. Right padding
    (every query sees its row's first token) and :func:`scoring_attention` (no cuDNN) now keep
    scoring away from that bug twice over; the widths stay in whole steps so that the kernels
    and library plans a scoring forward needs are few (cuDNN and torch.compile build one per
    new length)."""
    if device.type != "cuda" or width == 0:
        return width
    step = ATTENTION_WIDTH_STEP
    padded = -(-width // step) * step
    return padded + step if padded % 128 == 64 else padded


# LATRO_SCORING_ATTENTION=default leaves the choice of SDPA kernel to torch (see scoring_attention).
SCORING_ATTENTION_ENV = "LATRO_SCORING_ATTENTION"


@contextmanager
def scoring_attention(device: torch.device) -> Iterator[None]:
    """Scoring and training forwards on CUDA (and the recomputing backwards of activation
    checkpointing: the trainer wraps its backward too) run torch's SDPA without its cuDNN
    backend: flash attention (the scoring forwards pass no mask), else the memory-efficient
    kernel, else the math one, of those the caller left enabled. On the H100 run of 2026-11-27
    each cuDNN attention call took 0.74 ms of host time forward and 0.52 ms backward (its graph
    and plan lookups), about 20 ms of every 62 ms training micro-batch of a LaTRO step with
    stopping rationales, which the host, not the GPU, paced; the attention's GPU time was 2% of
    that step. PyTorch 2.11's cuDNN attention also has the NaN bug :func:`_attention_width`
    describes. ``LATRO_SCORING_ATTENTION=default`` leaves the choice to torch; elsewhere than
    CUDA this does nothing. The flags are torch's process-wide ones (which is also why the
    backward, which autograd runs on a thread of its own per device, sees them)."""
    if device.type != "cuda" or os.environ.get(SCORING_ATTENTION_ENV, "") == "default":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    flags = torch.backends.cuda
    backends = [
        backend
        for backend, enabled in (
            (SDPBackend.FLASH_ATTENTION, flags.flash_sdp_enabled()),
            (SDPBackend.EFFICIENT_ATTENTION, flags.mem_efficient_sdp_enabled()),
            (SDPBackend.MATH, flags.math_sdp_enabled()),
        )
        if enabled
    ]
    if not backends:  # the caller allows cuDNN alone: leave it so
        yield
        return
    with sdpa_kernel(backends):
        yield


def length_batches(
    lengths: Sequence[int],
    max_rows: int | None = None,
    max_tokens: int | None = None,
    device: torch.device | None = None,
) -> list[list[int]]:
    """The row indices in order of length (stable), cut into batches of at most ``max_rows``
    rows whose padded size, rows x the width a forward over them runs at (the longest row's
    tokens, on ``device`` rounded up as :func:`score_sequences` pads them), is at most
    ``max_tokens`` (a row wider than that alone). None or 0: no limit. A batch is as wide as
    its longest row, so rows of similar length share one; a token budget keeps each batch's
    activations alike whether its rows are short or long (many short rows, few long ones)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:  # ascending: the row that joins is the batch's longest
        width = lengths[i] if device is None else _attention_width(lengths[i], device)
        full = bool(max_rows) and len(current) >= max_rows
        too_wide = bool(max_tokens) and (len(current) + 1) * width > max_tokens
        if current and (full or too_wide):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def pack_sequences(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    rationale_ids: torch.Tensor,
    rationale_lengths: torch.Tensor,
    answer_ids: torch.Tensor,
    answer_lengths: torch.Tensor,
    pad_token_id: int = 0,
    *,
    longest: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Builds right-padded ``[x (non-pad), z[:len], y[:len]]`` rows, as wide as the longest
    (on CUDA rounded up: see :func:`_attention_width`).

    Returns ``(input_ids [B, T], attention_mask [B, T], rationale_start [B], answer_start [B])``
    where the starts are column indices of the first rationale / answer token in each row.
    Vectorized: every token's destination column is computed from per-row lengths, no loop.
    ``longest``: the longest row's tokens when the caller has it on the host (else read from
    the device: one wait). Inputs are not checked here: :func:`score_sequences` checks them.
    """
    device = prompt_ids.device
    rows = prompt_ids.shape[0]
    prompt_mask = prompt_mask.long()
    p_len = prompt_mask.sum(-1)
    r_len, a_len = rationale_lengths.long(), answer_lengths.long()
    if longest is None:
        longest = int((p_len + r_len + a_len).max()) if rows else 0
    width = _attention_width(longest, device)
    # One column more than the rows need: the tokens not placed (pads of the inputs) are
    # scattered there and dropped, so placing needs no data-dependent shape (no wait for the
    # device, as nonzero has).
    ids = torch.full((rows, width + 1), pad_token_id, dtype=torch.int64, device=device)
    mask = torch.zeros((rows, width + 1), dtype=torch.int64, device=device)

    def place(src: torch.Tensor, valid: torch.Tensor, column: torch.Tensor) -> None:
        dest = torch.where(valid, column, width)
        ids.scatter_(1, dest, torch.where(valid, src.long(), pad_token_id))
        mask.scatter_(1, dest, valid.long())

    # Every row starts at column 0 (right padding): its prompt, then its rationale, its answer.
    place(prompt_ids, prompt_mask.bool(), prompt_mask.cumsum(-1) - 1)  # any padding side
    r_cols = torch.arange(rationale_ids.shape[1], device=device).expand(rows, -1)
    place(rationale_ids, r_cols < r_len[:, None], r_cols + p_len[:, None])
    a_cols = torch.arange(answer_ids.shape[1], device=device).expand(rows, -1)
    place(answer_ids, a_cols < a_len[:, None], a_cols + (p_len + r_len)[:, None])
    return ids[:, :width].contiguous(), mask[:, :width].contiguous(), p_len, p_len + r_len


def _decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The decoder body (hidden states out, no LM head) and the LM head."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or decoder is model:
        decoder = getattr(model, "model", None)
        if decoder is None:
            decoder = model.base_model
    return decoder, model.get_output_embeddings()


def _transforms_logits(model: torch.nn.Module) -> bool:
    config = model.config
    configs = [config]
    if hasattr(config, "get_text_config"):
        configs.append(config.get_text_config(decoder=True))
    for cfg in configs:
        for name, neutral in _LOGIT_TRANSFORMS.items():
            value = getattr(cfg, name, neutral)
            if value is not None and value != neutral:
                return True
    return False


@torch.no_grad()
def _probe_fast_path(model: torch.nn.Module, decoder: torch.nn.Module, head: torch.nn.Module) -> bool:
    """Checks once, on a 3-token input, that ``head(decoder(x))`` equals ``model(x).logits``.

    Catches output transforms the config list does not know. The probe avoids the pad id (its
    embedding may be all zeros, giving zero logits that hide any transform). Runs with dropout
    off and restores every module's train/eval flag afterwards.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        pad = getattr(model.config, "pad_token_id", None)
        probe = [t for t in range(1, 8) if t != pad and t < head.weight.shape[0]][:3] or [0]
        x = torch.tensor([probe], dtype=torch.int64, device=head.weight.device)
        logits = model(input_ids=x).logits.float()
        mine = head(decoder(input_ids=x).last_hidden_state).float()
        if logits.shape != mine.shape:
            return False
        # two matmul paths round differently; half precision needs a looser bound
        tol = 1e-3 if head.weight.dtype in (torch.float32, torch.float64) else 3e-2
        return bool((logits - mine).abs().max() <= tol * (1 + logits.abs().max()))
    finally:
        for m, mode in flags:
            m.training = mode


def _use_fast_path(model: torch.nn.Module, decoder: torch.nn.Module, head: torch.nn.Module) -> bool:
    if type(head) is not torch.nn.Linear or _transforms_logits(model):
        return False
    if model not in _fast_path_ok:
        _fast_path_ok[model] = _probe_fast_path(model, decoder, head)
        if not _fast_path_ok[model]:
            logger.warning("%s: LM head output is transformed; scoring through full logits",
                           type(model).__name__)
    return _fast_path_ok[model]


def _score_batch(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    r_start: torch.Tensor,
    r_len: torch.Tensor,
    a_start: torch.Tensor,
    a_len: torch.Tensor,
    fast_path: bool | None,
    chunk_size: int | None,
    loss_weights: tuple[torch.Tensor, torch.Tensor] | None,
    target_count: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Scores packed rows (:func:`pack_sequences`: each row's answer right after its rationale);
    ``target_count``: their rationale and answer tokens in all, known on the host, so that
    listing them waits for nothing."""
    rows = input_ids.shape[0]
    device = input_ids.device
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    # The scored tokens of row r are the columns [r_start, a_start + a_len): its rationale then
    # its answer, listed row by row (the order of nonzero on the mask of those columns).
    per_row = r_len + a_len
    row_idx = torch.repeat_interleave(torch.arange(rows, device=device), per_row,
                                      output_size=target_count)
    first = torch.cumsum(per_row, 0) - per_row  # each row's first entry in the list
    col_idx = r_start[row_idx] + torch.arange(target_count, device=device) - first[row_idx]
    # column c is predicted by the hidden state at c - 1 (prompts are non-empty, so c >= 1)
    targets = input_ids[row_idx, col_idx]
    is_answer = col_idx >= a_start[row_idx]

    # A loss linear in the sums is one with per-token weights: its row's weight for each token.
    token_weights = None
    if loss_weights is not None:
        rationale_w, answer_w = (w.to(torch.float32) for w in loss_weights)
        token_weights = torch.where(is_answer, answer_w[row_idx], rationale_w[row_idx])

    decoder, head = _decoder_and_head(model)
    if fast_path is None:
        fast_path = _use_fast_path(model, decoder, head)
    loss = None
    # No attention mask: rows are right-padded, so under causal attention no real token sees a
    # pad, and the scores and their gradients are those of the masked pass. Every query then
    # sees at least its row's first token, also in sliding-window layers (a padding mask would
    # leave a pad query past its row's window with no key: NaN in some kernels), and torch's
    # SDPA runs its causal flash kernel, with no mask to build or read.
    if fast_path:
        with scoring_attention(input_ids.device):
            hidden = decoder(input_ids=input_ids, attention_mask=None, position_ids=position_ids,
                             use_cache=False).last_hidden_state
        rows_h = hidden[row_idx, col_idx - 1].to(head.weight.dtype)  # autocast may differ
        if token_weights is None:
            logp = ops.linear_token_logprobs(rows_h, head.weight, targets, bias=head.bias,
                                             chunk_size=chunk_size)
        else:
            loss, logp = ops.linear_weighted_logprob_sum(
                rows_h, head.weight, targets, token_weights, bias=head.bias, chunk_size=chunk_size
            )
    else:
        with scoring_attention(input_ids.device):
            logits = model(input_ids=input_ids, attention_mask=None, position_ids=position_ids,
                           use_cache=False).logits
        logp = ops.token_logprobs(logits[row_idx, col_idx - 1], targets)
        if token_weights is not None:
            loss, logp = (logp * token_weights).sum(), logp.detach()
    zeros = logp.new_zeros(rows)
    rationale = zeros.index_add(0, row_idx, torch.where(is_answer, 0.0, logp))
    answer = zeros.index_add(0, row_idx, torch.where(is_answer, logp, 0.0))
    return rationale, answer, loss


def score_sequences(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    rationale_ids: torch.Tensor,
    rationale_lengths: torch.Tensor,
    answer_ids: torch.Tensor | Sequence[Sequence[int]] | None = None,
    answer_lengths: torch.Tensor | None = None,
    *,
    group_size: int = 1,
    micro_batch_size: int | None = None,
    max_tokens: int | None = None,
    fast_path: bool | None = None,
    chunk_size: int | None = None,
    loss_weights: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> SequenceScores:
    """log p(z|x) and log p(y|x,z) per row from one forward pass over ``[x, z, y]``.

    Args:
        model: a Hugging Face causal LM (or peft wrapper). Train/eval mode is the caller's.
        prompt_ids, prompt_mask: ``[B, P]`` (any padding side; each row >= 1 real token).
        rationale_ids: ``[B, L]`` right-padded; rationale_lengths: integer ``[B]``, each in
            ``[0, L]``.
        answer_ids: per-row answer tokens (e.g. " The answer is 7." + EOS), as token lists or a
            right-padded ``[B, A]`` tensor with ``answer_lengths`` (each in ``[0, A]``; default
            A; only with a tensor); per-prompt answers (B / group_size of them) are repeated.
            None scores the rationale only. Bad shapes, dtypes, lengths or devices raise a
            ValueError (TypeError for a dtype) naming the argument.
        micro_batch_size: rows per forward (default: all). Rows are sorted by length first so
            micro-batches carry little padding. With grad enabled every micro-batch's graph
            is kept until backward; use it to bound memory under ``torch.no_grad()``.
        max_tokens: tokens per forward, padding included (rows x the width the longest
            row's tokens run at; a wider row alone; None or 0: no limit), with
            ``micro_batch_size`` or alone (see :func:`length_batches`).
        fast_path: None picks automatically: decoder body + ``ops.linear_token_logprobs`` on
            the LM head, which never materializes ``[B, T, V]`` logits, unless the head is
            not a plain ``nn.Linear`` (e.g. LoRA on the head) or the model transforms its
            logits (Gemma-2 ``final_logit_softcapping``, Cohere ``logit_scale``, Granite
            ``logits_scaling``, or anything a one-time 2-token probe detects); those go
            through the full model and ``ops.token_logprobs`` on the gathered logits.
        chunk_size: forwarded to ``ops.linear_token_logprobs``.
        loss_weights: ``(rationale_weight, answer_weight)``, float ``[B]``: the coefficients of
            a loss linear in the sums, known before the pass (LaTRO's once the advantages are,
            see :func:`latro_engine.objective.loss_weights`; SFT's). The loss is then returned
            as ``SequenceScores.loss`` and its gradient is taken in this pass (the fast path's
            ``ops.linear_weighted_logprob_sum``: three LM-head matmuls instead of four); the
            sums carry no gradient.
    Returns:
        :class:`SequenceScores`, float32 sums in the input row order.
    """
    device = prompt_ids.device
    if prompt_ids.dim() != 2 or prompt_mask.shape != prompt_ids.shape:
        raise ValueError(f"prompt_ids and prompt_mask must both be [B, P], got "
                         f"{list(prompt_ids.shape)} and {list(prompt_mask.shape)}")
    if prompt_mask.device != device:
        raise ValueError(f"prompt_mask is on {prompt_mask.device} but prompt_ids is on {device}")
    rows = prompt_ids.shape[0]
    _check_integer(rationale_ids, "rationale_ids", device=device)
    if rationale_ids.dim() != 2 or rationale_ids.shape[0] != rows:
        raise ValueError(f"rationale_ids must be [B, L] with B = {rows} (prompt_ids' rows), "
                         f"got {list(rationale_ids.shape)}")
    _check_integer(rationale_lengths, "rationale_lengths", (rows,))
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    for name, limit in (("micro_batch_size", micro_batch_size), ("max_tokens", max_tokens)):
        if limit is not None and limit < 0:
            raise ValueError(f"{name} must be >= 1 (None or 0: no limit), got {limit}")
    a_ids, a_len = as_padded(answer_ids, answer_lengths, rows, group_size, device)
    r_len = rationale_lengths.to(device=device, dtype=torch.int64)
    lengths: list[int] = []  # each row's tokens, and below the tokens it scores, on the host
    scored: list[int] = []
    if rows:
        checks = torch.stack([
            *prompt_mask_flags(prompt_mask),
            ((r_len < 0) | (r_len > rationale_ids.shape[1])).any(),
            ((a_len < 0) | (a_len > a_ids.shape[1])).any(),
        ])
        p_len = (prompt_mask != 0).sum(-1)
        # One copy to the host (one wait for the device) for every check on tensor contents
        # and every length the packing and the micro-batches need.
        host = torch.cat([checks.long(), p_len + r_len + a_len, r_len + a_len]).tolist()
        if any(host[:4]):
            raise_for_prompt_mask(bool(host[0]), bool(host[1]))
            _check_lengths(r_len, rationale_ids, "rationale_lengths", "rationale_ids")
            _check_lengths(a_len, a_ids, "answer_lengths", "answer_ids")
        lengths, scored = host[4: 4 + rows], host[4 + rows:]
    if loss_weights is not None:
        if len(loss_weights) != 2 or any(
            not isinstance(w, torch.Tensor) or w.shape != (rows,) for w in loss_weights
        ):
            raise ValueError(
                f"loss_weights must be (rationale_weight, answer_weight), two [B] = [{rows}] tensors"
            )
        loss_weights = tuple(w.to(device) for w in loss_weights)
    ids, mask, r_start, a_start = pack_sequences(prompt_ids, prompt_mask, rationale_ids, r_len,
                                                 a_ids, a_len, longest=max(lengths, default=0))
    counts = (r_len, a_len)
    # Rows by length (stable), so micro-batches carry little padding.
    batches = length_batches(lengths, micro_batch_size, max_tokens, device)
    if len(batches) <= 1:
        if rows == 0:
            empty = torch.zeros(0, dtype=torch.float32, device=device)
            loss = empty.sum() if loss_weights is not None else None
            return SequenceScores(empty, empty.clone(), *counts, loss)
        out = _score_batch(model, ids, mask, r_start, r_len, a_start, a_len, fast_path, chunk_size,
                           loss_weights, sum(scored))
        return SequenceScores(*out[:2], *counts, out[2])

    order = torch.tensor([i for batch in batches for i in batch], device=device)
    parts_z, parts_y, losses = [], [], []
    begin = 0
    for batch in batches:
        idx = order[begin: begin + len(batch)]
        begin += len(batch)
        # Columns past this micro-batch's longest row go, down to its attention width (at most
        # the batch's: the width of fewer tokens is never larger).
        kept = _attention_width(max(lengths[i] for i in batch), device)
        sub_weights = None if loss_weights is None else tuple(w[idx] for w in loss_weights)
        z, y, loss = _score_batch(model, ids[idx, :kept], mask[idx, :kept], r_start[idx],
                                  r_len[idx], a_start[idx], a_len[idx], fast_path,
                                  chunk_size, sub_weights, sum(scored[i] for i in batch))
        parts_z.append(z)
        parts_y.append(y)
        losses.append(loss)
    inverse = torch.argsort(order)
    total = None if loss_weights is None else torch.stack(losses).sum()
    return SequenceScores(torch.cat(parts_z)[inverse], torch.cat(parts_y)[inverse], *counts, total)


def score_rollout(
    model: torch.nn.Module,
    rollout: Rollout,
    answer_ids: torch.Tensor | Sequence[Sequence[int]] | None = None,
    answer_lengths: torch.Tensor | None = None,
    **kwargs,
) -> SequenceScores:
    """:func:`score_sequences` on a :class:`~latro_engine.rollout.Rollout` (answers per row or
    per prompt)."""
    return score_sequences(
        model, rollout.prompt_ids, rollout.prompt_mask, rollout.rationale_ids,
        rollout.rationale_lengths, answer_ids, answer_lengths, group_size=rollout.group_size, **kwargs,
    )


def score_reference(model: torch.nn.Module, *args, **kwargs) -> SequenceScores:
    """:func:`score_sequences` under ``torch.no_grad()`` (frozen reference model, rewards)."""
    with torch.no_grad():
        return score_sequences(model, *args, **kwargs)


@contextmanager
def reference_model(policy: torch.nn.Module, ref_model: torch.nn.Module | None = None) -> Iterator[torch.nn.Module]:
    """Yields the model that computes p0, the frozen initial model of LaTRO's KL term.

    With a separate ``ref_model`` it is used as is (its weights brought to the policy's device
    for the duration when it is kept in host memory, see :mod:`latro_engine.offload`). Without one, a peft model (anything with
    ``disable_adapter()``, imported lazily: peft is optional) is its own reference with its
    adapters switched off for the duration, so no second copy of the weights is needed.
    """
    if ref_model is not None:
        # A reference kept in host memory (offload.keep_on_host) visits the policy's device.
        device = next(policy.parameters()).device
        with visiting(ref_model, device):
            yield ref_model
        return
    if not hasattr(policy, "disable_adapter"):
        raise ValueError("no reference model given and the policy has no adapters to disable "
                         "(pass ref_model, or wrap the policy with peft LoRA)")
    with policy.disable_adapter():
        yield policy


def reference_logprobs(
    policy: torch.nn.Module, ref_model: torch.nn.Module | None, *args, **kwargs
) -> SequenceScores:
    """Scores with the reference model (see :func:`reference_model`) under no_grad.

    Takes :func:`score_sequences`' arguments after the model; pass no answers to score only
    log p0(z|x), which is all the KL term needs.
    """
    with reference_model(policy, ref_model) as ref:
        return score_reference(ref, *args, **kwargs)

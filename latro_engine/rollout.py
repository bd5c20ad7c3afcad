"""Batched rationale sampling with a KV cache over any Hugging Face causal LM.

LaTRO samples K rationales z ~ p_theta(.|x) per question and cuts each at a stop string such as
"The answer is" (see /work/shared/LATRO.md). The reference code decodes all L tokens and cuts
afterwards; here a row stops the moment it completes a stop sequence (found incrementally with
:func:`latro_engine.ops.stop_positions_step`) and finished rows are dropped from the batch and
the KV cache, so short rationales stop costing compute.

Sampling goes through :func:`latro_engine.ops.sample` with one Philox seed per row, derived from
``(seed, sample id)`` only, and the decode step as offset: a row's draws therefore do not depend
on which other rows share the batch, how they are padded, or when rows are compacted away.

Two decode loops produce the same rollouts: the generic one here, over any Hugging Face causal LM
and its own cache, and :mod:`latro_engine.static_decoder` for Llama-family models, a static KV
cache with the decode step in a CUDA graph on GPUs (``decoder="auto"`` picks it on CUDA when the
model supports it).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from latro_engine import ops, static_decoder
from latro_engine.config import DEFAULT_STOP_STRINGS  # one list, shared with LatroConfig

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_STOP_STRINGS",
    "Rollout",
    "row_seeds",
    "sample_rationales",
    "stop_token_sequences",
]


_MASK64 = (1 << 64) - 1


@dataclass
class Rollout:
    """K sampled rationales per prompt, samples of one prompt contiguous.

    Rows are ordered ``prompt i -> rows i*k .. i*k+k-1`` (B = prompts x k).

    Attributes:
        prompt_ids: int64 ``[B, P]``, left-padded (each prompt repeated k times).
        prompt_mask: int64 ``[B, P]``, 1 for real tokens, 0 for padding.
        rationale_ids: int64 ``[B, L]``, right-padded with the pad id. The stop sequence that
            ended a row, and anything after it, is excluded.
        rationale_lengths: int64 ``[B]``: tokens before the stop sequence, or L for rows that
            never stopped.
        finished: bool ``[B]``: the row completed one of the stop sequences (a template, or EOS
            if the caller listed it) within ``max_new_tokens``. False rows ran to the limit
            (LaTRO gives them the non-stop penalty); a stop sequence only partly emitted at
            the limit stays in their ``rationale_ids``.
        sample_logprobs: float32 ``[B, L]``: log-probability of each kept token under the
            distribution it was sampled from (after temperature/top-k/top-p/min-p; 0 for
            greedy), 0 past the length.
        group_size: k.
        stop_index: int64 ``[B]``: which of the ``stop_sequences`` ended each finished row (its
            index in the list the sampler was given), -1 for rows that did not finish; None
            for rollouts built by hand.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    rationale_ids: torch.Tensor
    rationale_lengths: torch.Tensor
    finished: torch.Tensor
    sample_logprobs: torch.Tensor
    group_size: int
    stop_index: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.rationale_ids.shape[0])

    def rationale_token_lists(self) -> list[list[int]]:
        """The rationales as plain token-id lists (for decoding or logging)."""
        lengths = self.rationale_lengths.tolist()
        return [row[:n] for row, n in zip(self.rationale_ids.tolist(), lengths)]


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def row_seeds(
    seed: int, sample_ids: torch.Tensor | Sequence[int], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Per-row sampler seeds, int64 ``[B]``, a hash of ``(seed, sample id)`` only.

    Hashing (rather than ``seed + id``) keeps the streams of neighbouring seeds unrelated, so
    rollouts for seed s and s+1 share no rows.
    """
    ids = sample_ids.tolist() if isinstance(sample_ids, torch.Tensor) else list(sample_ids)
    base = _splitmix64(int(seed) & _MASK64)
    values = [_splitmix64(base ^ (int(i) & _MASK64)) >> 1 for i in ids]  # keep int64 non-negative
    return torch.tensor(values, dtype=torch.int64, device=device)


def stop_token_sequences(
    tokenizer,
    strings: Iterable[str] = DEFAULT_STOP_STRINGS,
    *,
    end_ids: Iterable[int] | None = None,
) -> list[list[int]]:
    """Token-id sequences that spell each stop string, in the forms a tokenizer may produce.

    A subword tokenizer spells "The answer is" differently at the start of a text, after a
    space (SentencePiece's "\u2581The"), or glued to punctuation, and stop detection matches
    token ids, so every variant is listed: the string encoded alone and with a leading space,
    and the tokens it adds after the anchors ".", "\\n" and "a" (with and without a space).
    Empty results are dropped and duplicates removed. The list is sorted longest first, because
    at one decode step the stop op picks the first sequence (in list order) that ends there, and
    the longest begins earliest: " The answer is" is preferred to "The answer is", so the cut
    rationale does not end with the space. ``end_ids`` (default: the tokenizer's EOS id(s); the
    trainer passes the turn's end and EOS, ``generation.end_ids``) are appended as single-token
    sequences.
    """

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    found: list[list[int]] = []
    for s in strings:
        variants = [encode(s)]
        if not s.startswith(" "):
            variants.append(encode(" " + s))
        for anchor in (".", "\n", "a"):
            for sep in ("", " "):
                if sep == " " and s.startswith(" "):
                    continue
                head = encode(anchor)
                full = encode(anchor + sep + s)
                if full[: len(head)] == head:
                    variants.append(full[len(head) :])
        for v in variants:
            if v and v not in found:
                found.append(v)
    found.sort(key=len, reverse=True)  # stable: equal lengths keep discovery order
    if end_ids is None:
        eos = tokenizer.eos_token_id
        end_ids = [e for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
    for e in end_ids:
        if [int(e)] not in found:
            found.append([int(e)])
    return found


def _forward_kwargs(model: torch.nn.Module) -> tuple[str, bool]:
    """(name of the KV-cache argument, whether ``logits_to_keep`` is accepted).

    transformers 5 renamed ``past_key_values`` to ``cache``; wrappers such as peft forward
    ``**kwargs``, so the underlying model's signature is the one that counts.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    cache_name = "cache" if "cache" in params else "past_key_values"
    return cache_name, "logits_to_keep" in params


def _output_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@torch.no_grad()
def sample_rationales(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    k: int,
    max_new_tokens: int,
    stop_sequences: Sequence[Sequence[int]],
    pad_token_id: int,
    seed: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    sample_ids: torch.Tensor | Sequence[int] | None = None,
    compact_every: int | None = None,
    decoder: str = "auto",
) -> Rollout:
    """Samples k rationales per prompt with a KV cache, stopping rows at stop sequences.

    Args:
        model: a Hugging Face causal LM (or a peft wrapper of one); its train/eval mode is
            left as is (call ``model.eval()`` first to sample without dropout).
        prompt_ids: int64 ``[N, P]``, left-padded. prompt_mask: ``[N, P]``, 1 real / 0 pad,
            each row 0s then 1s (a ValueError otherwise) with at least one 1.
        k: samples per prompt (rows repeat_interleave'd, so a prompt's samples are contiguous).
        max_new_tokens: the rationale limit L.
        stop_sequences: token-id lists; a row stops when it completes any of them. EOS is
            just one of them: pass ``[[eos]]`` alone to let the model write through the answer
            template until EOS (evaluation), where ``finished`` then means "emitted EOS".
        pad_token_id: fills ``rationale_ids`` past each length.
        seed: the rollout seed. Row r samples with ``row_seeds(seed, sample_ids)[r]`` at
            offset = decode step, so the same (seed, sample id, prompt) gives the same
            rationale whatever else is in the batch.
        temperature, top_k, top_p, min_p: as in :func:`latro_engine.ops.sample`
            (temperature 0 = greedy).
        sample_ids: int64 ``[N * k]`` identities of the rows for seeding (default
            ``arange(N * k)``); pass global indices when a batch is split across calls or
            processes.
        compact_every: drop finished rows from the batch and KV cache every this many steps,
            or at once when at least half the batch has finished; <= 0 never compacts (for
            testing: results are the same either way). None: 8 for the generic loop, 16 for
            the static decoder, which synchronizes with the host only at these steps.
        decoder: "hf" (the generic loop over the model's own forward and cache), "static"
            (:mod:`latro_engine.static_decoder`; an error if the model is not supported) or
            "auto" (static on CUDA devices when supported, else hf). Both give the same
            rollouts up to the rounding of the two forwards.
    Returns:
        a :class:`Rollout`; its ``sample_logprobs`` are those of the sampler, not a replacement
        for :mod:`latro_engine.scoring`.
    """
    if prompt_ids.dim() != 2 or prompt_mask.shape != prompt_ids.shape:
        raise ValueError(
            f"prompt_ids and prompt_mask must both be [N, P], got {list(prompt_ids.shape)} "
            f"and {list(prompt_mask.shape)}"
        )
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    top_k = ops.check_top_k(top_k)  # before the static decoder keys its cache on int(top_k)
    _check_left_padded(prompt_mask)
    device = prompt_ids.device
    ids = prompt_ids.long().repeat_interleave(k, dim=0)
    mask = prompt_mask.long().repeat_interleave(k, dim=0)
    rows, limit = ids.shape[0], int(max_new_tokens)
    if sample_ids is None:
        sample_ids = torch.arange(rows)
    if len(sample_ids) != rows:
        raise ValueError(f"sample_ids must have N * k = {rows} entries, got {len(sample_ids)}")
    seeds = row_seeds(seed, sample_ids, device)
    use_static = _use_static_decoder(model, decoder, device, ids.shape[1] + limit)

    tokens = torch.full((rows, limit), pad_token_id, dtype=torch.int64, device=device)
    logps = torch.zeros((rows, limit), dtype=torch.float32, device=device)
    stop_pos = torch.full((rows,), limit, dtype=torch.int64, device=device)
    stops = ops.StopSequences(stop_sequences, device) if len(stop_sequences) else None

    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    if rows and limit and use_static:
        static_decoder.decode_static(
            model,
            ids,
            mask,
            seeds,
            tokens,
            logps,
            stop_pos,
            stop_sequences=stop_sequences,
            sampling=sampling,
            pad_token_id=pad_token_id,
            compact_every=16 if compact_every is None else compact_every,
        )
    elif rows and limit:
        _decode(
            model,
            ids,
            mask,
            tokens,
            logps,
            stop_pos,
            stops,
            seeds,
            sampling,
            compact_every=8 if compact_every is None else compact_every,
            pad_token_id=pad_token_id,
        )

    steps = torch.arange(limit, device=device)
    beyond = steps[None, :] >= stop_pos[:, None]
    return Rollout(
        prompt_ids=ids,
        prompt_mask=mask,
        rationale_ids=tokens.masked_fill(beyond, pad_token_id),
        rationale_lengths=stop_pos.clone(),
        finished=stop_pos < limit,
        sample_logprobs=logps.masked_fill(beyond, 0.0),
        group_size=k,
        stop_index=_matched_stops(tokens, stop_pos, stop_sequences),
    )


def _matched_stops(
    tokens: torch.Tensor, stop_pos: torch.Tensor, stop_sequences: Sequence[Sequence[int]]
) -> torch.Tensor:
    """Per row, the index of the stop sequence that ended it (-1: none): the shortest one that
    starts at the row's stop position, first in list order among equals. A row stops at the
    first step that completes any sequence, so a longer one starting there too could only have
    been completed by tokens drawn after the row had stopped."""
    rows, limit = tokens.shape
    device = tokens.device
    found = torch.full((rows,), -1, dtype=torch.int64, device=device)
    by_length: dict[int, list[int]] = {}
    for index, sequence in enumerate(stop_sequences):
        if len(sequence) <= limit:
            by_length.setdefault(len(sequence), []).append(index)
    # Shortest lengths first, and within a length the first match in list order: a few batched
    # comparisons (one per distinct length), not one per sequence (the LaTRO benchmark's stop
    # set has 855).
    for n in sorted(by_length):
        indices = by_length[n]
        table = torch.tensor([list(stop_sequences[i]) for i in indices], dtype=torch.int64,
                             device=device)  # [S_n, n]
        columns = (stop_pos[:, None] + torch.arange(n, device=device)).clamp(max=limit - 1)
        window = tokens.gather(1, columns)  # [rows, n]
        match = (window[:, None, :] == table[None]).all(-1) & (stop_pos + n <= limit)[:, None]
        first = match.int().argmax(1)  # the first True of a row (0 where none)
        index = torch.tensor(indices, dtype=torch.int64, device=device)[first]
        found = torch.where((found < 0) & match.any(1), index, found)
    return found


def prompt_mask_flags(prompt_mask: torch.Tensor) -> list[torch.Tensor]:
    """0-d bool tensors: the mask holds a value other than 0 and 1; a row has no real token.
    The callers read them with their own checks in one host synchronization, then pass them
    to :func:`raise_for_prompt_mask`."""
    real = prompt_mask != 0
    return [(real & (prompt_mask != 1)).any(), (~real).all(-1).any()]


def raise_for_prompt_mask(not_binary: bool, empty: bool) -> None:
    if not_binary:
        raise ValueError("prompt_mask must hold only 0 (pad) and 1 (real token)")
    if empty:
        raise ValueError("every prompt needs at least one real token (prompt_mask row of zeros)")


def _check_left_padded(prompt_mask: torch.Tensor) -> None:
    """ValueError unless every mask row is 0s then 1s, with at least one 1.

    Both decode loops append each new token after the last column, at position ``mask.sum()``:
    a right-padded row would continue behind its pads. One host synchronization per call.
    """
    if prompt_mask.shape[0] == 0:
        return
    real = prompt_mask != 0
    right_padded = real[:, :-1] & ~real[:, 1:]  # a 0 after a 1
    *mask_flags, right = torch.stack([*prompt_mask_flags(prompt_mask), right_padded.any()]).tolist()
    raise_for_prompt_mask(*mask_flags)
    if right:
        row = int(right_padded.any(-1).nonzero()[0])
        raise ValueError(
            f"prompts must be left-padded, but prompt_mask row {row} has a 0 after a 1: pad "
            'on the left (tokenizer.padding_side = "left", or latro_engine.generation.left_pad)'
        )


def _use_static_decoder(
    model: torch.nn.Module, decoder: str, device: torch.device, total_length: int
) -> bool:
    if decoder not in ("auto", "static", "hf"):
        raise ValueError(f"decoder must be 'auto', 'static' or 'hf', got {decoder!r}")
    if decoder == "hf" or (decoder == "auto" and device.type != "cuda"):
        return False
    reason = static_decoder.static_decoder_unsupported(model, total_length)
    if reason is None:
        return True
    if decoder == "static":
        raise ValueError(f"decoder='static' cannot decode this model: {reason}")
    logger.info("static decoder not used (%s); decoding with the model's own forward", reason)
    return False


def _decode(
    model: torch.nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    tokens: torch.Tensor,
    logps: torch.Tensor,
    stop_pos: torch.Tensor,
    stops: ops.StopSequences | None,
    seeds: torch.Tensor,
    sampling: dict,
    *,
    compact_every: int,
    pad_token_id: int,
) -> None:
    """The decode loop; fills ``tokens``, ``logps`` and ``stop_pos`` (indexed by original row)."""
    limit = tokens.shape[1]
    cache_name, has_keep = _forward_kwargs(model)
    extra = {"logits_to_keep": 1} if has_keep else {}
    active = torch.arange(ids.shape[0], device=ids.device)  # original row of each batch row
    attn = mask
    next_pos = mask.sum(-1)  # position id of the next token (prompt positions: cumsum - 1)
    out = model(
        input_ids=ids,
        attention_mask=attn,
        position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
        use_cache=True,
        **extra,
    )
    cache = _output_cache(out)
    layers = getattr(cache, "layers", [])
    can_select = hasattr(cache, "batch_select_indices") and all(
        hasattr(layer, "batch_select_indices") for layer in layers
    )
    if compact_every > 0 and not can_select:
        logger.warning(
            "%s cannot drop batch rows from its cache; decoding without compaction",
            type(cache).__name__,
        )
        compact_every = 0
    compactions = 0
    for step in range(limit):
        logits = out.logits[:, -1, :]
        if logits.dtype == torch.float64:  # the sampler takes float32/bf16/fp16
            logits = logits.float()
        new, lp = ops.sample(logits, seed=seeds[active], offset=step, **sampling)
        # Rows that stopped but were not compacted yet still decode; their tokens are ignored.
        live = stop_pos[active] == limit
        tokens[active, step] = torch.where(live, new, pad_token_id)
        logps[active, step] = torch.where(live, lp, 0.0)
        if stops is not None:
            stop_pos.copy_(ops.stop_positions_step(tokens, stops, step=step, positions=stop_pos))
        done = stop_pos[active] < limit
        n_done = int(done.sum())  # the one host sync per step: is the loop over?
        if n_done == active.shape[0] or step == limit - 1:
            break
        if (
            n_done
            and compact_every > 0
            and ((step + 1) % compact_every == 0 or 2 * n_done >= active.shape[0])
        ):
            keep = (~done).nonzero().squeeze(1)
            active, attn, next_pos, new = active[keep], attn[keep], next_pos[keep], new[keep]
            cache.batch_select_indices(keep)
            compactions += 1
        attn = torch.cat([attn, attn.new_ones(attn.shape[0], 1)], dim=1)
        out = model(
            input_ids=new[:, None],
            attention_mask=attn,
            position_ids=next_pos[:, None],
            use_cache=True,
            **{cache_name: cache},
            **extra,
        )
        cache = _output_cache(out)
        next_pos = next_pos + 1
    logger.debug(
        "decoded %d steps, %d compactions, %d rows", step + 1, compactions, tokens.shape[0]
    )

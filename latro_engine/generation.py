"""Prompt tokenization and text generation on top of the rollout sampler, and model
evaluation (greedy and maj@k) on a dataset."""

from __future__ import annotations

import logging
import string
import weakref
from collections.abc import Sequence
from typing import Any, Literal

import torch

from latro_engine.answers import answer_marker
from latro_engine.config import LatroConfig
from latro_engine.data import (
    DataError,
    Example,
    answer_text,
    build_prompt,
    chat_template_in_use,
    gold_answer_string,
)
from latro_engine.evaluation import EvalResult, Kind, evaluate
from latro_engine.rollout import sample_rationales

logger = logging.getLogger(__name__)

_USE_CHAT = {"auto": "auto", "on": True, "off": False}


def pad_id(tokenizer: Any) -> int:
    """The pad id, falling back to EOS for tokenizers without one (Llama's)."""
    value = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if value is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token")
    return int(value)


def _eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token (needed to end answers and completions)")
    return int(tokenizer.eos_token_id)


_SENTINEL = "LATRO_TURN_SENTINEL"
_WARNED_TEMPLATES: set[str] = set()


# turn_end_id's answers per tokenizer, by (chat template, use_chat_template, EOS): rendering
# the template and tokenizing took about a millisecond at every training step.
_TURN_ENDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def turn_end_id(tokenizer: Any, config: LatroConfig) -> int:
    """The token that ends the model's turn, appended to every answer y (LaTRO) and completion
    (SFT): with the chat template in use, the special token it writes right after an assistant
    message (Phi-3.5's ``<|end|>``, Llama 3's ``<|eot_id|>``, Qwen's ``<|im_end|>``, where the
    tokenizer's EOS may be another token), else EOS."""
    key = (str(getattr(tokenizer, "chat_template", None)), config.use_chat_template,
           _eos_id(tokenizer))
    try:
        known = _TURN_ENDS.setdefault(tokenizer, {})
    except TypeError:  # a tokenizer that cannot be weakly referenced: read it every time
        known = {}
    if key not in known:
        known[key] = _read_turn_end_id(tokenizer, config)
    return known[key]


def _read_turn_end_id(tokenizer: Any, config: LatroConfig) -> int:
    eos = _eos_id(tokenizer)
    if not chat_template_in_use(tokenizer, _USE_CHAT[config.use_chat_template]):
        return eos
    turn = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": _SENTINEL}]
    try:
        text = str(tokenizer.apply_chat_template(turn, tokenize=False))
    except Exception as error:  # a template that refuses this conversation
        if str(tokenizer.chat_template) not in _WARNED_TEMPLATES:  # once, not at every step
            _WARNED_TEMPLATES.add(str(tokenizer.chat_template))
            logger.warning("chat template: no assistant turn to read its end from (%s); EOS", error)
        return eos
    if _SENTINEL not in text:
        return eos
    after = tokenizer(text.split(_SENTINEL, 1)[1], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {
        int(i) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special
    }
    return int(after[0]) if after and int(after[0]) in special else eos


def end_ids(tokenizer: Any, config: LatroConfig) -> list[int]:
    """The ids that end a rationale or a completion: the turn's end, and EOS when it differs."""
    return list(dict.fromkeys([turn_end_id(tokenizer, config), _eos_id(tokenizer)]))


def prompt_texts(tokenizer: Any, examples: Sequence[Example], config: LatroConfig) -> list[str]:
    return [
        build_prompt(
            tokenizer,
            ex.question,
            template=config.prompt_template,
            use_chat_template=_USE_CHAT[config.use_chat_template],
        )
        for ex in examples
    ]


def prompt_ids(tokenizer: Any, examples: Sequence[Example], config: LatroConfig) -> list[list[int]]:
    """Each prompt's token ids, BOS first unless the text already starts with it: chat templates
    such as Llama 3's and Mistral's write their own BOS, and a second one would be a prompt the
    model never saw in training."""
    bos = getattr(tokenizer, "bos_token", None)
    return [
        list(tokenizer(t, add_special_tokens=not (bos and t.startswith(bos)))["input_ids"])
        for t in prompt_texts(tokenizer, examples, config)
    ]


def left_pad(
    sequences: Sequence[Sequence[int]], pad: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> left-padded ids and mask, int64 [N, max_len] ([0, 0] for no lists: the
    sampler and the scorer take zero rows)."""
    width = max((len(s) for s in sequences), default=0)
    ids = torch.full((len(sequences), width), pad, dtype=torch.int64)
    mask = torch.zeros((len(sequences), width), dtype=torch.int64)
    for i, seq in enumerate(sequences):
        if not seq:
            raise ValueError(f"prompt {i} tokenizes to nothing")
        ids[i, width - len(seq) :] = torch.tensor(seq, dtype=torch.int64)
        mask[i, width - len(seq) :] = 1
    return ids.to(device), mask.to(device)


def encode_prompts(
    tokenizer: Any, examples: Sequence[Example], config: LatroConfig, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    return left_pad(prompt_ids(tokenizer, examples, config), pad_id(tokenizer), device)


def encode_answers(
    tokenizer: Any, examples: Sequence[Example], config: LatroConfig
) -> list[list[int]]:
    """y per example: answer_prefix + answer_template filled with the gold, then the token that
    ends the model's turn (``turn_end_id``)."""
    end = turn_end_id(tokenizer, config)
    out = []
    for ex in examples:
        text = config.answer_prefix + answer_text(gold_answer_string(ex), config.answer_template)
        out.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [end])
    return out


def sft_targets(
    tokenizer: Any, examples: Sequence[Example], config: LatroConfig
) -> tuple[list[list[int]], list[list[int]]]:
    """The SFT baseline's target after each prompt, as (rationale, answer) token lists: the
    example's worked solution (``sft_target`` 'rationale', where it has one; else empty),
    spelled as it continues the prompt's text (after a space where the prompt does not end in
    one: a plain prompt ends "...step by step."; a chat template's ends with a newline), then
    :func:`encode_answers`' y (answer_prefix + answer_template + the turn's end)."""
    use = config.sft_target == "rationale"
    rationales = []
    for example, prompt in zip(examples, prompt_texts(tokenizer, examples, config)):
        if use and example.rationale:
            space = "" if prompt[-1:].isspace() else " "
            rationales.append(_continuation(tokenizer, prompt, space + example.rationale))
        else:
            rationales.append([])
    return rationales, encode_answers(tokenizer, examples, config)


def _template_around_answer(template: str, gold: str) -> tuple[str, str]:
    """``template``'s text before its first {answer} field, and the rest filled with the gold
    (validated: {answer} is its only field; literal braces unescaped)."""
    parts = list(string.Formatter().parse(template))
    first = next(i for i, (_, field, _, _) in enumerate(parts) if field is not None)
    lead = "".join(literal for literal, _, _, _ in parts[: first + 1])
    rest = "".join(
        literal + (gold if field is not None else "") for literal, field, _, _ in parts[first + 1 :]
    )
    return lead, gold + rest


def answers_after_rationales(
    tokenizer: Any,
    examples: Sequence[Example],
    config: LatroConfig,
    stop_sequences: Sequence[Sequence[int]],
    stop_index: Sequence[int],
) -> list[list[int]]:
    """y for each rollout row (``config.k`` rows per example, in order; ``stop_index``: the
    rollout's). A row whose rationale ended at a stop string that ``answer_template`` begins
    with (or holds before its {answer}: "The answer is" in "The answer is ({answer})."; case
    aside) goes on as the model began it: the stop's tokens as sampled, then the rest of the
    template filled with the gold (" 18." by default), then the turn's end, so that "...; the
    answer is" or "...\nThe answer is" is scored with the gold as written there instead of a
    capitalised template after a space the model did not write. The other rows (the turn's
    end, the length limit, a stop the template does not hold such as "Answer:"), and every
    row when ``answer_after_stop`` is "template", get :func:`encode_answers`' y:
    answer_prefix + answer_template."""
    k = config.k
    fixed = encode_answers(tokenizer, examples, config)
    if len(stop_index) != len(examples) * k:
        raise ValueError(f"stop_index has {len(stop_index)} rows for {len(examples)} x k = {k}")
    rows = [fixed[i // k] for i in range(len(examples) * k)]
    if config.answer_after_stop == "template":
        return rows
    ends = set(end_ids(tokenizer, config))
    end = turn_end_id(tokenizer, config)
    made: dict[tuple[int, str], list[int] | None] = {}
    for row, index in enumerate(stop_index):
        if index < 0 or (len(stop_sequences[index]) == 1 and stop_sequences[index][0] in ends):
            continue
        gold = gold_answer_string(examples[row // k])
        if (index, gold) not in made:
            stop = [int(t) for t in stop_sequences[index]]
            lead, filled = _template_around_answer(config.answer_template, gold)
            stop_text = tokenizer.decode(stop)
            at = lead.lower().find(stop_text.strip().lower()) if stop_text.strip() else -1
            made[index, gold] = None
            if at >= 0:
                after = lead[at + len(stop_text.strip()) :] + filled
                made[index, gold] = [*stop, *_continuation(tokenizer, stop_text, after), end]
        rows[row] = made[index, gold] or rows[row]
    return rows


def _continuation(tokenizer: Any, head: str, text: str) -> list[int]:
    """The tokens ``text`` adds after the text ``head``: encoded together with it, so that a
    subword tokenizer spells it as it does there (SentencePiece's " 1" after "is" is not its
    " 1" at the start of a text), or alone where ``head`` does not encode to a prefix of that."""

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    first, whole = encode(head), encode(head + text)
    return whole[len(first) :] if whole[: len(first)] == first else encode(text)


def context_length(model: torch.nn.Module) -> int | None:
    """The longest sequence the model takes (``config.max_position_embeddings``), if it says."""
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def fit_to_context(
    tokenizer: Any,
    examples: Sequence[Example],
    config: LatroConfig,
    context: int | None,
    *,
    use: Literal["latro", "sft", "eval"],
    source: str,
) -> list[Example]:
    """The examples whose longest sequence fits in ``context`` tokens; the others are reported
    with their line and skipped, or all raised in one DataError (``config.on_data_error``).

    The longest sequence: prompt + ``max_rationale_tokens`` + answer for LaTRO training,
    prompt + :func:`sft_targets` for SFT, prompt + the completion limit for evaluation.
    """
    if context is None or not examples:
        return list(examples)
    prompts = prompt_ids(tokenizer, examples, config)
    if use == "eval":
        limit = config.eval_max_new_tokens or config.max_rationale_tokens + 32
        after, what = [limit] * len(examples), "the completion limit"
    elif use == "latro":
        rationale = config.max_rationale_tokens
        after = [rationale + len(a) for a in encode_answers(tokenizer, examples, config)]
        what = "the rationale limit and the answer"
    else:
        after = [len(r) + len(a) for r, a in zip(*sft_targets(tokenizer, examples, config))]
        what = "its SFT target"
    kept, problems = [], []
    for ex, prompt, more in zip(examples, prompts, after):
        if len(prompt) + more <= context:
            kept.append(ex)
        else:
            problems.append(
                (
                    ex.source_line,
                    f"example {ex.id!r}: its prompt is {len(prompt)} tokens; with {what} "
                    f"({more}) it needs {len(prompt) + more}, more than the model's context "
                    f"of {context} tokens",
                )
            )
    if problems and (config.on_data_error == "raise" or not kept):
        raise DataError(source, problems)
    for line, why in problems:
        logger.warning("%s: line %d: %s; skipping", source, line, why)
    return kept


@torch.no_grad()
def complete(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    config: LatroConfig,
    *,
    num_samples: int,
    seed: int,
    device: torch.device | str,
) -> list[list[str]]:
    """Per example: the greedy completion, then ``num_samples`` sampled ones (each until the
    turn's end or EOS, see ``end_ids``)."""
    ids, mask = encode_prompts(tokenizer, examples, config, device)
    max_new = config.eval_max_new_tokens or config.max_rationale_tokens + 32
    common = dict(
        max_new_tokens=max_new,
        stop_sequences=[[i] for i in end_ids(tokenizer, config)],
        pad_token_id=pad_id(tokenizer),
        decoder=config.rollout_decoder,
    )
    was_training = model.training
    model.eval()
    try:
        greedy = sample_rationales(model, ids, mask, k=1, temperature=0.0, seed=seed, **common)
        texts = [
            [tokenizer.decode(t, skip_special_tokens=True)] for t in greedy.rationale_token_lists()
        ]
        if num_samples:
            sampled = sample_rationales(
                model,
                ids,
                mask,
                k=num_samples,
                temperature=config.eval_temperature,
                top_k=config.top_k,
                top_p=config.top_p,
                min_p=config.min_p,
                seed=seed + 1,
                **common,
            )
            tokens = sampled.rationale_token_lists()
            for i, row in enumerate(texts):
                row.extend(
                    tokenizer.decode(t, skip_special_tokens=True)
                    for t in tokens[i * num_samples : (i + 1) * num_samples]
                )
    finally:
        model.train(was_training)
    return texts


# Evaluation's sampling seed is the run's seed plus this: its own stream, never a training
# rollout's.
EVAL_SEED_OFFSET = 17


def evaluate_model(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    config: LatroConfig,
    *,
    kind: Kind = "gsm8k",
    maj_k: int | None = None,
    seed: int | None = None,
    device: torch.device | str | None = None,
) -> EvalResult:
    """Zero-shot greedy and maj@k accuracy (the paper's protocol), on ``device`` (default: the
    model's) under the config's bf16 autocast and with the config's evaluation seed (default
    ``config.seed + EVAL_SEED_OFFSET``): the trainers, ``latro eval`` and the demo all score a
    model the same way, so the same checkpoint gets the same numbers from each."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    seed = config.seed + EVAL_SEED_OFFSET if seed is None else seed
    num = config.maj_k if maj_k is None else maj_k
    counter = {"batch": 0}

    def generate_fn(batch: Sequence[Example], num_samples: int) -> list[list[str]]:
        counter["batch"] += 1
        return complete(
            model,
            tokenizer,
            batch,
            config,
            num_samples=num_samples,
            seed=seed * 7919 + counter["batch"] * 2,
            device=device,
        )

    autocast = torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=config.bf16_autocast(device.type)
    )
    with autocast:
        return evaluate(
            list(examples),
            generate_fn,
            kind=kind,
            num_samples=num,
            batch_size=config.eval_batch_size,
            template=answer_marker(config.answer_template),
            progress=config.progress,
        )

"""Scoring model outputs: greedy accuracy, maj@k (self-consistency), per-example records.

Generation lives in the rollout module; this module only needs the completions, so the
metrics are tested on hand-written strings and any generator can be plugged in through
``generate_fn``. Per LATRO.md the paper reports zero-shot greedy accuracy and maj@8 at
temperature 1, on the test split.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm

from latro_engine.answers import (
    DEFAULT_TEMPLATE,
    extract_choice,
    extract_numeric_answer,
    majority_vote,
    normalize_number,
    numbers_equal,
)
from latro_engine.checkpoint import write_text_atomic
from latro_engine.data import Example

logger = logging.getLogger(__name__)

__all__ = [
    "EvalRecord",
    "EvalResult",
    "GenerateFn",
    "evaluate",
    "evaluate_predictions",
    "write_eval_jsonl",
]

Kind = Literal["gsm8k", "arc"]

# generate_fn(batch, num_samples) -> one list per example: the greedy completion first, then
# ``num_samples`` sampled ones. The caller's closure owns prompts, model and decoding settings.
GenerateFn = Callable[[Sequence[Example], int], list[list[str]]]


@dataclass
class EvalRecord:
    """What happened on one example; one line of the evaluation JSONL.

    Predictions are kept as extracted ("18.50", "1000.00") so odd outputs can be read back;
    ``majority`` is the normalized voting key ("18.5").
    """

    id: str
    question: str
    gold: str
    greedy_completion: str
    greedy_prediction: str | None
    correct: bool
    sampled_predictions: list[str | None]
    majority: str | None
    maj_correct: bool | None  # None when no samples were drawn


@dataclass
class EvalResult:
    """Aggregate metrics plus the per-example records behind them.

    ``maj_accuracy`` is None when no sampled completions were given (greedy-only runs), so a
    missing metric is never mistaken for 0%.
    """

    kind: str
    n: int
    k: int
    greedy_accuracy: float
    maj_accuracy: float | None
    records: list[EvalRecord] = field(default_factory=list)

    def metrics(self, prefix: str = "eval/") -> dict[str, Any]:
        """Flat metrics for the JSON-lines log (maj@k is named with its k)."""
        out: dict[str, Any] = {f"{prefix}n": self.n, f"{prefix}greedy_acc": self.greedy_accuracy}
        if self.maj_accuracy is not None:
            out[f"{prefix}maj@{self.k}_acc"] = self.maj_accuracy
        return out


def _predict(text: str, example: Example, kind: Kind, template: str) -> str | None:
    if kind == "gsm8k":
        return extract_numeric_answer(text, template)
    return extract_choice(text, example.options, template)


def _correct(prediction: str | None, gold: str, kind: Kind) -> bool:
    if kind == "gsm8k":
        return numbers_equal(prediction, gold)
    return prediction is not None and prediction == gold


def _check_examples(examples: Sequence[Example], kind: Kind) -> None:
    """Examples that ``kind`` cannot score are an error, not 0%: GSM8K needs numeric golds and
    no options, ARC options and a gold among their labels (data of the other kind, or a
    default kind left as it was, would otherwise score every example wrong)."""
    if kind not in ("gsm8k", "arc"):
        raise ValueError(f"kind must be 'gsm8k' or 'arc', got {kind!r}")
    if not examples:
        raise ValueError("nothing to evaluate: no examples")
    for ex in examples:
        if kind == "gsm8k" and (ex.options or normalize_number(ex.answer) is None):
            raise ValueError(
                f"example {ex.id!r} cannot be scored as kind='gsm8k' (a numeric gold, no "
                f"options): gold {ex.answer!r}, {len(ex.options)} options; ARC data needs "
                "kind='arc'"
            )
        if kind == "arc" and ex.answer not in {label for label, _ in ex.options}:
            raise ValueError(
                f"example {ex.id!r} cannot be scored as kind='arc': its gold {ex.answer!r} is "
                f"not one of its option labels {[label for label, _ in ex.options]}"
            )


def evaluate_predictions(
    examples: Sequence[Example],
    completions_per_example: Sequence[Sequence[str]],
    *,
    kind: Kind = "gsm8k",
    template: str = DEFAULT_TEMPLATE,
) -> EvalResult:
    """Score completions against the gold answers.

    ``completions_per_example[i]`` belongs to ``examples[i]``: its first entry is the greedy
    completion, the rest (k of them, the same k for every example) are the samples voted on
    for maj@k. GSM8K answers compare numerically; ARC answers compare option labels.
    """
    _check_examples(examples, kind)
    if len(examples) != len(completions_per_example):
        raise ValueError(
            f"{len(examples)} examples but {len(completions_per_example)} completion lists"
        )
    sizes = {len(c) for c in completions_per_example}
    if min(sizes) < 1:
        raise ValueError("every example needs at least its greedy completion")
    if len(sizes) != 1:
        raise ValueError(f"completion lists differ in length {sorted(sizes)}; k must be fixed")
    k = sizes.pop() - 1
    numeric = kind == "gsm8k"

    records = []
    for ex, completions in zip(examples, completions_per_example, strict=True):
        greedy = completions[0]
        pred = _predict(greedy, ex, kind, template)
        sampled = [_predict(c, ex, kind, template) for c in completions[1:]]
        majority = majority_vote(sampled, numeric=numeric) if k else None
        records.append(
            EvalRecord(
                id=ex.id,
                question=ex.question,
                gold=ex.answer,
                greedy_completion=greedy,
                greedy_prediction=pred,
                correct=_correct(pred, ex.answer, kind),
                sampled_predictions=sampled,
                majority=majority,
                maj_correct=_correct(majority, ex.answer, kind) if k else None,
            )
        )
    n = len(records)
    greedy_acc = sum(r.correct for r in records) / n
    maj_acc = sum(bool(r.maj_correct) for r in records) / n if k else None
    logger.info(
        "%s eval: n=%d greedy=%.4f%s",
        kind,
        n,
        greedy_acc,
        f" maj@{k}={maj_acc:.4f}" if maj_acc is not None else "",
    )
    return EvalResult(kind, n, k, greedy_acc, maj_acc, records)


def evaluate(
    examples: Sequence[Example],
    generate_fn: GenerateFn,
    *,
    kind: Kind = "gsm8k",
    num_samples: int = 8,
    batch_size: int = 16,
    template: str = DEFAULT_TEMPLATE,
    progress: bool = True,
) -> EvalResult:
    """Generate with ``generate_fn`` batch by batch, then score (maj@8 by default, as in the
    paper). The shape of each batch's output is checked at once, because a generator that
    drops an example would otherwise misalign every later completion with its gold."""
    if batch_size < 1 or num_samples < 0:
        raise ValueError(
            f"need batch_size >= 1 and num_samples >= 0, got {batch_size}, {num_samples}"
        )
    _check_examples(examples, kind)  # before generating for them
    completions: list[list[str]] = []
    starts = range(0, len(examples), batch_size)
    for start in tqdm(starts, desc=f"eval {kind}", disable=not progress):
        batch = examples[start : start + batch_size]
        out = generate_fn(batch, num_samples)
        if len(out) != len(batch) or any(len(c) != num_samples + 1 for c in out):
            raise ValueError(
                f"generate_fn returned {len(out)} lists (lengths {[len(c) for c in out]}) for "
                f"{len(batch)} examples; expected {num_samples + 1} completions each"
            )
        completions.extend(list(c) for c in out)
    return evaluate_predictions(examples, completions, kind=kind, template=template)


def write_eval_jsonl(result: EvalResult, path: str | os.PathLike[str]) -> Path:
    """Write one JSON object per example, atomically (checkpoint.write_text_atomic), so a crash
    mid-write never leaves a half file that looks complete."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(
        target,
        "".join(json.dumps(asdict(r), ensure_ascii=False) + "\n" for r in result.records),
    )
    logger.info("wrote %d eval records to %s", len(result.records), target)
    return target

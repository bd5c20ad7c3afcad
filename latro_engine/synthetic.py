"""Embedded synthetic reasoning task: left-to-right arithmetic chains modulo 10.

A question reads ``"Start with 3. a+4=?. b*2=?. c-5=?. d+1=?."``.  Written out step by step
(``" 3+4=7. 7*2=4. 4-5=9. 9+1=0."``) every step restates the running value, copies its
operator and operand from the question and does one single-digit table look-up on the three
characters before its "=".  A question step ("b*2=?. ") is as wide as its rationale step
("7*2=4. "), so with a fixed chain length every copied character sits at one fixed distance
back: a tiny language model learns such copies within a few hundred steps.  Answered
directly, the model has to compose four look-ups in one forward pass, which a
sub-million-parameter model mostly cannot.  That gap (latent reasoning ability that greedy
decoding does not use) is exactly what LaTRO is meant to unlock, so the demo can show it
offline on a laptop CPU.

Text format, shared with the LaTRO engine::

    prompt     = question + COT_TRIGGER                 e.g. "... d+1=?. Let's think step by step."
    rationale  = "" (direct answer) or " 3+4=7. 7*2=4. 4-5=9. 9+1=0."
    answer y   = " The answer is 0."                    (format_answer), then EOS

so ``prompt + rationale + format_answer(a)`` is always well-formed text whether the
rationale is empty or not, and a rationale never ends in whitespace.  Engines that cut
sampled rationales at a stop string should cut at ``ANSWER_PREFIX`` (" The answer is",
leading space included) so that a direct answer leaves an empty rationale.

Everything is deterministic from integer seeds (``random.Random``), and the held-out split
is defined by a hash of the question text, so it is disjoint from every training split or
pretraining corpus regardless of the seeds used to draw them.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from latro_engine.answers import extract_numeric_answer, numbers_equal

#: Appended to every question to form the prompt (the paper's GSM8K trigger).
COT_TRIGGER = " Let's think step by step."
#: Start of the answer sentence; rationales are cut here and y begins with it.
ANSWER_PREFIX = " The answer is"

# op name -> symbol, used in both the question and the rationale
_OPS: dict[str, str] = {"add": "+", "sub": "-", "mul": "*"}
_SYMBOL_TO_OP = {sym: name for name, sym in _OPS.items()}
_STEP_RE = re.compile(r"(\d+)([+*-])(\d+)=(\d+)\.")
# Step labels of the question ("a+4=?. b*2=?."); the rationale's steps ("3+4=7. 7*2=4.") are
# as wide, so each copy from the question sits one fixed distance back.
_LABELS = "abcdefghij"


@dataclass(frozen=True)
class TaskSettings:
    """Shape of the arithmetic chains.

    Attributes:
        min_ops: fewest operations in a chain.
        max_ops: most operations in a chain.  Both 4 by default: four composed table
            look-ups are out of reach of a direct answer from a sub-million-parameter model,
            and with a fixed length every copy from the question into the rationale sits at
            one fixed distance (see :attr:`Problem.question`), which a tiny model learns in a
            few hundred steps; with 3-5 operations it takes several times longer.
        modulus: every value is reduced mod this; 10 keeps all numbers single digits,
            hence single tokens.
        heldout_permille: share (per thousand) of the question space reserved for
            evaluation; training generators never emit these questions.
        split_salt: salt of the question hash that decides the held-out split.
    """

    min_ops: int = 4
    max_ops: int = 4
    modulus: int = 10
    heldout_permille: int = 100
    split_salt: str = "latro-heldout-v1"

    def __post_init__(self) -> None:
        if not 1 <= self.min_ops <= self.max_ops <= len(_LABELS):
            raise ValueError(
                f"need 1 <= min_ops <= max_ops <= {len(_LABELS)} (one label per step), got "
                f"min_ops={self.min_ops}, max_ops={self.max_ops}"
            )
        if not 3 <= self.modulus <= 10:  # a multiplier in [2, modulus); one digit per value
            raise ValueError(f"modulus must be in [3, 10], got {self.modulus}")
        if not 0 < self.heldout_permille < 1000:  # both splits must be drawable
            raise ValueError(f"heldout_permille must be in [1, 999], got {self.heldout_permille}")


@dataclass(frozen=True)
class CorpusSettings:
    """Mix of the pretraining corpus; it decides the base model's habits.

    Attributes:
        direct_fraction: share of examples answered directly (empty rationale).  Above 0.5
            makes greedy decoding answer directly by default, which is the weakness LaTRO
            has to fix.
        noisy_fraction: share of worked solutions whose steps are corrupted, so the base
            reasons imperfectly and has something left to learn.
        step_error_prob: per-step probability of a wrong result in a noisy solution; later
            steps continue from the wrong value and the stated answer follows the
            rationale, so answers are faithful to the rationale that precedes them.
        reasoning_warmup: share of the corpus, at its start, with worked solutions only.
            Copying operands from the question is learned only when many examples show it
            (measured with 32 examples a step at lr 2e-3: with 30% worked examples a 0.8M
            model had not started copying digits after 400 steps; with only worked examples
            it copied them by step ~500 and got 77% of the steps' arithmetic right by step
            600); the direct-heavy remainder then sets the habit of answering directly.
    """

    direct_fraction: float = 0.6
    noisy_fraction: float = 0.5
    step_error_prob: float = 0.25
    reasoning_warmup: float = 0.75


@dataclass(frozen=True)
class Problem:
    """One chain: a start value and ``(op, operand)`` steps applied left to right."""

    start: int
    steps: tuple[tuple[str, int], ...]
    modulus: int = 10

    @property
    def question(self) -> str:
        """The natural-language question (without the CoT trigger)."""
        chain = " ".join(f"{_LABELS[i]}{_OPS[op]}{arg}=?." for i, (op, arg) in enumerate(self.steps))
        return f"Start with {self.start}. {chain}"

    def values(self) -> list[int]:
        """The running value after each step (exact arithmetic)."""
        out, v = [], self.start
        for op, arg in self.steps:
            v = apply_op(op, v, arg, self.modulus)
            out.append(v)
        return out

    @property
    def answer(self) -> str:
        """The gold answer as a plain string, e.g. ``"9"``."""
        return str(self.values()[-1])


@dataclass(frozen=True)
class QAPair:
    """A (question, answer) pair as stored in the JSONL splits."""

    question: str
    answer: str


@dataclass(frozen=True)
class CorpusExample:
    """A pretraining text split into the prompt and the completion the model must write.

    ``prompt + completion`` is the full text; ``completion`` is ``rationale +
    format_answer(answer)`` (EOS is added by the tokenizer side).
    """

    prompt: str
    completion: str
    worked: bool = field(default=False)

    @property
    def text(self) -> str:
        """Full training text (without BOS/EOS)."""
        return self.prompt + self.completion


def apply_op(op: str, value: int, arg: int, modulus: int = 10) -> int:
    """Apply one named operation modulo ``modulus``."""
    if op == "add":
        return (value + arg) % modulus
    if op == "sub":
        return (value - arg) % modulus
    if op == "mul":
        return (value * arg) % modulus
    raise ValueError(f"unknown op {op!r}")


def format_prompt(question: str) -> str:
    """Prompt given to the model: the question followed by the CoT trigger."""
    return question + COT_TRIGGER


def format_answer(answer: str | int) -> str:
    """The answer sentence y (leading space included, no EOS)."""
    return f"{ANSWER_PREFIX} {answer}."


def extract_answer(text: str) -> str | None:
    """The number after the last "The answer is", else the last number, else None: the
    engine's GSM8K rule (:func:`latro_engine.answers.extract_numeric_answer`), so the demo is
    scored exactly like the paper's evaluation."""
    return extract_numeric_answer(text)


def is_worked(completion: str) -> bool:
    """Whether a generated completion contains a rationale before its answer sentence."""
    head = completion.split("The answer is", 1)[0]
    return _STEP_RE.search(head) is not None


def parse_rationale(rationale: str) -> list[tuple[int, str, int, int]]:
    """Parse ``" 3+4=7. 7*2=4."`` into ``[(3, "add", 4, 7), (7, "mul", 2, 4)]``."""
    return [
        (int(value), _SYMBOL_TO_OP[sym], int(arg), int(res))
        for value, sym, arg, res in _STEP_RE.findall(rationale)
    ]


def is_heldout(question: str, settings: TaskSettings) -> bool:
    """Whether ``question`` belongs to the held-out split (hash bucket, order independent)."""
    digest = hashlib.sha256((settings.split_salt + "\n" + question).encode()).digest()
    return int.from_bytes(digest[:4], "big") % 1000 < settings.heldout_permille


def sample_problem(rng: random.Random, settings: TaskSettings) -> Problem:
    """Draw one chain uniformly over lengths, ops and operands.

    Operands exclude the identities (add/subtract 0, times 0 and 1) so that every step
    changes information the model must track.
    """
    m = settings.modulus
    n_ops = rng.randint(settings.min_ops, settings.max_ops)
    steps = []
    for _ in range(n_ops):
        op = rng.choice(("add", "sub", "mul"))
        arg = rng.randint(2, m - 1) if op == "mul" else rng.randint(1, m - 1)
        steps.append((op, arg))
    return Problem(start=rng.randrange(m), steps=tuple(steps), modulus=m)


def sample_problems(
    n: int, seed: int, settings: TaskSettings, split: str = "train", unique: bool = True
) -> list[Problem]:
    """Draw ``n`` problems from ``split`` ("train" or "heldout"), deterministic from ``seed``.

    ``unique`` drops repeated questions (wanted for evaluation sets; the pretraining
    corpus passes False since repeats there are harmless and the space is large anyway).
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    want_heldout = split == "heldout"
    rng = random.Random(f"{split}:{seed}")
    out: list[Problem] = []
    seen: set[str] = set()
    attempts, max_attempts = 0, 1000 * n + 10_000
    while len(out) < n:
        attempts += 1
        if attempts > max_attempts:
            raise RuntimeError(f"could not draw {n} {split} problems; widen TaskSettings")
        p = sample_problem(rng, settings)
        q = p.question
        if is_heldout(q, settings) != want_heldout or (unique and q in seen):
            continue
        seen.add(q)
        out.append(p)
    return out


def generate_pairs(n: int, seed: int, settings: TaskSettings, split: str = "train") -> list[QAPair]:
    """``n`` distinct (question, answer) pairs of ``split``; see :func:`sample_problems`."""
    return [QAPair(p.question, p.answer) for p in sample_problems(n, seed, settings, split)]


def worked_rationale(
    problem: Problem, rng: random.Random, step_error_prob: float = 0.0
) -> tuple[str, int]:
    """Step-by-step rationale and the value it ends on: ``" 3+4=7. 7*2=4. 4-5=9."``.

    Each step writes the running value (the start value first), then the operator and
    operand copied from the question, then the new value; the three inputs of the step's
    table look-up are the three characters before its "=".  With ``step_error_prob > 0``
    each step's result is replaced by a different random digit with that probability, and
    later steps continue from the wrong value (the way a careless solver errs), so the
    returned final value can differ from the gold answer.
    """
    m = problem.modulus
    parts, v = [], problem.start
    for op, arg in problem.steps:
        res = apply_op(op, v, arg, m)
        if step_error_prob > 0 and rng.random() < step_error_prob:
            res = (res + rng.randint(1, m - 1)) % m
        parts.append(f"{v}{_OPS[op]}{arg}={res}.")
        v = res
    return " " + " ".join(parts), v


def build_pretrain_corpus(
    n: int, seed: int, task: TaskSettings, corpus: CorpusSettings
) -> list[CorpusExample]:
    """The base model's pretraining texts, in training order: worked solutions only for the
    first ``reasoning_warmup`` share, then a direct/worked/noisy-worked mix of train questions.

    The mix is drawn per example (not exact proportions) from a seed-derived stream, so
    two calls with the same arguments return the same list.
    """
    problems = sample_problems(n, seed, task, split="train", unique=False)
    rng = random.Random(f"corpus:{seed}")
    warmup = int(corpus.reasoning_warmup * n)
    out = []
    for i, p in enumerate(problems):
        prompt = format_prompt(p.question)
        direct = rng.random() < corpus.direct_fraction
        if direct and i >= warmup:
            out.append(CorpusExample(prompt, format_answer(p.answer), worked=False))
            continue
        err = corpus.step_error_prob if rng.random() < corpus.noisy_fraction else 0.0
        rationale, final = worked_rationale(p, rng, err)
        out.append(CorpusExample(prompt, rationale + format_answer(final), worked=True))
    return out


def tokenizer_training_texts(task: TaskSettings, n: int = 2000, seed: int = 0) -> list[str]:
    """Texts covering the task's full alphabet, for training the character tokenizer.

    Held-out questions, worked and direct forms are all included so no character of the
    task (or of the held-out split) can be out of vocabulary.
    """
    corpus = CorpusSettings(
        direct_fraction=0.5, noisy_fraction=0.0, step_error_prob=0.0, reasoning_warmup=0.0
    )
    texts = [ex.text for ex in build_pretrain_corpus(n, seed, task, corpus)]
    texts += [
        format_prompt(p.question) for p in sample_problems(min(n, 200), seed, task, "heldout")
    ]
    texts.append("0123456789 +-*=.?")
    return texts


def write_jsonl(pairs: Iterable[QAPair], path: str | os.PathLike[str]) -> Path:
    """Write pairs as GSM8K-like JSONL lines ``{"question": ..., "answer": ...}``.

    Written to a temporary sibling and renamed, so a crashed demo never leaves a
    truncated split behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps({"question": p.question, "answer": p.answer}) + "\n")
    os.replace(tmp, path)
    return path


def read_jsonl(path: str | os.PathLike[str]) -> list[QAPair]:
    """Read a split written by :func:`write_jsonl`."""
    with Path(path).open(encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [QAPair(str(d["question"]), str(d["answer"])) for d in records]


def write_splits(
    out_dir: str | os.PathLike[str],
    settings: TaskSettings,
    n_train: int = 2000,
    n_test: int = 500,
    seed: int = 0,
) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``test.jsonl`` (held-out) for the SFT/LaTRO stages."""
    out = Path(out_dir)
    train = write_jsonl(generate_pairs(n_train, seed, settings, "train"), out / "train.jsonl")
    test = write_jsonl(generate_pairs(n_test, seed, settings, "heldout"), out / "test.jsonl")
    return train, test


def answers_match(predicted: str | None, gold: str) -> bool:
    """Numeric comparison of an extracted answer with the gold one."""
    return numbers_equal(predicted, gold)


def accuracy(predictions: Sequence[str | None], golds: Sequence[str]) -> float:
    """Fraction of predictions matching their gold answers."""
    if not golds:
        raise ValueError("accuracy of nothing: golds is empty")
    return sum(answers_match(p, g) for p, g in zip(predictions, golds, strict=True)) / len(golds)

"""Datasets for LaTRO: loading GSM8K / ARC / generic records, and building prompts.

Loading is strict about what a bad row is and lenient about what happens next: every
malformed row (bad JSON or CSV, undecodable bytes, missing or empty fields, a GSM8K answer
that is not a number, a duplicate id) is reported with its 1-based line number, then either
skipped with a warning (``on_error="skip"``) or collected into one :class:`DataError`
(``on_error="raise"``). Callers never see a raw ``KeyError`` / ``JSONDecodeError`` /
``UnicodeDecodeError``, because a crash halfway through a multi-hour run is far more costly
than a clear message at start-up.

Prompts follow LATRO.md: the question goes through the model's chat template with the
generation prompt when the tokenizer has one, and the answer y is "The answer is {gold}."
(the caller appends the model's end-of-turn token).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from latro_engine.answers import is_plain_number, normalize_number
from latro_engine.config import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "ARC_INSTRUCTION",
    "DataError",
    "DatasetSpec",
    "Example",
    "GSM8K_TEMPLATE",
    "answer_text",
    "build_prompt",
    "chat_template_in_use",
    "format_arc_question",
    "gold_answer_string",
    "load_arc",
    "load_dataset",
    "load_gsm8k",
    "load_hf_dataset",
    "load_records",
]

OnError = Literal["skip", "raise"]
GSM8K_TEMPLATE = "{question} Let's think step by step."
ARC_INSTRUCTION = (
    "Let's think step by step first then print your answer like "
    "'The answer is (one of the options)'."
)
_MAX_LISTED = 20  # problems spelled out in one DataError message; the rest are counted
_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_SURROGATE = re.compile("[\udc80-\udcff]")  # undecodable bytes under "surrogateescape"
# A JSON string may spell any UTF-16 half with a \\u escape; alone, it is no text a tokenizer
# (or UTF-8) can take.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class DataError(ValueError):
    """A data file is unusable, or (with ``on_error="raise"``) has malformed rows.

    ``problems`` holds ``(line, reason)`` pairs (line 0 when the problem is the whole file).
    """

    def __init__(self, path: str | os.PathLike[str], problems: list[tuple[int, str]]):
        self.path = str(path)
        self.problems = problems
        shown = "; ".join(f"line {ln}: {why}" if ln else why for ln, why in problems[:_MAX_LISTED])
        more = len(problems) - _MAX_LISTED
        suffix = f"; ... and {more} more" if more > 0 else ""
        super().__init__(f"{self.path}: {shown}{suffix}")


@dataclass(frozen=True)
class Example:
    """One question with its gold answer.

    ``answer`` is the gold as text: the number for GSM8K ("72"), the option label for
    multiple choice ("B"). ``options`` holds ``(label, text)`` pairs, empty for open answers.
    ``source_line`` points back into the file so an odd example can be found by hand.
    ``rationale``: a worked solution where the data has one (GSM8K's, before "####"), which
    only the SFT baseline trains on; LaTRO never reads it.
    """

    id: str
    question: str
    answer: str
    options: tuple[tuple[str, str], ...] = ()
    source_line: int = 0
    rationale: str = ""


class _RowError(Exception):
    """A row-level problem, carried to the loader loop that knows the line number."""


# Numbers longer than this, written out without an exponent, are not an answer or an id.
_MAX_NUMBER_CHARS = 1000


def _written_length(value: Decimal) -> int:
    """The digits of format(value, "f"), without formatting it."""
    _, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)  # finite
    return len(digits) + exponent if exponent >= 0 else max(len(digits), -exponent) + 1


def _text(record: Mapping[str, Any], key: str, *, allow_number: bool = False) -> str:
    """``record[key]`` as stripped, non-empty text; numbers allowed for answers ("72" or 72)."""
    if key not in record or record[key] is None:
        raise _RowError(f"missing field {key!r}")
    value = record[key]
    number = isinstance(value, (int, float, Decimal)) and not isinstance(value, bool)
    if allow_number and number:
        # JSON numbers arrive as int or Decimal (their digits as written: no float rounding);
        # a float here is one of JSON's NaN / Infinity.
        if isinstance(value, float) or (isinstance(value, Decimal) and not value.is_finite()):
            raise _RowError(f"field {key!r} is {value}, not a finite number")
        if isinstance(value, Decimal) and _written_length(value) > _MAX_NUMBER_CHARS:
            # 1e-100000000 is finite, and 100 million characters written out.
            raise _RowError(f"field {key!r} is {value}, a number too long to write out")
        value = str(value) if isinstance(value, int) else format(value, "f")
    if not isinstance(value, str):
        kind = "a number" if number else type(value).__name__
        raise _RowError(f"field {key!r} is {kind}, not text")
    if not value.strip():
        raise _RowError(f"empty field {key!r}")
    return value.strip()


# GSM8K's calculator annotations ("$<<9*2=18>>18"): markup for a tool, not text to learn.
_CALCULATOR_ANNOTATION = re.compile(r"<<[^<>]*>>")


def _gsm8k_row(record: Mapping[str, Any], line: int, default_id: str) -> Example:
    """GSM8K: the gold is what follows the last "####", commas removed, and must be numeric; the
    worked solution before it, without its calculator annotations, is the rationale."""
    question = _text(record, "question")
    full = _text(record, "answer", allow_number=True)
    if "####" not in full:
        raise _RowError("answer has no '####' marker")
    worked, written = (part.strip() for part in full.rsplit("####", 1))
    gold = written.replace(",", "")
    if not gold:
        raise _RowError("empty answer after '####'")
    # A number as evaluation reads one back from a completion (no exponent, no trailing dot):
    # a gold it could never read would be a question no model can get right.
    if not is_plain_number(written) or normalize_number(gold) is None:
        raise _RowError(f"answer after '####' is not a plain number: {written!r}")
    rid = str(record["id"]) if record.get("id") not in (None, "") else default_id
    rationale = _CALCULATOR_ANNOTATION.sub("", worked)
    return Example(id=rid, question=question, answer=gold, source_line=line, rationale=rationale)


def _arc_row(record: Mapping[str, Any], line: int, default_id: str) -> Example:
    """ARC, in the Hugging Face layout or AI2's original one (question.stem/question.choices)."""
    q = record.get("question")
    if isinstance(q, Mapping):  # AI2: {"question": {"stem", "choices": [{"text", "label"}]}}
        stem = _text(q, "stem")
        raw = q.get("choices")
        if not isinstance(raw, list):
            raise _RowError("missing field 'question.choices'")
    else:  # Hugging Face: {"question": str, "choices": {"text": [...], "label": [...]}}
        stem = _text(record, "question")
        ch = record.get("choices")
        if not isinstance(ch, Mapping):
            raise _RowError("missing field 'choices'")
        texts, labels = ch.get("text"), ch.get("label")
        if not isinstance(texts, list) or not isinstance(labels, list):
            raise _RowError("'choices' needs lists 'text' and 'label'")
        if len(texts) != len(labels):
            raise _RowError(f"{len(texts)} choice texts but {len(labels)} labels")
        raw = [{"text": t, "label": lb} for t, lb in zip(texts, labels, strict=True)]
    options = []
    for c in raw:
        if not isinstance(c, Mapping):
            raise _RowError("a choice is not an object")
        options.append((_text(c, "label", allow_number=True), _text(c, "text")))
    if len(options) < 2:
        raise _RowError(f"{len(options)} options; multiple choice needs at least 2")
    labels_seen = [lb for lb, _ in options]
    if len(set(labels_seen)) != len(labels_seen):
        raise _RowError(f"repeated option labels {labels_seen}")
    key = _text(record, "answerKey", allow_number=True)
    if key not in labels_seen:
        raise _RowError(f"answerKey {key!r} is not one of the labels {labels_seen}")
    rid = str(record["id"]) if record.get("id") not in (None, "") else default_id
    return Example(id=rid, question=stem, answer=key, options=tuple(options), source_line=line)


def _fields_row(
    question_field: str, answer_field: str, id_field: str | None
) -> Callable[[Mapping[str, Any], int, str], Example]:
    """A parser for generic records with the given field names."""

    def parse(record: Mapping[str, Any], line: int, default_id: str) -> Example:
        question = _text(record, question_field)
        answer = _text(record, answer_field, allow_number=True)
        rid = _text(record, id_field, allow_number=True) if id_field else default_id
        return Example(id=rid, question=question, answer=answer, source_line=line)

    return parse


_Row = tuple[int, "Mapping[str, Any] | None", "str | None"]  # (line, record, problem)


_WIDE_BOMS = {  # byte-order marks of encodings that are not UTF-8: the whole file is unusable
    b"\xff\xfe\x00\x00": "UTF-32",
    b"\x00\x00\xfe\xff": "UTF-32",
    b"\xff\xfe": "UTF-16",
    b"\xfe\xff": "UTF-16",
}


def _read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(path, [(0, f"cannot read file: {exc}")]) from exc
    for bom, name in _WIDE_BOMS.items():
        if data.startswith(bom):
            raise DataError(path, [(0, f"the file is {name}-encoded; convert it to UTF-8")])
    return data


def _jsonl_rows(path: Path) -> Iterator[_Row]:
    """Decode and parse each line on its own, so one bad line costs one row, not the file."""
    data = _read_bytes(path)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]  # a UTF-8 byte-order mark from some editors
    lines = data.split(b"\n")
    for line_no, raw in enumerate(lines, start=1):
        # The last line of a file that does not end in a newline may have been cut off.
        cut = " (the file ends inside this line: truncated?)" if line_no == len(lines) else ""
        if not raw.strip():
            continue  # blank lines (including the one after the final newline) are not rows
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield line_no, None, f"not valid UTF-8 (byte {exc.start})"
            continue
        try:
            record = json.loads(text, parse_float=Decimal)
        except json.JSONDecodeError as exc:
            yield line_no, None, f"invalid JSON ({exc.msg} at column {exc.colno}){cut}"
            continue
        except (ValueError, RecursionError) as exc:  # an integer of 4,300+ digits, deep nesting
            yield line_no, None, f"unreadable JSON ({type(exc).__name__}: {str(exc)[:100]})"
            continue
        if not isinstance(record, dict):
            yield line_no, None, f"expected a JSON object, got {type(record).__name__}"
            continue
        if _holds_lone_surrogate(record):
            yield line_no, None, "a string holds a lone UTF-16 surrogate escape (\\ud800-\\udfff)"
            continue
        yield line_no, record, None


def _holds_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return _LONE_SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(_holds_lone_surrogate(k) or _holds_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_holds_lone_surrogate(v) for v in value)
    return False


def _csv_rows(path: Path, required: Sequence[str]) -> Iterator[_Row]:
    """CSV with a header row. Bytes that are not UTF-8 are kept as surrogates while parsing
    (quoted fields may span lines, so the file cannot be decoded line by line) and the rows
    that hold them are reported; row numbers are the line where the row starts. A header
    without a ``required`` column is a configuration error, raised whatever ``on_error``."""
    text = _read_bytes(path).decode("utf-8-sig", errors="surrogateescape")
    # strict: a quoted field still open at the end of the file (a truncated file) is an error,
    # not a row that silently swallows the rest of the file.
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = [h.strip() for h in next(reader, [])]
    except csv.Error as exc:
        raise DataError(path, [(1, f"unreadable CSV header: {exc}")]) from exc
    missing = [f for f in required if f not in header]
    if missing:
        raise DataError(path, [(1, f"CSV header {header} lacks column(s) {missing}")])
    repeated = sorted({h for h in header if header.count(h) > 1})
    if repeated:  # which of the two would a row mean?
        raise DataError(path, [(1, f"CSV header {header} repeats column(s) {repeated}")])
    while True:
        start = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            hint = (
                ": a quoted field is never closed (truncated?)" if "end of data" in str(exc) else ""
            )
            yield start, None, f"invalid CSV ({exc}){hint}"
            continue
        if not any(c.strip() for c in cells):
            continue
        if any(_SURROGATE.search(c) for c in cells):
            yield start, None, "not valid UTF-8"
        elif len(cells) != len(header):
            yield start, None, f"{len(cells)} fields, header has {len(header)}"
        else:
            yield start, dict(zip(header, cells, strict=True)), None


def _collect(
    path: Path,
    rows: Iterable[_Row],
    parse: Callable[[Mapping[str, Any], int, str], Example],
    on_error: OnError,
) -> list[Example]:
    """Run ``parse`` over ``rows``, enforce unique ids, and apply the ``on_error`` policy."""
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    examples: list[Example] = []
    problems: list[tuple[int, str]] = []
    first_line: dict[str, int] = {}
    for line, record, problem in rows:
        if problem is None and record is not None:
            try:
                ex = parse(record, line, f"{path.stem}-{line}")
            except _RowError as exc:
                problem = str(exc)
            else:
                if ex.id in first_line:
                    problem = f"duplicate id {ex.id!r} (first at line {first_line[ex.id]})"
                else:
                    first_line[ex.id] = line
                    examples.append(ex)
                    continue
        problems.append((line, problem or "malformed row"))
        if on_error == "skip":
            logger.warning("%s: line %d: %s; skipping", path, line, problem)
    if problems and on_error == "raise":
        raise DataError(path, problems)
    if not examples:
        raise DataError(path, [(0, "no valid rows")] + problems)
    if problems:
        logger.warning("%s: skipped %d malformed rows, kept %d", path, len(problems), len(examples))
    logger.info("%s: loaded %d examples", path, len(examples))
    return examples


def load_gsm8k(path: str | os.PathLike[str], *, on_error: OnError = "skip") -> list[Example]:
    """GSM8K in its own JSONL layout ({"question", "answer": "... #### 72"}).

    Ids are the row's "id" field when present, else "<file stem>-<line>" (e.g. "test-17"),
    stable across runs so evaluation records can be compared.
    """
    p = Path(path)
    return _collect(p, _jsonl_rows(p), _gsm8k_row, on_error)


def load_arc(path: str | os.PathLike[str], *, on_error: OnError = "skip") -> list[Example]:
    """ARC-Challenge as JSONL in the Hugging Face or the original AI2 layout (mixed is fine).

    The gold ``answer`` is the option label (``answerKey``); labels are kept as given, since
    some ARC questions use "1".."4" instead of "A".."D".
    """
    p = Path(path)
    return _collect(p, _jsonl_rows(p), _arc_row, on_error)


def load_records(
    path: str | os.PathLike[str],
    question_field: str = "question",
    answer_field: str = "answer",
    id_field: str | None = None,
    *,
    on_error: OnError = "skip",
) -> list[Example]:
    """Open-answer records from JSONL or CSV (chosen by extension) with custom field names.

    The answer is taken verbatim (stripped); no "####" parsing. A CSV whose header lacks a
    named column is a configuration error, raised whatever ``on_error`` says.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in _JSONL_SUFFIXES:
        rows = _jsonl_rows(p)
    elif suffix == ".csv":
        rows = _csv_rows(p, [f for f in (question_field, answer_field, id_field) if f])
    else:
        raise DataError(p, [(0, f"unknown file type {suffix!r}; use .jsonl or .csv")])
    return _collect(p, rows, _fields_row(question_field, answer_field, id_field), on_error)


@dataclass
class DatasetSpec:
    """Where a dataset lives and how to read it (the ``data:`` block of a run config).

    ``format`` is gsm8k | arc | jsonl | csv; the field names apply to jsonl/csv only.
    ``on_error`` defaults to "skip" so one bad row does not stop a run; the warnings say which.
    """

    format: Literal["gsm8k", "arc", "jsonl", "csv"]
    path: str
    question_field: str = "question"
    answer_field: str = "answer"
    id_field: str | None = None
    on_error: OnError = "skip"


def load_dataset(spec: DatasetSpec | Mapping[str, Any]) -> list[Example]:
    """Load the dataset a :class:`DatasetSpec` (or an equivalent mapping) describes."""
    if isinstance(spec, Mapping):
        known = {f.name for f in fields(DatasetSpec)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(f"unknown dataset spec keys {unknown}; known: {sorted(known)}")
        if "format" not in spec or "path" not in spec:
            raise ValueError("a dataset spec needs 'format' and 'path'")
        spec = DatasetSpec(**spec)
    fmt = spec.format.lower()
    if fmt == "gsm8k":
        return load_gsm8k(spec.path, on_error=spec.on_error)
    if fmt == "arc":
        return load_arc(spec.path, on_error=spec.on_error)
    if fmt in ("jsonl", "csv"):
        suffix = Path(spec.path).suffix.lower()
        expected = _JSONL_SUFFIXES if fmt == "jsonl" else (".csv",)
        if suffix not in expected:
            raise DataError(spec.path, [(0, f"format {fmt!r} but file extension {suffix!r}")])
        return load_records(
            spec.path,
            spec.question_field,
            spec.answer_field,
            spec.id_field,
            on_error=spec.on_error,
        )
    raise ValueError(f"unknown dataset format {spec.format!r}; use gsm8k, arc, jsonl or csv")


_HF_NAMES = {
    "gsm8k": ("openai/gsm8k", "main", _gsm8k_row),
    "arc": ("allenai/ai2_arc", "ARC-Challenge", _arc_row),
}


def load_hf_dataset(name: str, split: str, *, on_error: OnError = "skip") -> list[Example]:
    """GSM8K or ARC-Challenge from the Hugging Face Hub ("gsm8k" | "arc").

    Needs the optional ``datasets`` package and network access; the local loaders are the
    supported path (tests and offline clusters never touch this). Row numbers are 1-based
    indices into the split.
    """
    if name not in _HF_NAMES:
        raise ValueError(f"unknown hub dataset {name!r}; use one of {sorted(_HF_NAMES)}")
    try:
        import datasets  # optional dependency, imported only when asked for
    except ImportError as exc:
        raise ImportError("load_hf_dataset needs `pip install datasets`") from exc
    repo, config, parse = _HF_NAMES[name]
    rows = datasets.load_dataset(repo, config, split=split)
    source = Path(f"{name}-{split}")
    return _collect(source, ((i, dict(r), None) for i, r in enumerate(rows, 1)), parse, on_error)


def format_arc_question(example: Example) -> str:
    """The paper's ARC prompt body: question, "(A) text (B) text ...", then the instruction."""
    if not example.options:
        raise ValueError(f"example {example.id!r} has no options")
    opts = " ".join(f"({label}) {text}" for label, text in example.options)
    return f"Question: {example.question}\nOptions: {opts}\n{ARC_INSTRUCTION}"


def chat_template_in_use(tokenizer: Any, use_chat_template: bool | Literal["auto"]) -> bool:
    """Whether prompts go through the chat template: as asked, or with "auto" when the
    tokenizer has one."""
    if use_chat_template == "auto":
        return bool(getattr(tokenizer, "chat_template", None))
    return bool(use_chat_template)


def build_prompt(
    tokenizer: Any,
    question: str,
    *,
    template: str = GSM8K_TEMPLATE,
    use_chat_template: bool | Literal["auto"] = "auto",
) -> str:
    """The prompt text x for ``question``: ``template`` filled in, then the chat template.

    Instruct models (all three in the paper) were tuned on their chat format, so the question
    goes in as a user turn with the generation prompt appended; "auto" does that only when the
    tokenizer has a chat template, so base models and toy tokenizers get plain text. For ARC
    pass ``format_arc_question(ex)`` with ``template="{question}"``. ``str.format`` fills only
    the template, so braces inside the question are safe.
    """
    content = template.format(question=question)
    if not chat_template_in_use(tokenizer, use_chat_template):
        return content
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("use_chat_template is on but the tokenizer has no chat template")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    return str(prompt)


def answer_text(gold: str, template: str = "The answer is {answer}.") -> str:
    """The LaTRO answer y for ``gold`` (the caller appends the end-of-turn token)."""
    return template.format(answer=gold)


def gold_answer_string(example: Example) -> str:
    """The gold as it should follow "The answer is": "(B) text" for multiple choice (so the
    self-reward scores the option the ARC prompt asks for), the number otherwise."""
    for label, text in example.options:
        if label == example.answer:
            return f"({label}) {text}"
    return example.answer

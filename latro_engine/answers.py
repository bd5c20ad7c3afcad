"""Answer extraction and comparison for evaluation (GSM8K numbers, ARC option labels).

The rules follow the paper's evaluation (LATRO.md, "Evaluation"):

* GSM8K: the first number after the *last* "The answer is" (case-insensitive), else the last
  number anywhere in the output; commas removed; compared numerically. Taking the last template
  matters because models often revise themselves ("The answer is 5. Actually the answer is 7").
* ARC: the option whose letter or text appears in the sentence that holds "the answer is".

Everything here is pure string work so it can be tested exhaustively without a model.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation, localcontext

__all__ = [
    "DEFAULT_TEMPLATE",
    "answer_marker",
    "extract_choice",
    "extract_numeric_answer",
    "find_numbers",
    "is_plain_number",
    "majority_vote",
    "normalize_number",
    "numbers_equal",
]

DEFAULT_TEMPLATE = "The answer is"

# A number: optional sign and "$" (either order), digits with optional thousands groups and an
# optional decimal part, or a bare ".5". The look-behinds reject digits glued to a word ("mp3",
# "COVID19") or continuing a previous number ("1.2.3" yields neither "2.3" nor ".3"), but not
# digits after a dot that ends a word or an ellipsis ("Rs.500", "is...5"); a bare ".5" needs
# no dot before it. A trailing period is never part of the number because the decimal part
# needs a digit after the dot.
_NUMBER_RE = re.compile(
    r"(?<!\w)(?<!\d\.)"
    r"(?P<sign>[-\u2212])?(?:\$\s?)?(?P<sign2>[-\u2212])?"
    r"(?P<body>\d+(?:,\d{3})*(?:\.\d+)?|(?<!\.)\.\d+)"
    r"(?!\d)"
)

# Where a sentence starts: after a newline, or after ".", "!" or "?" followed by whitespace.
_SENTENCE_BREAK_RE = re.compile(r"\n|[.!?](?=\s)")


def answer_marker(answer_template: str) -> str:
    """What evaluation looks for before the answer, from the answer template the model is
    trained to write: the text before ``{answer}`` without the spaces, markup, brackets and
    quotes around it ("The answer is ({answer})." -> "The answer is", so "(B)" still follows
    it; "**Answer:** {answer}" -> "Answer:"), or DEFAULT_TEMPLATE when nothing is left."""
    return answer_template.split("{answer}")[0].strip(" \t\n([{<\"'*_`") or DEFAULT_TEMPLATE


def find_numbers(text: str) -> list[str]:
    """All numbers in ``text`` in order, normalized to plain digits ("$1,234.5" -> "1234.5")."""
    found = []
    for m in _NUMBER_RE.finditer(text):
        body = m.group("body").replace(",", "")
        if body.startswith("."):
            body = "0" + body
        negative = m.group("sign") or m.group("sign2")
        found.append(("-" if negative else "") + body)
    return found


def is_plain_number(text: str) -> bool:
    """Whether ``text`` is one number as :func:`find_numbers` reads them (a sign, "$", thousands
    commas, a decimal part; no exponent, no trailing dot)."""
    return _NUMBER_RE.fullmatch(text) is not None


def _last_template(text: str, template: str) -> re.Match[str] | None:
    """The last case-insensitive occurrence of ``template`` (on the original text: lowering it
    first would shift positions where a character lowers to two, as "\u0130" does)."""
    matches = list(re.finditer(re.escape(template), text, re.IGNORECASE))
    return matches[-1] if matches else None


def extract_numeric_answer(text: str, template: str = DEFAULT_TEMPLATE) -> str | None:
    """The GSM8K prediction in ``text``, or None when it holds no number.

    The first number after the last occurrence of ``template`` (case-insensitive); if the
    template is absent, or nothing numeric follows its last occurrence (a truncated output),
    the last number in the whole text. Commas are dropped; "$" and "%" are ignored.
    """
    if not text:
        return None
    found = _last_template(text, template) if template else None
    if found is not None:
        after = find_numbers(text[found.end() :])
        if after:
            return after[0]
    numbers = find_numbers(text)
    return numbers[-1] if numbers else None


def _to_decimal(value: str | None) -> Decimal | None:
    """Parse a number the way answers are written ("$1,000", "42.", "12.5%"); None if not one."""
    if value is None:
        return None
    s = value.strip().replace(",", "").replace("$", "").replace("\u2212", "-").rstrip("%").strip()
    s = s.rstrip(".")
    if not s:
        return None
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    return d if d.is_finite() else None


def normalize_number(value: str | None) -> str | None:
    """Canonical text for a number ("42.0" -> "42", "1,000" -> "1000", "-0" -> "0"), else None.

    Used as the voting key in maj@k so that "42" and "42.00" count as the same answer.
    """
    d = _to_decimal(value)
    if d is None:
        return None
    if d == 0:
        return "0"
    with localcontext() as ctx:  # normalize() rounds to the context's precision (28 digits)
        ctx.prec = max(28, len(d.as_tuple().digits))
        try:
            return format(d.normalize(), "f")
        except ArithmeticError:  # an exponent beyond the context's ("1e1000000"): no answer
            return None


def numbers_equal(a: str | None, b: str | None) -> bool:
    """Exact numeric equality of two answer strings; None or non-numbers are never equal.

    Decimal rather than float, so "0.1" vs "0.10" is exact and large integers do not round.
    """
    da, db = _to_decimal(a), _to_decimal(b)
    return da is not None and db is not None and da == db


def _sentence_span(text: str, begin: int, end: int) -> tuple[int, int]:
    """The sentence holding text[begin:end]: where it starts, and where it ends after ``end``.
    When nothing but markup (":", "*", spaces) follows the template on its line ("The answer
    is:" then "**(B) water**" on the next line), the sentence runs on through the next
    non-empty line."""
    start = 0
    for m in _SENTENCE_BREAK_RE.finditer(text, 0, begin):
        start = m.end()
    stop = _SENTENCE_BREAK_RE.search(text, end)
    line_end = text.find("\n", end)
    if line_end >= 0 and not text[end:line_end].strip(" \t:*_"):
        rest = text[line_end:]
        stop = _SENTENCE_BREAK_RE.search(text, line_end + len(rest) - len(rest.lstrip()))
    return start, len(text) if stop is None else stop.start()


def _option_patterns(
    options: Sequence[tuple[str, str]], *, bare_labels: bool
) -> list[tuple[re.Pattern[str], str]]:
    """Regexes that name each option: "(B)" or "(b)", a bare "B" as a word (if ``bare_labels``; off
    where a sentence-initial article "A" would be misread as a label), or the option's text."""
    patterns = []
    for label, option_text in options:
        lab = re.escape(label)
        patterns.append((re.compile(rf"\(\s*{lab}\s*\)", re.IGNORECASE), label))
        if bare_labels:
            patterns.append((re.compile(rf"(?<![\w(]){lab}(?![\w)])"), label))
        words = option_text.strip().split()
        if words:
            body = r"\s+".join(re.escape(w) for w in words)
            left = r"(?<!\w)" if words[0][0].isalnum() else ""
            right = r"(?!\w)" if words[-1][-1].isalnum() else ""
            patterns.append((re.compile(left + body + right, re.IGNORECASE), label))
    return patterns


def _first_option(
    segment: str, patterns: list[tuple[re.Pattern[str], str]], starts_before: int | None = None
) -> str | None:
    """The label named earliest in ``segment`` (the longer match wins at the same position),
    among mentions that start before ``starts_before`` (default: anywhere). A mention may run
    past that point: an option's own text may hold a sentence break ("The plant dies.")."""
    limit = len(segment) if starts_before is None else starts_before
    best: tuple[int, int, str] | None = None
    for pattern, label in patterns:
        m = pattern.search(segment)
        if m and m.start() < limit and (best is None or (m.start(), -len(m.group())) < best[:2]):
            best = (m.start(), -len(m.group()), label)
    return None if best is None else best[2]


def extract_choice(
    text: str, options: Sequence[tuple[str, str]], template: str = DEFAULT_TEMPLATE
) -> str | None:
    """The label of the option ``text`` answers with, or None.

    Looks only at the sentence holding the last ``template`` (case-insensitive; the sentence
    runs on to the next line when only markup follows the template on its own): first in the
    part after the template, where the earliest mention of an option wins ("The answer is (B)
    water" -> B even though "water" may also match), then in the part before it ("For (C) the
    answer is yes", where a bare letter does not count). Without the template there is no
    answer: guessing from option names scattered through a rationale would reward rationales
    that list every option.
    """
    if not text or not options:
        return None
    match = _last_template(text, template)
    if match is None:
        return None
    start, end = _sentence_span(text, match.start(), match.end())
    after = text[match.end() :]  # a mention must start in the sentence, may end past it
    found = _first_option(after, _option_patterns(options, bare_labels=True), end - match.end())
    if found is None:
        before = text[start : match.start()]
        found = _first_option(before, _option_patterns(options, bare_labels=False))
    return found


def majority_vote(answers: Sequence[str | None], *, numeric: bool = True) -> str | None:
    """The most common answer among the non-None ones (self-consistency, maj@k), or None.

    Answers are compared after normalization (numbers canonicalized when ``numeric``, else
    whitespace-stripped) and the normalized form is returned. Ties go to the answer seen first,
    which keeps the vote deterministic for a fixed sample order.
    """
    keys: list[str] = []
    for a in answers:
        if a is None:
            continue
        key = (normalize_number(a) or a.strip()) if numeric else a.strip()
        keys.append(key)
    if not keys:
        return None
    counts = Counter(keys)
    top = max(counts.values())
    return next(k for k in keys if counts[k] == top)

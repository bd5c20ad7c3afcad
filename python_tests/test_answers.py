"""Answer extraction (GSM8K numbers, ARC labels), numeric comparison and majority voting."""

from __future__ import annotations

import pytest

from latro_engine.answers import (
    answer_marker,
    extract_choice,
    extract_numeric_answer,
    find_numbers,
    majority_vote,
    normalize_number,
    numbers_equal,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is 1,234.", "1234"),
        ("the answer is -3", "-3"),
        ("THE ANSWER IS 9", "9"),
        ("The answer is $18.50", "18.50"),
        ("The answer is -$5.", "-5"),
        ("The answer is $-5.", "-5"),
        ("The answer is 42.", "42"),
        ("The answer is: 42 apples", "42"),
        ("The answer is 1,000,000 dollars.", "1000000"),
        ("The answer is 0.5", "0.5"),
        ("The answer is .5", "0.5"),
        ("The answer is 12.5%", "12.5"),
        ("The answer is 5. Actually the answer is 7", "7"),
        ("The answer is 3. The answer is 4. The answer is 5.", "5"),
        ("First 3 then the answer is 10 and later 99", "10"),  # first after the template
        ("She has 3 apples and buys 4 more, so 7 in total.", "7"),  # no template: last number
        ("5 - 3 = 2", "2"),  # a spaced minus is an operator, not a sign
        ("No numbers here at all.", None),
        ("", None),
        ("The answer is unknown.", None),
        ("We get 8 cookies. The answer is", "8"),  # nothing after the template: last number
        ("COVID19 and mp3 files; the answer is 4", "4"),
        ("COVID19 and mp3 files", None),  # digits glued to a word are not numbers
        ("He came 3rd", "3"),
        ("x=5", "5"),
        ("The answer is \u22124", "-4"),  # unicode minus
        ("Result: 1,2345", "2345"),  # not a thousands group
        ("The answer is 7\n\nThe answer is 8.\n", "8"),
        ("She has 3 apples. The answer is...5", "5"),  # after an ellipsis, not ".5"
        ("The answer is Rs.500", "500"),  # after a dot that ends a word
        ("v1.2.3 then the answer is", None),  # glued to a word, then continuing it
        ("\u0130\u0130 The answer is 15", "15"),  # "\u0130" lowers to two characters
    ],
)
def test_extract_numeric_answer(text, expected):
    assert extract_numeric_answer(text) == expected


def test_extract_numeric_custom_template():
    assert extract_numeric_answer("Answer: 12. So 13", template="Answer:") == "12"
    assert extract_numeric_answer("The answer is 5. So 13", template="Answer:") == "13"


def test_find_numbers_order_and_forms():
    assert find_numbers("$1,234.5 then -2 then 3% and v1.2.3") == ["1234.5", "-2", "3"]


@pytest.mark.parametrize(
    ("a", "b", "equal"),
    [
        ("42.0", "42", True),
        ("1,000", "1000", True),
        ("$18.50", "18.5", True),
        ("-3", "-3.00", True),
        ("0.1", "0.10", True),
        ("12345678901234567890", "12345678901234567891", False),  # no float rounding
        ("42", "43", False),
        (None, "42", False),
        (None, None, False),
        ("abc", "abc", False),
        ("", "0", False),
    ],
)
def test_numbers_equal(a, b, equal):
    assert numbers_equal(a, b) is equal


def test_normalize_number():
    assert normalize_number("42.00") == "42"
    assert normalize_number("420") == "420"
    assert normalize_number("1,000") == "1000"
    assert normalize_number("-0.0") == "0"
    assert normalize_number("12.50") == "12.5"
    assert normalize_number("nan") is None
    assert normalize_number("seven") is None
    big = "1234567890123456789012345678901234567890"  # 40 digits: no rounding to 28
    assert normalize_number(big) == big and normalize_number(big + ".000") == big


OPTIONS = (("A", "water"), ("B", "salt water"), ("C", "Vitamin C"), ("D", "sand"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is (B).", "B"),
        ("The answer is B.", "B"),
        ("the answer is ( d )", "D"),
        ("The answer is (B) salt water.", "B"),
        ("The answer is salt water.", "B"),  # longer option text wins over "water"
        ("The answer is WATER.", "A"),
        ("The answer is Vitamin C", "C"),
        ("The answer is (A) water. Wait, the answer is (D) sand.", "D"),  # last sentence
        ("For (D), the answer is clearly right.", "D"),  # earlier in the same sentence
        ("A plant needs light, so the answer is unclear.", None),  # article "A" is no label
        ("Sand is heavy. The answer is none of these.", None),  # other sentences don't count
        ("I think (B) is right.", None),  # no template
        ("", None),
        ("The answer is (B)\nAlso (C) is nice.", "B"),
        ("I think (C) is wrong. So the answer is clear. Sand floats.", None),  # next sentence
        ("The answer is none. Therefore, (C) is the best.", None),
        ("The answer is\n(B) salt water", "B"),  # the answer on the next line
        ("The answer is:\n\n**D**", "D"),
    ],
)
def test_extract_choice(text, expected):
    assert extract_choice(text, OPTIONS) == expected


def test_extract_choice_numeric_labels():
    opts = (("1", "8 legs"), ("2", "6 legs"), ("3", "18 legs"))
    assert extract_choice("The answer is (2).", opts) == "2"
    assert extract_choice("The answer is 18 legs.", opts) == "3"  # "8 legs" not inside "18"
    assert extract_choice("The answer is 8 legs.", opts) == "1"
    assert extract_choice("The answer is (2).", ()) is None


def test_extract_choice_option_texts_holding_a_sentence_break():
    # ARC options are often sentences: their own "." must not end the answer's sentence first.
    opts = (("A", "The plant grows."), ("B", "The plant dies."), ("C", "U.S. Army"))
    assert extract_choice("The answer is the plant dies. It lacks water.", opts) == "B"
    assert extract_choice("The answer is The plant dies.\nSo it wilts.", opts) == "B"
    assert extract_choice("The answer is The plant dies. ", opts) == "B"
    assert extract_choice("The answer is U.S. Army.", opts) == "C"
    # ... but a mention must still start in that sentence
    assert extract_choice("The answer is unclear. The plant dies.", opts) is None


@pytest.mark.parametrize(
    ("template", "marker", "read_back"),
    [
        ("The answer is {answer}.", "The answer is", "B"),
        ("The answer is ({answer}).", "The answer is", "B"),  # "(B)" still follows the marker
        ("**Answer:** {answer}", "Answer:", "B"),
        ("{answer}", "The answer is", None),  # nothing marks the answer: the default marker
    ],
)
def test_answer_marker_from_the_answer_template(template, marker, read_back):
    assert answer_marker(template) == marker
    opts = (("A", "yes"), ("B", "no"))  # an answer written with the template reads back
    assert extract_choice(template.format(answer="(B)"), opts, marker) == read_back


def test_majority_vote_basic_and_normalized():
    assert majority_vote(["3", "4", "4", None, None, None]) == "4"
    assert majority_vote(["42", "42.0", "7"]) == "42"  # numerically the same answer
    assert majority_vote(["1,000", "1000.00", "5"]) == "1000"
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None


def test_majority_vote_ties_go_to_first_seen():
    assert majority_vote(["7", "3", "3", "7"]) == "7"
    assert majority_vote(["3", "7", "7", "3"]) == "3"
    assert majority_vote([None, "B", "A"], numeric=False) == "B"
    assert majority_vote(["A", "B", " B", "A "], numeric=False) == "A"


def test_majority_vote_non_numeric_strings_kept():
    assert majority_vote(["x", "y", "y"], numeric=True) == "y"

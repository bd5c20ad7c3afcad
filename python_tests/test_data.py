"""Dataset loading (real GSM8K, malformed rows, CSV, ARC) and prompt building."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import pytest

from latro_engine.config import ConfigError
from latro_engine.data import (
    DataError,
    DatasetSpec,
    Example,
    answer_text,
    build_prompt,
    format_arc_question,
    gold_answer_string,
    load_arc,
    load_dataset,
    load_gsm8k,
    load_hf_dataset,
    load_records,
)


def _gsm8k_dir() -> Path:
    """$LATRO_DATA_DIR (the data root, or its gsm8k/ folder), else ../shared/data/gsm8k."""
    env = os.environ.get("LATRO_DATA_DIR")
    if env:
        root = Path(env)
        return root if (root / "train.jsonl").exists() else root / "gsm8k"
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k"


GSM8K_DIR = _gsm8k_dir()
needs_gsm8k = pytest.mark.skipif(
    not (GSM8K_DIR / "train.jsonl").exists(), reason=f"GSM8K not found at {GSM8K_DIR}"
)


# ------------------------------------------------------------------------ real GSM8K


@needs_gsm8k
@pytest.mark.parametrize(("split", "size"), [("train", 7473), ("test", 1319)])
def test_real_gsm8k_loads_every_row(split, size):
    examples = load_gsm8k(GSM8K_DIR / f"{split}.jsonl", on_error="raise")
    assert len(examples) == size
    assert len({e.id for e in examples}) == size
    assert [e.source_line for e in examples] == list(range(1, size + 1))
    for e in examples:
        assert e.question and "####" not in e.answer and "," not in e.answer
        float(e.answer)  # every gold is a plain number
        assert e.options == ()


@needs_gsm8k
def test_real_gsm8k_first_example():
    first = load_gsm8k(GSM8K_DIR / "train.jsonl")[0]
    assert first.id == "train-1"
    assert first.answer == "72"
    assert first.question.startswith("Natalia sold clips")


# ------------------------------------------------------------------------ malformed rows


def _row(qid: str, question: str = "How many?", answer: str = "So 3.\n#### 3") -> bytes:
    return json.dumps({"id": qid, "question": question, "answer": answer}).encode() + b"\n"


@pytest.fixture
def bad_gsm8k(tmp_path: Path) -> Path:
    lines = [
        _row("a"),  # 1 ok
        b'{"id": "b", "question": "Broken",\n',  # 2 invalid JSON
        json.dumps({"id": "c", "question": "No answer"}).encode() + b"\n",  # 3 missing field
        _row("d", question="   "),  # 4 empty question
        _row("e", answer="It is seven.\n#### seven"),  # 5 non-numeric answer
        b'{"id": "f", "question": "caf\xe9", "answer": "#### 1"}\n',  # 6 latin-1 byte
        _row("g", answer="#### 1,234"),  # 7 ok, comma removed
        b"\n",  # 8 blank: not a row
        _row("a"),  # 9 duplicate id
        b"[1, 2, 3]\n",  # 10 not an object
        _row("k", answer="No marker 5"),  # 11 no ####
        _row("l", answer="####   "),  # 12 empty after ####
        b'{"id": "m", "question": "Cut off", "answer": "#### 4"',  # 13 truncated, no newline
    ]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"".join(lines))
    return path


BAD_LINES = [2, 3, 4, 5, 6, 9, 10, 11, 12, 13]


def test_malformed_rows_skipped_with_line_warnings(bad_gsm8k, caplog):
    with caplog.at_level(logging.WARNING, logger="latro_engine.data"):
        examples = load_gsm8k(bad_gsm8k, on_error="skip")
    assert [(e.id, e.answer, e.source_line) for e in examples] == [("a", "3", 1), ("g", "1234", 7)]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for line in BAD_LINES:
        assert any(f"line {line}:" in w for w in warnings), line
    assert any("skipped 10 malformed rows, kept 2" in w for w in warnings)
    joined = "\n".join(warnings)
    for reason in ("invalid JSON", "missing field 'answer'", "empty field 'question'",
                   "not a plain number: 'seven'", "not valid UTF-8", "duplicate id 'a'",
                   "expected a JSON object", "no '####'", "empty answer"):  # fmt: skip
        assert reason in joined, reason


def test_malformed_rows_raise_lists_every_line(bad_gsm8k):
    with pytest.raises(DataError) as info:
        load_gsm8k(bad_gsm8k, on_error="raise")
    err = info.value
    assert isinstance(err, ValueError)
    assert [line for line, _ in err.problems] == BAD_LINES
    msg = str(err)
    assert str(bad_gsm8k) in msg
    for line in BAD_LINES:
        assert f"line {line}:" in msg
    assert "line 13: invalid JSON" in msg  # the truncated last line
    assert "line 9: duplicate id 'a' (first at line 1)" in msg


def test_no_valid_rows_raises_in_both_modes(tmp_path):
    path = tmp_path / "allbad.jsonl"
    path.write_bytes(b"not json\n" + _row("x", answer="#### many"))
    for mode in ("skip", "raise"):
        with pytest.raises(DataError, match=r"line 1: invalid JSON"):
            load_gsm8k(path, on_error=mode)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no valid rows"):
        load_gsm8k(empty)


def test_missing_file_and_bad_mode(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        load_gsm8k(tmp_path / "nope.jsonl")
    (tmp_path / "ok.jsonl").write_bytes(_row("a"))
    with pytest.raises(ValueError, match="on_error"):
        load_gsm8k(tmp_path / "ok.jsonl", on_error="ignore")  # type: ignore[arg-type]


def test_bom_and_crlf_tolerated(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + _row("a").replace(b"\n", b"\r\n") + _row("b"))
    assert [e.id for e in load_gsm8k(path, on_error="raise")] == ["a", "b"]


def test_truncated_jsonl_names_the_cut_line(tmp_path):
    path = tmp_path / "cut.jsonl"
    path.write_bytes(_row("a") + _row("b")[:20])  # the file stops inside row 2
    with pytest.raises(DataError, match=r"line 2: invalid JSON .*truncated\?"):
        load_gsm8k(path, on_error="raise")
    assert [e.id for e in load_gsm8k(path)] == ["a"]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32"])
def test_wide_encodings_are_rejected_as_a_whole(tmp_path, encoding):
    path = tmp_path / "wide.jsonl"
    path.write_bytes(_row("a").decode().encode(encoding))  # with its byte-order mark
    for mode in ("skip", "raise"):
        with pytest.raises(DataError, match=f"{encoding.upper()}-encoded; convert it to UTF-8"):
            load_gsm8k(path, on_error=mode)


def test_truncated_csv_names_the_unclosed_quote(tmp_path):
    path = tmp_path / "cut.csv"
    path.write_bytes(b'question,answer\nq1,1\n"q2 is cut off,2\nq3,3\n')
    with pytest.raises(DataError, match=r"line 3: invalid CSV .*never closed \(truncated\?\)"):
        load_records(path, on_error="raise")
    assert [e.question for e in load_records(path)] == ["q1"]


# ------------------------------------------------------------------------ generic records


def test_csv_with_custom_fields(tmp_path, caplog):
    path = tmp_path / "qa.csv"
    path.write_bytes(
        b"uid,prompt,target\n"  # 1 header
        b'q1,"What is 2+2?",4\n'  # 2
        b'q2,"A question\nover two lines",yes\n'  # 3-4
        b"q3,,5\n"  # 5 empty question
        b"q4,short row\n"  # 6 wrong field count
        b"q5,caf\xe9?,1\n"  # 7 undecodable
        b"q1,again,2\n"  # 8 duplicate id
        b"q6,Last one,  7  \n"  # 9
    )
    with caplog.at_level(logging.WARNING, logger="latro_engine.data"):
        examples = load_records(path, "prompt", "target", "uid")
    assert [(e.id, e.question, e.answer, e.source_line) for e in examples] == [
        ("q1", "What is 2+2?", "4", 2),
        ("q2", "A question\nover two lines", "yes", 3),
        ("q6", "Last one", "7", 9),
    ]
    with pytest.raises(DataError) as info:
        load_records(path, "prompt", "target", "uid", on_error="raise")
    assert [line for line, _ in info.value.problems] == [5, 6, 7, 8]
    assert "line 6: 2 fields, header has 3" in str(info.value)


def test_csv_missing_column_is_a_config_error(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("question,answer\nq,1\n")
    for mode in ("skip", "raise"):
        with pytest.raises(DataError, match="lacks column"):
            load_records(path, "question", "label", on_error=mode)


def test_jsonl_records_default_ids_and_numeric_answers(tmp_path):
    path = tmp_path / "recs.jsonl"
    rows = [{"q": "one?", "a": 1}, {"q": "two?", "a": "2"}, {"q": "bad", "a": True}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = load_records(path, "q", "a")
    assert [(e.id, e.answer) for e in examples] == [("recs-1", "1"), ("recs-2", "2")]
    with pytest.raises(DataError, match="line 3: field 'a' is bool"):
        load_records(path, "q", "a", on_error="raise")


def test_jsonl_numbers_keep_their_digits_and_odd_lines_are_rows_errors(tmp_path):
    """JSON numbers as answers keep the digits written (no float rounding); NaN / Infinity,
    integers past Python's 4,300-digit limit, decimals with exponents that would write out
    millions of digits, nesting past the recursion limit and lone surrogate escapes (no
    tokenizer takes them) are row errors with their line, not a crash of the loader, a memory
    error or of the run when the prompt is first encoded."""
    path = tmp_path / "recs.jsonl"
    lines = [
        '{"q": "a?", "a": 12345678901234567.0}',  # 1
        '{"q": "b?", "a": 1e20}',  # 2
        '{"q": "c?", "a": 0.1}',  # 3
        '{"q": "d?", "a": NaN}',  # 4
        '{"q": "e?", "a": -Infinity}',  # 5
        '{"q": "f?", "a": ' + "9" * 5000 + "}",  # 6
        "[" * 100_000 + "]" * 100_000,  # 7
        '{"q": "g \\ud800 h?", "a": "1"}',  # 8
        '{"q": "i?", "a": 2}',  # 9
        '{"q": "j?", "a": 1e-100000000}',  # 10
        '{"q": "k?", "a": 1e999999999999}',  # 11
        '{"q": "l?", "a": 1.5e-3}',  # 12
    ]
    path.write_text("\n".join(lines) + "\n")
    examples = load_records(path, "q", "a")
    assert [(e.answer, e.source_line) for e in examples] == [
        ("12345678901234567.0", 1), ("100000000000000000000", 2), ("0.1", 3), ("2", 9),
        ("0.0015", 12),
    ]
    with pytest.raises(DataError) as info:
        load_records(path, "q", "a", on_error="raise")
    message = str(info.value)
    assert [line for line, _ in info.value.problems] == [4, 5, 6, 7, 8, 10, 11]
    for expected in ("line 4: field 'a' is nan, not a finite number",
                     "line 5: field 'a' is -inf, not a finite number",
                     "line 6: unreadable JSON (ValueError", "line 7: unreadable JSON (RecursionError",
                     "line 8: a string holds a lone UTF-16 surrogate",
                     "line 10: field 'a' is 1E-100000000, a number too long to write out",
                     "line 11: field 'a' is 1E+999999999999, a number too long"):  # fmt: skip
        assert expected in message, expected


def test_gsm8k_golds_must_be_numbers_evaluation_can_read_back(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_bytes(b"".join(
        [_row("a", answer="#### -1,234.5"), _row("b", answer="#### 72."),
         _row("c", answer="#### 1e1000000"), _row("d", answer="#### 1e3")]
    ))
    with pytest.raises(DataError) as info:
        load_gsm8k(path, on_error="raise")
    assert [line for line, _ in info.value.problems] == [2, 3, 4]
    assert "line 3: answer after '####' is not a plain number: '1e1000000'" in str(info.value)
    assert [e.answer for e in load_gsm8k(path)] == ["-1234.5"]
    from latro_engine.answers import normalize_number

    assert normalize_number("1e1000000") is None and normalize_number("1e3") == "1000"


def test_csv_header_repeating_a_column_is_a_config_error(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("question,answer,question\nq1,5,q2\n")
    for mode in ("skip", "raise"):
        with pytest.raises(DataError, match=r"repeats column\(s\) \['question'\]"):
            load_records(path, on_error=mode)


def test_unknown_extension(tmp_path):
    path = tmp_path / "data.parquet"
    path.write_text("x")
    with pytest.raises(DataError, match="unknown file type"):
        load_records(path)


# ------------------------------------------------------------------------ ARC


HF_ARC = {
    "id": "Mercury_1",
    "question": "Which is a liquid at room temperature?",
    "choices": {"text": ["iron", "water", "salt", "sand"], "label": ["A", "B", "C", "D"]},
    "answerKey": "B",
}
AI2_ARC = {
    "id": "NYSED_2",
    "question": {
        "stem": "How many legs does an insect have?",
        "choices": [{"text": "4", "label": "1"}, {"text": "6", "label": "2"}],
    },
    "answerKey": "2",
}


def test_arc_both_formats(tmp_path):
    path = tmp_path / "arc.jsonl"
    path.write_text(json.dumps(HF_ARC) + "\n" + json.dumps(AI2_ARC) + "\n")
    hf, ai2 = load_arc(path, on_error="raise")
    assert hf == Example(
        id="Mercury_1",
        question="Which is a liquid at room temperature?",
        answer="B",
        options=(("A", "iron"), ("B", "water"), ("C", "salt"), ("D", "sand")),
        source_line=1,
    )
    assert ai2.options == (("1", "4"), ("2", "6")) and ai2.answer == "2"
    assert ai2.question == "How many legs does an insect have?"


def test_arc_malformed(tmp_path):
    bad_key = dict(HF_ARC, id="x", answerKey="E")
    uneven = dict(HF_ARC, id="y", choices={"text": ["a", "b"], "label": ["A"]})
    no_choices = {"id": "z", "question": {"stem": "q"}, "answerKey": "A"}
    path = tmp_path / "arc.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [HF_ARC, bad_key, uneven, no_choices]))
    with pytest.raises(DataError) as info:
        load_arc(path, on_error="raise")
    msg = str(info.value)
    assert "line 2: answerKey 'E' is not one of the labels" in msg
    assert "line 3: 2 choice texts but 1 labels" in msg
    assert "line 4: missing field 'question.choices'" in msg
    assert [e.id for e in load_arc(path)] == ["Mercury_1"]


def test_format_arc_question_and_gold_string():
    ex = Example("i", "Which is wet?", "B", (("A", "sand"), ("B", "water")))
    assert format_arc_question(ex) == (
        "Question: Which is wet?\nOptions: (A) sand (B) water\n"
        "Let's think step by step first then print your answer like "
        "'The answer is (one of the options)'."
    )
    assert gold_answer_string(ex) == "(B) water"
    assert gold_answer_string(Example("g", "q", "72")) == "72"
    with pytest.raises(ValueError):
        format_arc_question(Example("g", "q", "72"))


# ------------------------------------------------------------------------ load_dataset


def test_load_dataset_dispatch(tmp_path):
    jl = tmp_path / "g.jsonl"
    jl.write_bytes(_row("a") + _row("b", answer="#### 2"))
    assert [e.answer for e in load_dataset({"format": "gsm8k", "path": str(jl)})] == ["3", "2"]
    csv_path = tmp_path / "r.csv"
    csv_path.write_text("p,t\nhi,1\n")
    spec = DatasetSpec(format="csv", path=str(csv_path), question_field="p", answer_field="t")
    assert load_dataset(spec)[0].question == "hi"
    recs = load_dataset({"format": "jsonl", "path": str(jl), "on_error": "raise"})
    assert recs[0].answer == "So 3.\n#### 3"  # generic records keep the answer verbatim
    arc = tmp_path / "a.jsonl"
    arc.write_text(json.dumps(HF_ARC) + "\n")
    assert load_dataset({"format": "arc", "path": str(arc)})[0].answer == "B"
    with pytest.raises(ValueError, match="unknown dataset spec keys"):
        load_dataset({"format": "gsm8k", "path": str(jl), "split": "x"})
    with pytest.raises(ValueError, match="unknown dataset format"):
        load_dataset({"format": "parquet", "path": str(jl)})
    with pytest.raises(DataError, match="extension"):
        load_dataset({"format": "csv", "path": str(jl)})


def test_load_hf_dataset_without_datasets_package():
    with pytest.raises(ValueError, match="unknown hub dataset"):
        load_hf_dataset("mmlu", "test")
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install datasets"):
            load_hf_dataset("gsm8k", "test")
    else:
        pytest.skip("datasets is installed; loading would need the network")


# ------------------------------------------------------------------------ prompts

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def char_tokenizer():
    from latro_engine.tokenizer import train_char_tokenizer

    return train_char_tokenizer(["abcdefghijklmnopqrstuvwxyz ABC 0123456789.?'{}|<>"])


def test_build_prompt_plain_without_chat_template(char_tokenizer):
    assert not getattr(char_tokenizer, "chat_template", None)
    assert build_prompt(char_tokenizer, "What is 2+2?") == "What is 2+2? Let's think step by step."
    with pytest.raises(ConfigError, match="use_chat_template is on but the tokenizer has no"):
        build_prompt(char_tokenizer, "q", use_chat_template=True)


def test_build_prompt_through_chat_template(char_tokenizer):
    tok = char_tokenizer
    tok.chat_template = CHAT_TEMPLATE
    try:
        got = build_prompt(tok, "What is {x}?")  # braces in the question are left alone
        assert got == "<|user|>What is {x}? Let's think step by step.<|end|><|assistant|>"
        plain = build_prompt(tok, "Q", template="{question}", use_chat_template=False)
        assert plain == "Q"
    finally:
        tok.chat_template = None


# ----------------------------------------------------------------- the end of the model's turn
# Phi-3.5's layout: the turn ends with <|end|>, the tokenizer's EOS is another token.
PHI_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}"
)
# Llama 3's: the template writes the BOS itself.
BOS_TEMPLATE = "{{ bos_token }}" + PHI_TEMPLATE


def _chat_tokenizer(template):
    from latro_engine.tokenizer import train_char_tokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    tok = train_char_tokenizer([f"{letters} {letters.upper()} 0123456789.?':"])
    tok.add_special_tokens({"additional_special_tokens": ["<|end|>", "<|user|>", "<|assistant|>"]})
    tok.chat_template = template
    return tok


def test_answers_and_stops_end_with_the_chat_templates_turn_end():
    from latro_engine.config import LatroConfig
    from latro_engine.generation import encode_answers, end_ids, turn_end_id
    from latro_engine.rollout import stop_token_sequences

    tok = _chat_tokenizer(PHI_TEMPLATE)
    end = tok.convert_tokens_to_ids("<|end|>")
    config = LatroConfig(progress=False)
    assert end != tok.eos_token_id and turn_end_id(tok, config) == end
    example = Example(id="a", question="2+2?", answer="4", source_line=1)
    (answer,) = encode_answers(tok, [example], config)
    assert tok.decode(answer) == " The answer is 4.<|end|>" and answer[-1] == end
    assert end_ids(tok, config) == [end, tok.eos_token_id]
    stops = stop_token_sequences(tok, ["The answer is"], end_ids=end_ids(tok, config))
    assert stops[-2:] == [[end], [tok.eos_token_id]]
    # Without the chat template (off, or none) the turn ends with EOS.
    off = LatroConfig(progress=False, use_chat_template="off")
    assert turn_end_id(tok, off) == tok.eos_token_id and end_ids(tok, off) == [tok.eos_token_id]
    tok.chat_template = "{{ raise_exception('user turns only') }}"
    assert turn_end_id(tok, config) == tok.eos_token_id  # a template that refuses: EOS
    # Read once per tokenizer and template (it is asked at every training step), again when the
    # template changes.
    tok.chat_template = PHI_TEMPLATE
    renders = []
    render = tok.apply_chat_template
    tok.apply_chat_template = lambda *a, **kw: renders.append(1) or render(*a, **kw)
    assert [turn_end_id(tok, config) for _ in range(3)] == [end] * 3 and len(renders) == 0
    tok.chat_template = PHI_TEMPLATE + " "
    assert [turn_end_id(tok, config) for _ in range(3)] == [end] * 3 and len(renders) == 1


def test_prompts_get_one_bos_whoever_writes_it():
    from latro_engine.config import LatroConfig
    from latro_engine.generation import prompt_ids

    example = Example(id="a", question="2+2?", answer="4", source_line=1)
    config = LatroConfig(progress=False)
    for template in (PHI_TEMPLATE, BOS_TEMPLATE):  # the tokenizer adds it / the template does
        (ids,) = prompt_ids(_chat_tokenizer(template), [example], config)
        tok = _chat_tokenizer(template)
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1, template


def test_left_pad_of_no_prompts_is_an_empty_batch():
    import torch

    from latro_engine.generation import left_pad
    from latro_engine.rollout import sample_rationales

    ids, mask = left_pad([[5, 6], [7]], 0, "cpu")
    assert ids.tolist() == [[5, 6], [0, 7]] and mask.tolist() == [[1, 1], [0, 1]]
    ids, mask = left_pad([], 0, "cpu")
    assert ids.shape == mask.shape == (0, 0) and ids.dtype == mask.dtype == torch.int64
    # which the sampler takes as it is (zero rows: no forward)
    rollout = sample_rationales(torch.nn.Module(), ids, mask, k=2, max_new_tokens=4,
                                stop_sequences=[[2]], pad_token_id=0, seed=0, decoder="hf")
    assert rollout.rationale_ids.shape == (0, 4)
    with pytest.raises(ValueError, match="prompt 1 tokenizes to nothing"):
        left_pad([[5], []], 0, "cpu")


def test_answer_text():
    assert answer_text("72") == "The answer is 72."
    assert answer_text("(B) water") == "The answer is (B) water."
    assert answer_text("5", template="Answer: {answer}") == "Answer: 5"


# ------------------------------------------------------------------------ prompt lengths


def _lengths_case():
    import tiny

    from latro_engine.config import LatroConfig

    examples = [
        Example(id="short", question="2+2?", answer="4", source_line=1),
        Example(id="long", question="x" * 300, answer="4", source_line=2),
        Example(id="short2", question="3+3?", answer="6", source_line=3),
    ]
    config = LatroConfig(k=2, max_rationale_tokens=40, use_chat_template="off", progress=False)
    return tiny.tokenizer(), examples, config


def test_prompts_longer_than_the_context_are_skipped_with_their_line(caplog):
    from latro_engine.generation import fit_to_context

    tok, examples, config = _lengths_case()
    with caplog.at_level(logging.WARNING, logger="latro_engine.generation"):
        kept = fit_to_context(tok, examples, config, 256, use="latro", source="train.jsonl")
    assert [e.id for e in kept] == ["short", "short2"]
    assert any(
        "train.jsonl: line 2: example 'long'" in r.getMessage()
        and "more than the model's context of 256 tokens" in r.getMessage()
        for r in caplog.records
    )
    # The rationale limit counts for LaTRO, not for SFT: a tighter context drops more.
    assert fit_to_context(tok, examples[:1], config, 60, use="sft", source="s") == examples[:1]
    with pytest.raises(DataError, match="line 1: example 'short'"):
        fit_to_context(tok, examples[:1], config, 60, use="latro", source="s")
    assert fit_to_context(tok, examples, config, None, use="latro", source="s") == examples


def test_prompts_longer_than_the_context_raise_when_asked():
    import dataclasses

    from latro_engine.generation import fit_to_context

    tok, examples, config = _lengths_case()
    strict = dataclasses.replace(config, on_data_error="raise")
    with pytest.raises(DataError, match=r"train.jsonl: line 2: example 'long': its prompt is"):
        fit_to_context(tok, examples, strict, 256, use="latro", source="train.jsonl")


def test_trainer_checks_prompt_lengths_before_any_step(tmp_path):
    import dataclasses

    import tiny

    from latro_engine.trainer import LatroTrainer

    data = tiny.examples(4) + [Example(id="long", question="1" * 400, answer="1", source_line=5)]
    config = tiny.config(tmp_path, on_data_error="raise")
    with pytest.raises(DataError, match="train_dataset: line 5: example 'long'"):
        LatroTrainer(tiny.model(), tiny.tokenizer(), data, config)
    skip = dataclasses.replace(config, on_data_error="skip")
    trainer = LatroTrainer(tiny.model(), tiny.tokenizer(), data, skip, eval_dataset=data)
    assert [e.id for e in trainer.train_dataset] == [e.id for e in data[:4]]
    assert len(trainer.eval_dataset) == 4


def _byte_level_bpe():
    """A GPT-2 / Llama 3 style byte-level BPE, trained in memory on answer endings."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["Therefore, the answer is 18.", "So 3 + 15 = 18.\nThe answer is 18.",
              "So the total is 18. The answer is 18.", "The answer is 7.", "Answer: 5"] * 50
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<eos>"], initial_alphabet=alphabet))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<eos>")


@pytest.mark.parametrize("after_stop", ["own", "template"])
def test_answers_go_on_from_the_template_each_rationale_ended_at(after_stop):
    """The answer y after a rationale cut at "\\nThe answer is" or ", the answer is" starts with
    the template's tokens as the model wrote them: z + y is the model's own text up to the gold
    (a fixed " The answer is" would score "\\n The answer is", "Therefore, The answer is").
    Rows that ended at EOS or the limit, and every row with answer_after_stop 'template', get
    the fixed y."""
    import torch

    from latro_engine import ops
    from latro_engine.config import LatroConfig
    from latro_engine.generation import answers_after_rationales, encode_answers, end_ids
    from latro_engine.rollout import _matched_stops, stop_token_sequences

    tok = _byte_level_bpe()
    config = LatroConfig(k=2, progress=False, use_chat_template="off", answer_after_stop=after_stop)
    stops = stop_token_sequences(tok, config.stop_strings, end_ids=end_ids(tok, config))
    written = ["Therefore, the answer is 18.", "So 3 + 15 = 18.\nThe answer is 18.",
               "So the total is 18. The answer is 18.", "Answer: 18.", "So 18", "So 3 + 15"]
    encode = [tok(t, add_special_tokens=False)["input_ids"] for t in written]
    encode[4] = encode[4] + [tok.eos_token_id]  # the turn's end
    width = max(map(len, encode))
    tokens = torch.tensor([ids + [tok.eos_token_id] * (width - len(ids)) for ids in encode])
    tokens[5, len(encode[5]):] = tokens[5, 0]  # never stops: runs to the limit
    stop_pos = ops.stop_positions(tokens, stops)
    index = _matched_stops(tokens, stop_pos, stops).tolist()
    assert [i >= 0 for i in index] == [True] * 5 + [False]
    examples = [Example(id=str(i), question="q", answer="18", source_line=i) for i in range(3)]
    answers = answers_after_rationales(tok, examples, config, stops, index)
    (fixed,) = encode_answers(tok, examples[:1], config)
    for row, (text, ids, y) in enumerate(zip(written, encode, answers)):
        if after_stop == "own" and row < 3:  # not "Answer:", which the template does not hold
            assert y[-1] == tok.eos_token_id and tok.decode(ids[: stop_pos[row]] + y[:-1]) == text
            assert y[: len(stops[index[row]])] == stops[index[row]]
        else:
            assert y == fixed
    assert tok.decode(fixed) == " The answer is 18.<eos>"
    # Templates with text between the stop string and {answer}, or around it: the row goes on
    # with the rest of the template; one that does not hold the stop string gets the fixed y.
    for template, after in [("The answer is ({answer}).", " (18)."),
                            ("The answer is: {answer}", ": 18"),
                            ("\\boxed{{{answer}}}", None)]:
        other = dataclasses.replace(config, answer_template=template)
        y = answers_after_rationales(tok, examples, other, stops, index)[0]
        if after_stop == "own" and after is not None:
            assert tok.decode(encode[0][: stop_pos[0]] + y[:-1]) == "Therefore, the answer is" + after
        else:
            assert y == encode_answers(tok, examples[:1], other)[0]


def test_gsm8k_rows_keep_their_worked_solution_without_calculator_marks(tmp_path):
    """The worked solution (for the SFT baseline) is the text before "####", without GSM8K's
    calculator annotations."""
    path = tmp_path / "g.jsonl"
    row = {"question": "q?", "answer": "She sells 9 * 2 = $<<9*2=18>>18.\n#### 18"}
    path.write_text(json.dumps(row) + "\n")
    (example,) = load_gsm8k(path)
    assert (example.answer, example.rationale) == ("18", "She sells 9 * 2 = $18.")

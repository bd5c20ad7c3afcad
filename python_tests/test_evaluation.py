"""Evaluation metrics on hand-written completions (no model needed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from latro_engine.data import Example, load_gsm8k
from latro_engine.evaluation import evaluate, evaluate_predictions, write_eval_jsonl

GSM = [
    Example("g1", "2+2?", "4"),
    Example("g2", "10*100?", "1000"),
    Example("g3", "1/2 of 37?", "18.5"),
    Example("g4", "3-5?", "-2"),
]
GSM_COMPLETIONS = [
    # greedy right, samples vote 4 (ties broken by first: 4 before 5)
    ["2+2 = 4. The answer is 4.", "The answer is 4", "The answer is 5", "no idea", "none"],
    # greedy written with a comma and decimals; vote 999 beats 1000
    ["The answer is 1,000.00", "999", "The answer is 999.", "1000", "nothing"],
    # greedy wrong (last number), samples right in two spellings
    ["37 / 2 then 19", "The answer is $18.50", "The answer is 18.5.", "19", "none"],
    # no numbers anywhere: nothing is predicted
    ["I cannot say.", "hmm", "unsure", "", "???"],
]


def test_gsm8k_metrics():
    res = evaluate_predictions(GSM, GSM_COMPLETIONS, kind="gsm8k")
    assert (res.n, res.k) == (4, 4)
    assert [r.correct for r in res.records] == [True, True, False, False]
    assert [r.greedy_prediction for r in res.records] == ["4", "1000.00", "19", None]
    assert [r.majority for r in res.records] == ["4", "999", "18.5", None]
    assert [r.maj_correct for r in res.records] == [True, False, True, False]
    assert res.greedy_accuracy == pytest.approx(0.5)
    assert res.maj_accuracy == pytest.approx(0.5)
    assert res.records[2].sampled_predictions == ["18.50", "18.5", "19", None]
    assert res.metrics() == {"eval/n": 4, "eval/greedy_acc": 0.5, "eval/maj@4_acc": 0.5}


def test_greedy_only_has_no_majority():
    res = evaluate_predictions(GSM[:2], [["The answer is 4"], ["7"]])
    assert res.k == 0 and res.maj_accuracy is None
    assert res.records[0].majority is None and res.records[0].maj_correct is None
    assert res.greedy_accuracy == 0.5
    assert "eval/maj@0_acc" not in res.metrics()


ARC = [
    Example("a1", "Wet?", "B", (("A", "sand"), ("B", "water"), ("C", "salt"))),
    Example("a2", "Legs?", "2", (("1", "4 legs"), ("2", "6 legs"))),
]


def test_arc_metrics():
    completions = [
        ["Water flows. The answer is (B) water.", "The answer is (C)", "the answer is sand",
         "The answer is C.", "The answer is (B)"],
        ["Insects have six. The answer is 4 legs.", "The answer is (2)", "The answer is 6 legs",
         "Maybe (1)", "The answer is 1"],
    ]  # fmt: skip
    res = evaluate_predictions(ARC, completions, kind="arc")
    assert [r.greedy_prediction for r in res.records] == ["B", "1"]
    assert [r.correct for r in res.records] == [True, False]
    assert res.records[0].sampled_predictions == ["C", "A", "C", "B"]
    assert res.records[1].sampled_predictions == ["2", "2", None, "1"]
    assert [r.majority for r in res.records] == ["C", "2"]
    assert [r.maj_correct for r in res.records] == [False, True]
    assert (res.greedy_accuracy, res.maj_accuracy) == (0.5, 0.5)


def test_shape_errors():
    with pytest.raises(ValueError, match="completion lists"):
        evaluate_predictions(GSM, GSM_COMPLETIONS[:3])
    with pytest.raises(ValueError, match="differ in length"):
        evaluate_predictions(GSM[:2], [["4", "4"], ["4"]])
    with pytest.raises(ValueError, match="greedy"):
        evaluate_predictions(GSM[:1], [[]])
    with pytest.raises(ValueError, match="kind"):
        evaluate_predictions(GSM[:1], [["4"]], kind="mmlu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no examples"):
        evaluate_predictions([], [])


ONE_ARC = [Example("a1", "Which?", "B", options=(("A", "yes"), ("B", "no")))]


def test_examples_the_kind_cannot_score_are_errors_not_zero_percent():
    # ARC data left at the default kind, GSM8K data scored as ARC, golds of neither form
    with pytest.raises(ValueError, match=r"'a1' cannot be scored as kind='gsm8k'.*kind='arc'"):
        evaluate_predictions(ONE_ARC, [["The answer is (B)"]])
    with pytest.raises(ValueError, match="'g1' cannot be scored as kind='arc'"):
        evaluate_predictions(GSM[:1], [["The answer is 4"]], kind="arc")
    with pytest.raises(ValueError, match="'x' cannot be scored as kind='gsm8k'"):
        evaluate_predictions([Example("x", "q", "four")], [["4"]])
    bad_label = [Example("a2", "Which?", "C", options=(("A", "yes"), ("B", "no")))]
    with pytest.raises(ValueError, match=r"gold 'C' is not one of its option labels \['A', 'B'\]"):
        evaluate_predictions(bad_label, [["The answer is (B)"]], kind="arc")
    assert evaluate_predictions(ONE_ARC, [["The answer is (B)"]], kind="arc").greedy_accuracy == 1.0

    def never(batch, num_samples):
        raise AssertionError("generated for examples it cannot score")

    with pytest.raises(ValueError, match="kind='gsm8k'"):
        evaluate(ONE_ARC, never, progress=False)


def test_evaluate_with_generate_fn_batches():
    calls = []
    table = dict(zip([e.id for e in GSM], GSM_COMPLETIONS, strict=True))

    def generate_fn(batch, num_samples):
        calls.append(([e.id for e in batch], num_samples))
        return [table[e.id][: num_samples + 1] for e in batch]

    res = evaluate(GSM, generate_fn, num_samples=4, batch_size=3, progress=False)
    assert calls == [(["g1", "g2", "g3"], 4), (["g4"], 4)]
    assert (res.greedy_accuracy, res.maj_accuracy) == (0.5, 0.5)

    def dropping_fn(batch, num_samples):
        return [["The answer is 4"] * (num_samples + 1) for _ in batch[1:]]

    with pytest.raises(ValueError, match="generate_fn returned"):
        evaluate(GSM, dropping_fn, num_samples=2, progress=False)


def test_write_eval_jsonl_atomic(tmp_path):
    res = evaluate_predictions(GSM, GSM_COMPLETIONS)
    out = tmp_path / "sub" / "eval.jsonl"
    assert write_eval_jsonl(res, out) == out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4
    assert set(rows[0]) == {
        "id", "question", "gold", "greedy_completion", "greedy_prediction", "correct",
        "sampled_predictions", "majority", "maj_correct",
    }  # fmt: skip
    assert rows[2]["gold"] == "18.5" and rows[2]["majority"] == "18.5"
    assert rows[3]["greedy_prediction"] is None
    assert os.listdir(out.parent) == ["eval.jsonl"]  # no temp file left behind

    out.write_text("old contents\n")
    write_eval_jsonl(res, out)  # overwrites in place
    assert out.read_text().count("\n") == 4
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # as any file the process creates


def test_write_eval_jsonl_failure_leaves_old_file(tmp_path, monkeypatch):
    res = evaluate_predictions(GSM, GSM_COMPLETIONS)
    out = tmp_path / "eval.jsonl"
    out.write_text("previous\n")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_eval_jsonl(res, out)
    assert out.read_text() == "previous\n"
    assert os.listdir(tmp_path) == ["eval.jsonl"]


def _gsm8k_test_file() -> Path:
    """$LATRO_DATA_DIR (the data root, or its gsm8k/ folder), else ../shared/data/gsm8k."""
    env = os.environ.get("LATRO_DATA_DIR")
    root = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return root / "test.jsonl" if (root / "test.jsonl").exists() else root / "gsm8k" / "test.jsonl"


@pytest.mark.skipif(not _gsm8k_test_file().exists(), reason="GSM8K test split not found")
def test_reference_solutions_score_perfectly_on_real_gsm8k():
    """The dataset's own worked solutions, ending "The answer is X.", must all be judged right:
    a check of extraction and numeric comparison against 1,319 real answer formats."""
    path = _gsm8k_test_file()
    examples = load_gsm8k(path, on_error="raise")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    completions = []
    for row in rows:
        work, _, gold = row["answer"].rpartition("####")
        completions.append([f"{work.strip()}\nThe answer is {gold.strip()}."] * 2)
    res = evaluate_predictions(examples, completions)
    assert res.n == 1319
    assert res.greedy_accuracy == 1.0 and res.maj_accuracy == 1.0

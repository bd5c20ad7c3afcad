"""Tests of the embedded synthetic task, its char tokenizer and the cached tiny base model."""

from __future__ import annotations

import dataclasses
import random
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from latro_engine import base_model, synthetic
from latro_engine.synthetic import (
    ANSWER_PREFIX,
    COT_TRIGGER,
    CorpusSettings,
    TaskSettings,
    apply_op,
    build_pretrain_corpus,
    extract_answer,
    format_answer,
    format_prompt,
    generate_pairs,
    is_heldout,
    is_worked,
    parse_rationale,
    sample_problems,
    worked_rationale,
)
from latro_engine.tokenizer import train_char_tokenizer

TASK = TaskSettings()
_SYMBOLS = {"+": "add", "-": "sub", "*": "mul"}


def _solve_from_text(question: str) -> int:
    """Independent solver reading the question text (guards Problem.answer)."""
    match = re.fullmatch(r"Start with (\d)\.((?: [a-j][-+*]\d=\?\.)+)", question)
    v = int(match.group(1))
    for sym, arg in re.findall(r"[a-j]([-+*])(\d)=\?", match.group(2)):
        v = apply_op(_SYMBOLS[sym], v, int(arg))
    return v


@pytest.fixture(scope="module")
def tok():
    return train_char_tokenizer(synthetic.tokenizer_training_texts(TASK, n=300))


def test_generation_is_deterministic() -> None:
    assert generate_pairs(50, 1, TASK) == generate_pairs(50, 1, TASK)
    assert generate_pairs(50, 1, TASK) != generate_pairs(50, 2, TASK)
    corpus = CorpusSettings()
    assert build_pretrain_corpus(100, 3, TASK, corpus) == build_pretrain_corpus(
        100, 3, TASK, corpus
    )


def test_answers_and_rationales_are_correct() -> None:
    rng = random.Random(0)
    for p in sample_problems(300, 0, TASK):
        assert TASK.min_ops <= len(p.steps) <= TASK.max_ops
        assert p.answer == str(_solve_from_text(p.question))
        rationale, final = worked_rationale(p, rng, 0.0)
        steps = parse_rationale(rationale)
        assert rationale.startswith(" ") and not rationale.endswith(" ")
        assert len(steps) == len(p.steps)
        assert steps[0][0] == p.start
        for (a, op, b, c), (op2, b2) in zip(steps, p.steps, strict=True):
            assert (op, b) == (op2, b2) and c == apply_op(op, a, b)
        assert str(final) == p.answer


def test_noisy_rationales_stay_chained() -> None:
    rng = random.Random(0)
    for p in sample_problems(100, 0, TASK):
        rationale, final = worked_rationale(p, rng, 1.0)
        steps = parse_rationale(rationale)
        for a, op, b, c in steps:
            assert c != apply_op(op, a, b)  # every step wrong at probability 1
        for prev, nxt in zip(steps, steps[1:], strict=False):
            assert nxt[0] == prev[3]  # the next step continues from the stated value
        assert final == steps[-1][3]


def test_heldout_split_is_disjoint() -> None:
    train = {p.question for p in generate_pairs(3000, 0, TASK, "train")}
    test = generate_pairs(500, 0, TASK, "heldout")
    assert len({p.question for p in test}) == 500
    assert not train & {p.question for p in test}
    assert all(is_heldout(p.question, TASK) for p in test)
    corpus = build_pretrain_corpus(2000, 0, TASK, CorpusSettings())
    assert not any(is_heldout(e.prompt[: -len(COT_TRIGGER)], TASK) for e in corpus)


def test_corpus_mix_and_format() -> None:
    cs = CorpusSettings(
        direct_fraction=0.6, noisy_fraction=0.5, step_error_prob=0.25, reasoning_warmup=0.25
    )
    corpus = build_pretrain_corpus(4000, 0, TASK, cs)
    assert all(e.worked for e in corpus[:1000])  # the reasoning warm-up comes first
    direct = [e for e in corpus[1000:] if not e.worked]
    assert 0.55 < len(direct) / 3000 < 0.65
    for e in corpus[:100] + corpus[1000:1200]:
        assert e.prompt.endswith(COT_TRIGGER)
        assert e.completion.endswith(".") and ANSWER_PREFIX in e.completion
        assert is_worked(e.completion) == e.worked
        # the stated answer follows the rationale (faithful, possibly wrong)
        steps = parse_rationale(e.completion)
        if steps:
            assert extract_answer(e.completion) == str(steps[-1][3])
    for e in direct[:50]:
        assert e.completion == format_answer(extract_answer(e.completion))


def test_copies_sit_at_one_distance() -> None:
    """Each question step and its rationale step are the same width, so with a fixed chain
    length each operator the rationale copies from the question is the same distance back
    (and so is the operand after it, and the start value)."""
    rng = random.Random(0)
    distances, start_distances = set(), set()
    for p in sample_problems(50, 0, TASK):
        prompt = format_prompt(p.question)
        text = prompt + worked_rationale(p, rng)[0]
        ops = [m.start() for m in re.finditer(r"[-+*]", text)]
        asked, written = ops[: len(p.steps)], ops[len(p.steps) :]
        distances |= {w - a for a, w in zip(asked, written, strict=True)}
        start_distances.add(len(prompt) + 1 - text.index(str(p.start)))
    assert len(distances) == 1 and len(start_distances) == 1


def test_extract_answer() -> None:
    assert extract_answer(" 3+4=7. The answer is 7. The answer is 9.") == "9"
    assert extract_answer(" 3+4=7. 7*2=4.") == "4"
    assert extract_answer("no number") is None
    assert synthetic.accuracy(["9", None, "3"], ["9", "1", "4"]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="golds is empty"):
        synthetic.accuracy([], [])


def test_jsonl_round_trip(tmp_path: Path) -> None:
    train, test = synthetic.write_splits(tmp_path, TASK, n_train=20, n_test=10, seed=0)
    assert synthetic.read_jsonl(train) == generate_pairs(20, 0, TASK, "train")
    assert synthetic.read_jsonl(test) == generate_pairs(10, 0, TASK, "heldout")
    assert '"question": "Start with' in test.read_text().splitlines()[0]
    test.write_text(test.read_text() + "\n\n")  # blank lines (an editor's) are not records
    assert synthetic.read_jsonl(test) == generate_pairs(10, 0, TASK, "heldout")


@pytest.mark.parametrize(
    "settings,match",
    [
        (dict(min_ops=0), "min_ops"),
        (dict(min_ops=5, max_ops=4), "min_ops"),
        (dict(max_ops=11), "max_ops <= 10"),
        (dict(modulus=2), r"modulus must be in \[3, 10\]"),
        (dict(modulus=11), "modulus"),
        (dict(heldout_permille=0), "heldout_permille"),
    ],
)
def test_task_settings_out_of_range_are_refused(settings, match) -> None:
    with pytest.raises(ValueError, match=match):
        TaskSettings(**settings)


def test_metrics_file_damaged_lines_are_dropped(tmp_path: Path) -> None:
    from latro_engine.metrics import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n7\n\xff\xfe{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    assert read_metrics(path) == [{"step": 1}, {"step": 3}]


def test_tokenizer_round_trip_and_digits(tok) -> None:
    texts = [e.text for e in build_pretrain_corpus(200, 7, TASK, CorpusSettings())]
    texts += [
        " The answer is 9.",
        "  the  answer ",
        format_prompt("Start with 1. a+2=?."),
    ]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text)  # one token per character
        assert tok.decode(ids) == text
        assert tok(tok.decode(ids), add_special_tokens=False)["input_ids"] == ids
    for d in "0123456789":
        assert len(tok(d, add_special_tokens=False)["input_ids"]) == 1
    ids = tok("Start with 3. a+4")["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids
    assert tok.unk_token_id not in tok(texts[0])["input_ids"]
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}) == 4


def test_tokenizer_save_load(tok, tmp_path: Path) -> None:
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = format_prompt(generate_pairs(1, 0, TASK)[0].question) + " 3+4=7." + format_answer(7)
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert again.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    assert (again.pad_token_id, again.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    batch = again(["ab", "abcd"], padding=True, return_tensors="pt")
    assert batch["attention_mask"][0].tolist() == [0, 0, 1, 1, 1]  # left padding


def _tiny_settings(steps: int = 3) -> base_model.BaseSettings:
    return base_model.BaseSettings(
        model=base_model.ModelSettings(
            hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64
        ),
        pretrain=base_model.PretrainSettings(steps=steps, batch_size=4, warmup_steps=1),
        progress=False,
    )


def test_pretrain_caches_and_reloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LATRO_CACHE", str(tmp_path))
    settings = _tiny_settings()
    model, tok, path = base_model.load_or_pretrain_base(settings)
    assert path.parent == tmp_path and path.name == f"base-{settings.cache_key()}"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp dirs left behind
    meta = base_model.read_base_metadata(path)
    assert meta["settings"] == settings.key_dict()
    assert meta["metrics"]["num_parameters"] == base_model.count_parameters(model)

    def no_retrain(*_a, **_k):
        raise AssertionError("cached base model was retrained")

    monkeypatch.setattr(base_model, "pretrain", no_retrain)
    model2, tok2, path2 = base_model.load_or_pretrain_base(settings)
    assert path2 == path
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    prompt = tok2(
        format_prompt(generate_pairs(1, 0, TASK, "heldout")[0].question), return_tensors="pt"
    )
    out = model2.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 5 or out[0, -1] == tok2.eos_token_id


def test_cache_key_tracks_weight_settings() -> None:
    s = _tiny_settings()
    assert s.cache_key() == _tiny_settings().cache_key()
    assert s.cache_key() != _tiny_settings(steps=4).cache_key()
    assert s.cache_key() == dataclasses.replace(s, num_threads=1, progress=True).cache_key()


def test_pretraining_is_deterministic() -> None:
    s = _tiny_settings(steps=2)
    m1, _, met1 = base_model.pretrain(s)
    m2, _, met2 = base_model.pretrain(s)
    assert met1["final_loss"] == met2["final_loss"]
    assert all(
        torch.equal(a, b)
        for a, b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True)
    )

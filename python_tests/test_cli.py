"""The latro command: help, config rejection before loading, and a tiny train/eval run."""

from __future__ import annotations

import json

import pytest
import tiny

from latro_engine.cli import main


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--kl_coef (default 0.05)" in out and "--train-data" in out and "paper: 16" in out


def test_bad_config_is_rejected_before_loading_anything(tmp_path, capsys):
    code = main(
        [
            "train",
            "--model",
            str(tmp_path / "does-not-exist"),
            "--train-data",
            str(tmp_path / "missing.jsonl"),
            "--k",
            "1",
        ]
    )
    assert code == 2
    assert "k must be >= 2" in capsys.readouterr().err
    missing = tmp_path / "missing.yaml"
    code = main(["train", "--model", "m", "--train-data", "d.jsonl", "--config", str(missing)])
    assert code == 2
    assert f"{missing}: cannot read the config file" in capsys.readouterr().err


def test_malformed_data_is_reported_with_line_numbers(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"question": "q", "answer": "#### 3"}\n{"question": "q2"}\n')
    code = main(
        [
            "sft",
            "--model",
            str(tmp_path / "none"),
            "--train-data",
            str(data),
            "--on-error",
            "raise",
            "--output_dir",
            str(tmp_path / "run"),
        ]
    )
    assert code == 2
    assert "line 2" in capsys.readouterr().err


def test_train_and_eval_end_to_end(tmp_path, capsys):
    model_dir = tmp_path / "model"
    tiny.model().save_pretrained(model_dir)
    tiny.tokenizer().save_pretrained(model_dir)
    data = tmp_path / "train.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": ex.question, "answer": f"worked out... #### {ex.answer}"})
            + "\n"
            for ex in tiny.examples(8)
        )
    )
    config = tmp_path / "c.yaml"
    config.write_text(
        "k: 2\nmax_rationale_tokens: 8\nprompts_per_step: 2\nsteps: 2\nprogress: false\n"
        "plot: false\nmaj_k: 2\neval_max_new_tokens: 12\nlearning_rate: 1.0e-3\n"
    )
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--model",
            str(model_dir),
            "--train-data",
            str(data),
            "--eval-data",
            str(data),
            "--config",
            str(config),
            "--output_dir",
            str(out),
            "--stop_strings",
            "[' The answer is']",
        ]
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["eval"]["n"] == 8
    assert (out / "eval.jsonl").exists() and (out / "checkpoint-2").is_dir()
    # Another experiment pointed at the same output_dir (other data) stops with the reason.
    other = tmp_path / "other.jsonl"
    other.write_text("".join(data.read_text().splitlines(keepends=True)[:5]))
    code = main(["train", "--model", str(model_dir), "--train-data", str(other),
                 "--config", str(config), "--output_dir", str(out),
                 "--stop_strings", "[' The answer is']"])
    assert code == 1
    assert "is a checkpoint of another run (train_data" in capsys.readouterr().err
    code = main(
        [
            "eval",
            "--model",
            str(out / "checkpoint-2" / "model"),
            "--data",
            str(data),
            "--config",
            str(config),
            "--out",
            str(tmp_path / "eval.jsonl"),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert '"greedy_accuracy"' in printed
    assert len((tmp_path / "eval.jsonl").read_text().splitlines()) == 8


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--keep_best", "true", "--eval_every", "1"], "keep_best needs an eval_dataset"),
        (["--device", "cuda:99"], "device 'cuda:99': this machine has "),
        (["--output_dir", "{file}"], "is a file, not a directory"),
    ],
)
def test_settings_the_machine_or_the_data_cannot_run_are_rejected_before_loading(
    tmp_path, capsys, flags, message
):
    """Checked before the model loads (it does not even exist here), as a CLI error."""
    data = tmp_path / "train.jsonl"
    data.write_text('{"question": "q", "answer": "#### 3"}\n')
    flags = [f.format(file=data) for f in flags]
    argv = ["train", "--model", str(tmp_path / "no-model"), "--train-data", str(data), *flags]
    assert main(argv) == 2
    assert message in capsys.readouterr().err

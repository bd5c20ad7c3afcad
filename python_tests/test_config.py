"""LatroConfig: paper defaults, YAML + overrides, and rejection of impossible settings."""

from __future__ import annotations

import pytest

from latro_engine.config import ConfigError, LatroConfig, describe, parse_overrides


def test_defaults_follow_the_paper():
    c = LatroConfig()
    assert (c.k, c.max_rationale_tokens, c.kl_coef, c.learning_rate, c.temperature) == (
        16,
        500,
        0.05,
        5e-7,
        1.0,
    )
    assert c.sft_weight == 1.0 and c.penalty_mode == "constant"
    assert c.rollout_batch_size == 48


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("k: 8\nlearning_rate: 1.0e-4\nstop_strings: [' The answer is']\n")
    c = LatroConfig.from_yaml(
        path, ["--temperature", "0.7", "steps=20", "--adam-betas", "[0.8, 0.9]"]
    )
    assert (c.k, c.learning_rate, c.temperature, c.steps) == (8, 1e-4, 0.7, 20)
    assert c.stop_strings == (" The answer is",) and c.adam_betas == (0.8, 0.9)
    c.save_yaml(tmp_path / "round.yaml")
    assert LatroConfig.from_yaml(tmp_path / "round.yaml") == c


@pytest.mark.parametrize(
    "values,match",
    [
        ({"kk": 3}, "unknown config key"),
        ({"k": 1}, "k must be >= 2"),
        ({"k": "many"}, "k must be an integer"),
        ({"k": 2.5}, "k must be an integer"),
        ({"plot": "yes"}, "plot must be true or false"),
        ({"temperature": 0}, "temperature must be > 0"),
        ({"top_p": 0}, "top_p"),
        ({"penalty_mode": "mean"}, "penalty_mode"),
        ({"rollout_decoder": "fast"}, "rollout_decoder must be"),
        ({"penalty_mode": "batch_mean", "nonstop_penalty": -2.0}, "must then be > 0"),
        ({"prompt_template": "no placeholder"}, "prompt_template must contain"),
        ({"warmup_steps": 200, "steps": 100}, "warmup_steps"),
        ({"device": "tpu"}, "device"),
        ({"adam_betas": [0.9]}, "adam_betas must have 2 items"),
        # issue 5: K < 2, wrong types, non-finite numbers and impossible combinations
        ({"k": 0}, "k must be >= 1"),
        ({"k": True}, "k must be an integer"),
        ({"learning_rate": "fast"}, "learning_rate must be a number"),
        ({"stop_strings": 5}, "stop_strings must be a list"),
        ({"kl_coef": float("nan")}, "kl_coef must be a finite number"),
        ({"eval_temperature": float("nan")}, "eval_temperature must be a finite number"),
        ({"nonstop_penalty": float("-inf")}, "nonstop_penalty must be a finite number"),
        ({"max_grad_norm": -1.0}, "max_grad_norm must be >= 0"),
        ({"max_nonfinite_steps": -1}, "max_nonfinite_steps must be >= 0"),
        ({"adam_betas": [0.9, 1.0]}, r"adam_betas must both be in \[0, 1\)"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"lora_rank": 8, "lora_target_modules": []}, "lora_target_modules"),
        ({"lora_target_modules": "q_proj,v_proj"},  # one text where a list was meant
         r"'q_proj,v_proj' is not a module name; list several as a YAML list"),
        ({"lora_target_modules": ["q_proj", " "]}, "' ' is not a module name"),
        ({1: 3, "k": 4}, r"config keys must be text, got 1 \(int\)"),
        ({True: 3}, r"got True \(bool\) \(quote a key"),  # YAML reads `on:` as True
        ({"prompt_template": "{question} and {hint}"}, "only placeholder"),
        ({"answer_template": "{answer} {0}"}, "only placeholder"),
        ({"device": "cuda:one"}, "device"),
        ({"on_data_error": "ignore"}, "on_data_error must be 'skip' or 'raise'"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"min_p": 2.0}, "min_p"),
        # a positive constant would reward never stopping over every finished rationale
        ({"nonstop_penalty": 2.0}, "nonstop_penalty.*must be < 0"),
        ({"nonstop_penalty": 0.0}, "must be < 0 to penalize"),
        ({"lora_rank": 8, "lora_alpha": 0.0}, "lora_alpha must be > 0"),
        ({"seed": 2**50}, r"seed must be in \[0, 2\^32\)"),
        ({"seed": -1}, "seed must be in"),
        ({"bf16": "maybe"}, "bf16 must be 'auto', 'on' or 'off'"),
        ({"distributed_timeout_minutes": 0}, "distributed_timeout_minutes must be > 0"),
        ({"keep_best": True}, "keep_best needs eval_every > 0"),
        ({"distributed_timeout_minutes": float("inf")}, "must be a finite number"),
        ({"micro_batch_tokens": -1}, r"micro_batch_tokens must be >= 0 \(0 = off\), got -1"),
        ({"micro_batch_tokens": 4096, "distributed": "fsdp"},
         "micro_batch_tokens does not combine with distributed: fsdp"),
    ],
)
def test_rejects_bad_settings(values, match):
    with pytest.raises(ConfigError, match=match):
        LatroConfig.from_dict(values)


def test_bad_yaml_and_overrides(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        LatroConfig.from_yaml(bad)
    with pytest.raises(ConfigError, match="has no value"):
        parse_overrides(["--k"])
    bad.write_text("k: 4\non: 3\n")
    with pytest.raises(ConfigError, match=r"config keys must be text, got True \(bool\)"):
        LatroConfig.from_yaml(bad)


def test_text_overrides_keep_the_text_as_typed(tmp_path):
    # YAML would read these as a mapping ({question}, Answer:), cut them at " #" (a comment),
    # make "" None or a date of 2024-01-01.
    c = LatroConfig.from_yaml(
        None,
        [
            "--prompt_template", "{question}",
            "--answer_template", "The answer is {answer}. #",
            "--stop_strings", "Answer:",
            "--answer_prefix", "",
            "--output_dir", "runs/exp #2",
        ],
    )
    assert c.prompt_template == "{question}"
    assert c.answer_template == "The answer is {answer}. #"
    assert c.stop_strings == ("Answer:",)
    assert c.answer_prefix == ""
    assert c.output_dir == "runs/exp #2"
    assert LatroConfig.from_yaml(None, ["--output_dir=2024-01-01"]).output_dir == "2024-01-01"
    # A list of texts written as a YAML list is a list; numbers and switches are still parsed.
    c = LatroConfig.from_yaml(None, ["--stop_strings", '["A:", "B #"]', "--k", "4", "--plot", "off"])
    assert c.stop_strings == ("A:", "B #") and c.k == 4 and c.plot is False


def test_on_and_off_switches_from_yaml_and_overrides(tmp_path):
    # YAML 1.1 reads bare on / off as booleans; the switches take them as 'on' / 'off'.
    path = tmp_path / "c.yaml"
    path.write_text("bf16: off\nuse_chat_template: on\n")
    c = LatroConfig.from_yaml(path)
    assert (c.bf16, c.use_chat_template) == ("off", "on")
    c = LatroConfig.from_yaml(path, ["--bf16", "on", "--use_chat_template", "off"])
    assert (c.bf16, c.use_chat_template) == ("on", "off")
    with pytest.raises(ConfigError, match="plot must be true or false"):
        LatroConfig.from_dict({"plot": "on"})  # booleans stay booleans


def test_describe_lists_every_option_with_help():
    text = describe()
    for name in LatroConfig.__dataclass_fields__:
        assert f"--{name} " in text
    assert "paper: 16" in text


def test_numbers_without_a_dot_and_the_batch_is_whole_groups():
    # YAML reads 1e-6 as a string; the config takes it as the number it spells.
    c = LatroConfig.from_yaml(None, ["--learning_rate", "1e-6", "--k", "4", "prompts_per_step=5"])
    assert c.learning_rate == 1e-6
    # The rollout batch is prompts_per_step groups of k: leave-one-out always has whole groups.
    assert c.rollout_batch_size == 20 and c.rollout_batch_size % c.k == 0
    assert LatroConfig(max_nonfinite_steps=0).max_nonfinite_steps == 0  # 0: never stop


def test_the_cli_rejects_a_bad_config_before_loading_anything(tmp_path, capsys, monkeypatch):
    from latro_engine import cli

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(cli, "_load_model", no_model)
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "q", "answer": "#### 1"}\n')
    for override, reason in [
        (["--k", "1"], "k must be >= 2"),
        (["--colour", "blue"], "unknown config key(s): colour"),
        (["--steps", "many"], "steps must be an integer"),
        (["--warmup_steps", "9", "--steps", "3"], "warmup_steps (9) exceeds steps (3)"),
    ]:
        code = cli.main(
            ["train", "--model", str(tmp_path / "none"), "--train-data", str(data), *override]
        )
        assert code == 2
        assert reason in capsys.readouterr().err

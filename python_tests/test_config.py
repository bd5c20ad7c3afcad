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
        ({"penalty_mode": "batch_mean", "nonstop_penalty": -2.0}, "must then be > 0"),
        ({"prompt_template": "no placeholder"}, "prompt_template must contain"),
        ({"warmup_steps": 200, "steps": 100}, "warmup_steps"),
        ({"device": "tpu"}, "device"),
        ({"adam_betas": [0.9]}, "adam_betas must have 2 items"),
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


def test_describe_lists_every_option_with_help():
    text = describe()
    for name in LatroConfig.__dataclass_fields__:
        assert f"--{name} " in text
    assert "paper: 16" in text

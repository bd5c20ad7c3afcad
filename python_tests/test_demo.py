"""The embedded default's pipeline, shrunk: results.json and the curves are written."""

from __future__ import annotations

import json

import torch

from latro_engine.base_model import BaseSettings, ModelSettings, PretrainSettings
from latro_engine.demo import DemoSettings, run_demo


def test_demo_pipeline_writes_results(tmp_path, monkeypatch):
    monkeypatch.setenv("LATRO_CACHE", str(tmp_path / "cache"))
    base = BaseSettings(
        model=ModelSettings(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
        pretrain=PretrainSettings(steps=5, batch_size=4, warmup_steps=1),
        num_threads=1,
        progress=False,
    )
    settings = DemoSettings(
        base=base,
        train_questions=16,
        eval_questions=6,
        k=2,
        prompts_per_step=2,
        steps=2,
        maj_k=2,
        max_rationale_tokens=8,
        threads=1,
    )
    payload = run_demo(tmp_path / "out", settings=settings)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    for name in ("base", "sft", "latro"):
        assert set(saved[name]) >= {"greedy_accuracy", "majk_accuracy", "n"}
        assert 0 <= saved[name]["greedy_accuracy"] <= 1 and saved[name]["n"] == 6
    assert payload["latro"] == saved["latro"]
    assert (tmp_path / "out" / "training_curves.png").stat().st_size > 0
    assert (tmp_path / "out" / "eval_latro.jsonl").exists()
    # Where the base was pretrained, which decides its weights as much as the settings do.
    assert {"cpu", "cpu_capability", "torch", "transformers"} <= set(saved["base_environment"])
    assert saved["base_environment"]["torch"] == torch.__version__
    assert saved["environment"] == saved["base_environment"]  # pretrained on this machine
    # The base model is cached: a second run does not pretrain again.
    cached = list((tmp_path / "cache").iterdir())
    run_demo(tmp_path / "out2", settings=settings)
    assert list((tmp_path / "cache").iterdir()) == cached

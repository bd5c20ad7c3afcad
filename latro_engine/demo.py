"""The embedded default: base vs SFT vs LaTRO on a synthetic reasoning task, offline on a CPU.

1. Build the task (arithmetic chains mod 10, :mod:`latro_engine.synthetic`) and a tiny
   Llama-shaped model with a SentencePiece character tokenizer, pretrained on the spot on a
   corpus that mostly answers directly but also shows (partly wrong) worked solutions: the
   model *can* reason but does not by default (cached under ``$LATRO_CACHE``).
2. Evaluate the base, then train an SFT baseline (question -> answer) and LaTRO (question and
   answer only; the model samples its own rationales) from the same base with the same budget,
   and evaluate both: greedy and maj@k accuracy on held-out questions.
3. Write ``results.json``, the training curves, per-example evaluations, and print the table.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from latro_engine import synthetic
from latro_engine.base_model import (
    BaseSettings,
    PretrainSettings,
    load_or_pretrain_base,
    machine_environment,
    read_base_metadata,
)
from latro_engine.config import LatroConfig
from latro_engine.data import Example
from latro_engine.evaluation import EvalResult, write_eval_jsonl
from latro_engine.generation import evaluate_model
from latro_engine.metrics import plot_curves, read_metrics
from latro_engine.trainer import LatroTrainer, SFTTrainer, resolve_device

logger = logging.getLogger(__name__)


@dataclass
class DemoSettings:
    """Sizes of the demo. The defaults fit the 10-minute budget on 2 CPU cores."""

    base: BaseSettings = field(default_factory=BaseSettings)
    train_questions: int = 4000
    eval_questions: int = 500
    # LaTRO recipe for the tiny model (the paper's lr 5e-7 is for 4-8B models).
    k: int = 8
    prompts_per_step: int = 16
    steps: int = 50
    temperature: float = 0.7
    learning_rate: float = 1e-4
    kl_coef: float = 0.05
    sft_weight: float = 1.0
    max_rationale_tokens: int = 64
    maj_k: int = 8
    threads: int = 2
    seed: int = 0

    @classmethod
    def quick(cls) -> DemoSettings:
        """A tiny run for smoke tests: numbers are not meaningful."""
        base = BaseSettings(pretrain=PretrainSettings(steps=30, batch_size=8), progress=False)
        return cls(
            base=base,
            train_questions=64,
            eval_questions=16,
            k=4,
            prompts_per_step=4,
            steps=3,
            maj_k=2,
            max_rationale_tokens=32,
        )


def _examples(pairs: list[synthetic.QAPair], prefix: str) -> list[Example]:
    return [
        Example(id=f"{prefix}{i}", question=p.question, answer=str(p.answer), source_line=i + 1)
        for i, p in enumerate(pairs)
    ]


def _config(settings: DemoSettings, out: Path, name: str) -> LatroConfig:
    return LatroConfig(
        k=settings.k,
        prompts_per_step=settings.prompts_per_step,
        steps=settings.steps,
        temperature=settings.temperature,
        learning_rate=settings.learning_rate,
        kl_coef=settings.kl_coef,
        sft_weight=settings.sft_weight,
        max_rationale_tokens=settings.max_rationale_tokens,
        micro_batch_size=settings.k * 4,  # whole groups: the two-forward (fused) path
        stop_strings=(synthetic.ANSWER_PREFIX,),
        prompt_template="{question}" + synthetic.COT_TRIGGER,
        answer_template="The answer is {answer}.",
        answer_prefix=" ",
        use_chat_template="off",
        lr_schedule="constant",
        warmup_steps=0,
        maj_k=settings.maj_k,
        eval_temperature=settings.temperature,
        eval_batch_size=100,
        eval_max_new_tokens=settings.max_rationale_tokens + 16,
        save_every=0,
        keep_checkpoints=1,
        resume=False,
        output_dir=str(out / name),
        seed=settings.seed,
        threads=settings.threads,
        progress=settings.base.progress,
    )


def _summary(result: EvalResult) -> dict[str, Any]:
    reasoned = sum(synthetic.is_worked(r.greedy_completion) for r in result.records) / result.n
    return {
        "greedy_accuracy": result.greedy_accuracy,
        "majk_accuracy": result.maj_accuracy,
        "k": result.k,
        "n": result.n,
        "greedy_reasons_frac": reasoned,
    }


def format_table(results: dict[str, dict[str, Any]], temperature: float) -> str:
    """The results as a Markdown table; maj@k is named with its sampling temperature."""
    k = next(iter(results.values()))["k"]
    lines = [
        f"| model | greedy | maj@{k} (T={temperature:g}) | greedy answers that reason |",
        "|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {100 * r['greedy_accuracy']:.1f}% | {100 * r['majk_accuracy']:.1f}% "
            f"| {100 * r['greedy_reasons_frac']:.0f}% |"
        )
    return "\n".join(lines)


def run_demo(
    out: str | Path, *, quick: bool = False, settings: DemoSettings | None = None
) -> dict[str, Any]:
    """Runs the whole comparison; returns (and writes) ``out/results.json``."""
    settings = settings or (DemoSettings.quick() if quick else DemoSettings())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(settings.threads)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    base_settings = dataclasses.replace(settings.base, num_threads=settings.threads)
    model, tokenizer, base_path = load_or_pretrain_base(base_settings)
    base_environment = read_base_metadata(base_path)["metrics"].get("environment")  # None: older
    timings["base_model_s"] = time.perf_counter() - start

    task = settings.base.task
    train = _examples(
        synthetic.generate_pairs(settings.train_questions, settings.seed + 1, task, "train"),
        "train",
    )
    held_out = _examples(
        synthetic.generate_pairs(settings.eval_questions, settings.seed, task, "heldout"), "test"
    )

    results: dict[str, dict[str, Any]] = {}
    runs = (("base", None), ("sft", SFTTrainer), ("latro", LatroTrainer))
    for name, cls in runs:
        phase = time.perf_counter()
        config = _config(settings, out, name)
        if cls is None:  # the base needs no trainer, only its evaluation, where theirs runs
            device = resolve_device(config.device)
            result = evaluate_model(copy.deepcopy(model).to(device), tokenizer, held_out, config)
            write_eval_jsonl(result, out / f"eval_{name}.jsonl")
        else:
            # The demo's own earlier run in this directory, if any: replaced (a fresh run does
            # not start among another run's checkpoints).
            shutil.rmtree(config.output_dir, ignore_errors=True)
            trainer = cls(copy.deepcopy(model), tokenizer, train, config)
            trainer.train()
            result = trainer.evaluate(held_out, write_path=out / f"eval_{name}.jsonl")
        results[name] = _summary(result)
        timings[f"{name}_s"] = time.perf_counter() - phase
        logger.info("%s: %s", name, results[name])

    curves = read_metrics(out / "latro" / "metrics.jsonl")
    plot_curves(curves, out / "training_curves.png", title="LaTRO on the synthetic task")
    payload = {
        **results,
        "settings": _settings_dict(settings),
        "base_model": str(base_path),
        # Where the base was pretrained and where this run trained (CPU, library versions):
        # another machine's base, from the same settings, can score differently, and training
        # rounds differently there too (see base_model.machine_environment).
        "base_environment": base_environment,
        "environment": machine_environment(),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "total_s": round(time.perf_counter() - start, 1),
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    table = format_table(results, settings.temperature)
    (out / "results.md").write_text(table + "\n")
    print(
        f"\n{table}\n\nheld-out questions: {results['base']['n']}; total {payload['total_s']} s; "
        f"results in {out / 'results.json'}"
    )
    return payload


def _settings_dict(settings: DemoSettings) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(settings), default=str))

"""The ``latro`` command: train | sft | eval | demo.

Config options come from a YAML file (``--config``) and ``--key value`` overrides; they are
checked before any model is loaded. Models are local ``save_pretrained`` directories (or hub
names where the machine is online); ``trust_remote_code`` stays off unless asked for.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from latro_engine.config import ConfigError, LatroConfig, describe
from latro_engine.data import DataError, DatasetSpec, Example, format_arc_question, load_dataset

logger = logging.getLogger("latro_engine")


def _add_data_args(parser: argparse.ArgumentParser, *, train: bool) -> None:
    if train:
        parser.add_argument("--train-data", required=True, help="training file (JSONL or CSV)")
        parser.add_argument(
            "--eval-data",
            help="held-out file evaluated after training (and every eval_every steps)",
        )
    else:
        parser.add_argument("--data", required=True, help="file to evaluate on (JSONL or CSV)")
    parser.add_argument(
        "--data-format",
        default="gsm8k",
        choices=["gsm8k", "arc", "jsonl", "csv"],
        help="gsm8k: GSM8K JSONL ('#### answer'); arc: ARC-Challenge (HF or AI2 JSONL); "
        "jsonl/csv: any file with --question-field/--answer-field",
    )
    parser.add_argument("--question-field", default="question", help="question column (jsonl/csv)")
    parser.add_argument("--answer-field", default="answer", help="answer column (jsonl/csv)")
    parser.add_argument(
        "--on-error",
        default=None,
        choices=["skip", "raise"],
        help="malformed rows and prompts too long for the model: skip them (reported with "
        "line numbers) or stop; sets the config's on_data_error (default: skip)",
    )


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help="model directory (save_pretrained format) or hub name"
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow the model's own Python code to run (off by default)",
    )
    parser.add_argument("--config", help="YAML file of config options (listed below)")


def build_parser() -> argparse.ArgumentParser:
    epilog = "config options (YAML keys, or --key value after the arguments):\n" + describe()
    parser = argparse.ArgumentParser(prog="latro", description="LaTRO training engine")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    kw = dict(epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    train = sub.add_parser("train", help="train with LaTRO on (question, answer) pairs", **kw)
    _add_model_args(train)
    _add_data_args(train, train=True)
    sft = sub.add_parser(
        "sft",
        help="train the SFT baseline (question -> worked solution and answer, or answer alone "
        "where the data has no solution), same budget",
        **kw,
    )
    _add_model_args(sft)
    _add_data_args(sft, train=True)
    ev = sub.add_parser("eval", help="greedy and maj@k zero-shot accuracy of a model", **kw)
    _add_model_args(ev)
    _add_data_args(ev, train=False)
    ev.add_argument("--out", help="write per-example results to this JSONL file")
    demo = sub.add_parser(
        "demo", help="the embedded default: base vs SFT vs LaTRO on a synthetic task, offline"
    )
    demo.add_argument(
        "--out", default="latro_demo", help="directory for results.json, curves and logs"
    )
    demo.add_argument(
        "--quick", action="store_true", help="a tiny, fast run (smoke test; numbers not meaningful)"
    )
    return parser


def _load_examples(args: argparse.Namespace, path: str) -> list[Example]:
    spec = DatasetSpec(
        format=args.data_format,
        path=path,
        question_field=args.question_field,
        answer_field=args.answer_field,
        on_error=args.on_error,
    )
    examples = load_dataset(spec)
    if args.data_format == "arc":
        examples = [dataclasses.replace(ex, question=format_arc_question(ex)) for ex in examples]
    return examples


def _config(args: argparse.Namespace, overrides: list[str]) -> LatroConfig:
    config = LatroConfig.from_yaml(args.config, overrides)
    if args.on_error is not None:  # the flag wins over the config file's on_data_error
        config = dataclasses.replace(config, on_data_error=args.on_error)
    args.on_error = config.on_data_error  # one choice for the rows and the lengths
    default_template = LatroConfig.__dataclass_fields__["prompt_template"].default
    if args.data_format == "arc" and config.prompt_template == default_template:
        # format_arc_question already wrote the whole ARC prompt, instruction included.
        config = dataclasses.replace(config, prompt_template="{question}")
    return config


def _load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        args.model, trust_remote_code=args.trust_remote_code
    )
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    return model, tokenizer


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def _run_training(args: argparse.Namespace, overrides: list[str]) -> int:
    from latro_engine import distributed

    config = _config(args, overrides)  # rejected before any model or data is loaded
    distributed.resolve_mode(config)  # so is a distributed mode that does not fit the launch
    try:
        return _train(args, config)
    finally:
        distributed.shutdown()


def _train(args: argparse.Namespace, config: LatroConfig) -> int:
    from latro_engine.trainer import LatroTrainer, SFTTrainer, check_run_settings

    check_run_settings(config, has_eval_data=bool(args.eval_data))  # before loading anything
    train_set = _load_examples(args, args.train_data)
    eval_set = _load_examples(args, args.eval_data) if args.eval_data else None
    model, tokenizer = _load_model(args)
    kind = "arc" if args.data_format == "arc" else "gsm8k"
    cls = LatroTrainer if args.command == "train" else SFTTrainer
    trainer = cls(model, tokenizer, train_set, config, eval_dataset=eval_set, eval_kind=kind)
    records = trainer.train()
    if not trainer.dist.is_main:  # under torchrun rank 0 reports; the others evaluate along
        if eval_set:  # (FSDP2 gathers the weights for generation with every rank)
            trainer.evaluate()
        return 0
    summary: dict[str, Any] = {"steps": trainer.step, "last": records[-1] if records else None}
    if eval_set:
        result = trainer.evaluate(write_path=Path(config.output_dir) / "eval.jsonl")
        summary["eval"] = {
            "greedy_accuracy": result.greedy_accuracy,
            "majk_accuracy": result.maj_accuracy,
            "k": result.k,
            "n": result.n,
        }
    _write_json(Path(config.output_dir) / "summary.json", summary)
    print(json.dumps(summary.get("eval", summary["last"]), indent=2))
    return 0


def _run_eval(args: argparse.Namespace, overrides: list[str]) -> int:
    from latro_engine.evaluation import write_eval_jsonl
    from latro_engine.generation import context_length, evaluate_model, fit_to_context
    from latro_engine.trainer import resolve_device

    config = _config(args, overrides)
    examples = _load_examples(args, args.data)
    model, tokenizer = _load_model(args)
    examples = fit_to_context(
        tokenizer, examples, config, context_length(model), use="eval", source=args.data
    )
    device = resolve_device(config.device)
    model.to(device)
    kind = "arc" if args.data_format == "arc" else "gsm8k"
    result = evaluate_model(model, tokenizer, examples, config, kind=kind, device=device)
    if args.out:
        write_eval_jsonl(result, args.out)
    print(
        json.dumps(
            {
                "greedy_accuracy": result.greedy_accuracy,
                "majk_accuracy": result.maj_accuracy,
                "k": result.k,
                "n": result.n,
            },
            indent=2,
        )
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    quiet = int(os.environ.get("RANK", "0")) > 0  # under torchrun, rank 0 speaks
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "demo" and overrides:
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    try:
        if args.command in ("train", "sft"):
            return _run_training(args, overrides)
        if args.command == "eval":
            return _run_eval(args, overrides)
        from latro_engine.demo import run_demo

        run_demo(Path(args.out), quick=args.quick)
        return 0
    except (ConfigError, DataError) as error:
        print(f"latro {args.command}: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        # A run that cannot start or go on for a stated reason (another run's checkpoints in
        # output_dir, non-finite steps): the reason, not a traceback. (Imported here: torch.)
        from latro_engine.checkpoint import CheckpointError
        from latro_engine.trainer import TrainingError

        if not isinstance(error, (CheckpointError, TrainingError)):
            raise
        print(f"latro {args.command}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

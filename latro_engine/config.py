"""Training configuration: one dataclass whose defaults follow the paper, loadable from YAML
with ``--key value`` overrides, and checked before any model is loaded.

Where a default comes from: "paper" = Chen et al. 2024 (Table/Appendix hyperparameters),
"reference" = the released reference code (SalesforceAIResearch/LaTRO), see ../shared/LATRO.md.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_STOP_STRINGS = ("The answer is", "the answer is", "Answer:")


def _opt(default: Any, help: str) -> Any:
    """A config field with its --help text."""
    return field(default=default, metadata={"help": help})


def describe(cls: type = None) -> str:
    """One line per option with its default and help, for the CLI's --help."""
    cls = cls or LatroConfig
    lines = []
    for f in dataclasses.fields(cls):
        default = _plain(f.default)
        lines.append(f"  --{f.name} (default {default!r}): {f.metadata.get('help', '')}")
    return "\n".join(lines)


class ConfigError(ValueError):
    """A configuration that cannot be run: unknown key, wrong type or impossible combination."""


@dataclass
class LatroConfig:
    """Everything a LaTRO (or SFT baseline) run needs besides the model and the data.

    Defaults follow the paper for GSM8K; the reference code's recipe is one switch away
    (``sft_weight=0``, ``penalty_mode="batch_mean"``, ``nonstop_penalty=2.0``).
    """

    # --- sampling rationales
    k: int = _opt(
        16, "rationales sampled per question; >= 2 for leave-one-out baselines (paper: 16)"
    )
    max_rationale_tokens: int = _opt(
        500, "rationale limit L; longer ones count as non-stopping (paper: 500)"
    )
    temperature: float = _opt(1.0, "sampling temperature of rationales (paper: 1)")
    top_k: int = _opt(0, "keep the k most likely tokens when sampling; 0 = off (reference: off)")
    top_p: float = _opt(1.0, "nucleus sampling mass; 1 = off (reference: off)")
    min_p: float = _opt(0.0, "drop tokens below min_p x the top probability; 0 = off")
    stop_strings: tuple[str, ...] = _opt(
        DEFAULT_STOP_STRINGS, "a rationale ends where one of these begins (EOS too)"
    )
    rollout_decoder: str = _opt(
        "auto",
        "decode loop of rollouts and evaluation: static (static KV cache, CUDA graphs; "
        "Llama/Mistral/Qwen2/Qwen3/Phi-3), hf (the model's own forward), auto (static on CUDA "
        "when supported)",
    )
    # --- objective
    kl_coef: float = _opt(0.05, "beta of the KL term in the reward (paper: 0.05 GSM8K, 0.25 ARC)")
    sft_weight: float = _opt(
        1.0, "weight of grad log p(y|x,z) in the loss (paper: 1; reference code: 0)"
    )
    sft_target: str = _opt(
        "rationale",
        "the SFT baseline's target: 'rationale' (the data's worked solution, GSM8K's, then y, "
        "where an example has one; y alone elsewhere, ARC's: the paper's baseline) or 'answer' "
        "(y alone)",
    )
    nonstop_penalty: float = _opt(
        -10.0,
        "self-reward of a rationale that never stopped, in place of log p(y|x,z) (its KL term "
        "stays): this value (constant mode), or the multiplier of the batch's mean answer "
        "log-prob (batch_mean mode, reference: 2)",
    )
    penalty_mode: str = _opt("constant", "'constant' or 'batch_mean' (the reference code's choice)")
    # --- optimisation
    learning_rate: float = _opt(5e-7, "AdamW learning rate (paper: 5e-7)")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    adam_betas: tuple[float, float] = _opt((0.9, 0.999), "AdamW betas")
    warmup_steps: int = _opt(0, "linear warm-up steps (paper: none)")
    lr_schedule: str = _opt("linear", "'linear' decay to 0 over `steps` (paper) or 'constant'")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm; 0 = off")
    max_nonfinite_steps: int = _opt(
        5,
        "a step with a non-finite loss or gradient is skipped (counted in the metrics); this "
        "many in a row stop training with a saved checkpoint; 0 = never stop",
    )
    prompts_per_step: int = _opt(
        3,
        "questions per optimizer step and process, each with k rationales; under torchrun "
        "the global batch is this x the world size (paper: 3 per GPU)",
    )
    micro_batch_size: int = _opt(
        4, "sequences per forward/backward; gradients accumulate (paper: 4)"
    )
    micro_batch_tokens: int = _opt(
        0,
        "tokens per forward/backward, padding included (rows x the longest row's width, "
        "answer included; a wider row alone); micro-batches then take up to "
        "micro_batch_size rows of similar length, so short rationales share larger "
        "micro-batches at the same activation memory; the no-grad scoring passes take 4x as "
        "many; the rewards come from a no-grad pass first; 0 = off; not with distributed fsdp",
    )
    steps: int = _opt(100, "optimizer steps, one per rollout batch (on-policy)")
    # --- precision and memory
    bf16: str = _opt("auto", "'auto' (bf16 autocast on CUDA, float32 on CPU), 'on' or 'off'")
    gradient_checkpointing: bool = _opt(
        False, "recompute activations in the backward to save memory"
    )
    optimizer_on_host: bool = _opt(
        False,
        "keep AdamW's moment estimates in pinned host memory between steps and update in "
        "chunks (frees twice the trainable parameters' size of device memory for one round "
        "trip of the moments per step; the same updates bit for bit; not with distributed fsdp)",
    )
    reference_on_host: bool = _opt(
        False,
        "keep the frozen reference model's weights in host memory and upload them for its one "
        "scoring pass per step (frees their device memory in the training passes for one "
        "host-to-device copy per step, made while the rollout runs; not with LoRA, whose "
        "reference is the policy itself, nor with distributed fsdp)",
    )
    lora_rank: int = _opt(
        0,
        "> 0: train LoRA adapters (peft); the reference model is then the same "
        "weights with adapters disabled, no second copy",
    )
    lora_alpha: float = _opt(16.0, "LoRA alpha")
    lora_dropout: float = _opt(0.0, "LoRA dropout")
    lora_target_modules: tuple[str, ...] = _opt(
        ("q_proj", "k_proj", "v_proj", "o_proj"), "modules that get adapters"
    )
    # --- prompts and answers
    prompt_template: str = _opt(
        "{question} Let's think step by step.", "the prompt x (paper's GSM8K prompt)"
    )
    answer_template: str = _opt(
        "The answer is {answer}.", "the answer y scored by the self-reward (EOS appended)"
    )
    answer_prefix: str = _opt(
        " ",
        "text between the rationale and the answer where it did not end at a stop string "
        "(see answer_after_stop)",
    )
    answer_after_stop: str = _opt(
        "own",
        "'own': y goes on from the stop string the rationale ended at, as the model wrote it "
        "(its tokens, then ' {answer}' and the rest of answer_template); 'template': y is "
        "answer_prefix + answer_template for every rationale (the reference code, with prefix '')",
    )
    use_chat_template: str = _opt("auto", "'auto' (when the tokenizer has one), 'on' or 'off'")
    on_data_error: str = _opt(
        "skip",
        "malformed data rows and prompts too long for the model's context: 'skip' them "
        "(each reported with its line) or 'raise' (stop, listing them all)",
    )
    # --- checkpoints, evaluation, logs
    output_dir: str = _opt(
        "runs/latro", "checkpoints, metrics.jsonl, config.yaml and plots go here"
    )
    save_every: int = _opt(50, "checkpoint every N steps (and at the end); 0 = only at the end")
    keep_checkpoints: int = _opt(2, "newest checkpoints kept; 0 = keep all")
    resume: bool = _opt(True, "continue from the newest complete checkpoint in output_dir")
    eval_every: int = _opt(0, "greedy evaluation on the eval set every N steps; 0 = off")
    keep_best: bool = _opt(
        False,
        "keep the checkpoint of the best in-training greedy accuracy beside the newest ones (the "
        "reference code's choice; needs eval_every): saved at each evaluation that improves it, "
        "named by output_dir/best",
    )
    eval_max_new_tokens: int = _opt(
        0, "completion limit when evaluating; 0 = max_rationale_tokens + 32"
    )
    maj_k: int = _opt(8, "samples voted on for maj@k accuracy (paper: maj@8)")
    eval_temperature: float = _opt(1.0, "temperature of the maj@k samples (paper: 1)")
    eval_batch_size: int = _opt(64, "questions per evaluation batch")
    log_every: int = _opt(1, "write a metrics record every N steps")
    tensorboard: bool = _opt(False, "also log scalars to output_dir/tensorboard")
    plot: bool = _opt(True, "save output_dir/training_curves.png at the end")
    progress: bool = _opt(True, "show progress bars")
    # --- reproducibility and placement
    seed: int = _opt(0, "seed of data order, sampling and initialisation")
    deterministic: bool = _opt(
        False,
        "torch.use_deterministic_algorithms (exact resume on CPU; on CUDA it also sets "
        "CUBLAS_WORKSPACE_CONFIG=:4096:8 unless set)",
    )
    device: str = _opt("auto", "'auto' (cuda when available), 'cpu', 'cuda' or 'cuda:N'")
    threads: int = _opt(0, "torch.set_num_threads when > 0")
    distributed: str = _opt(
        "auto",
        "under torchrun: 'ddp' (a replica per process), 'fsdp' (FSDP2 fully_shard, for models "
        "that do not fit) or 'none'; 'auto' = ddp when WORLD_SIZE > 1, else none",
    )
    distributed_timeout_minutes: float = _opt(
        60.0,
        "how long a rank waits for the others in a collective before the run fails (rank 0 "
        "writes a whole DDP checkpoint while the others wait; NCCL's default is 10 minutes)",
    )

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Rejects impossible settings with the reason (before any model is loaded)."""
        _check_types(self)
        positive = (
            "k",
            "max_rationale_tokens",
            "prompts_per_step",
            "micro_batch_size",
            "steps",
            "maj_k",
            "eval_batch_size",
            "log_every",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.k < 2:
            raise ConfigError(
                f"k must be >= 2 (leave-one-out baselines need 2 samples), got {self.k}"
            )
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(
                f"temperature must be > 0 for sampling rationales, got {self.temperature}"
            )
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ConfigError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if self.sft_target not in ("rationale", "answer"):
            raise ConfigError(f"sft_target must be 'rationale' or 'answer', got {self.sft_target!r}")
        if self.answer_after_stop not in ("own", "template"):
            raise ConfigError(
                f"answer_after_stop must be 'own' or 'template', got {self.answer_after_stop!r}"
            )
        if self.penalty_mode not in ("constant", "batch_mean"):
            raise ConfigError(
                f"penalty_mode must be 'constant' or 'batch_mean', got {self.penalty_mode!r}"
            )
        if self.lr_schedule not in ("linear", "constant"):
            raise ConfigError(
                f"lr_schedule must be 'linear' or 'constant', got {self.lr_schedule!r}"
            )
        for name in _SWITCHES:
            if getattr(self, name) not in ("auto", "on", "off"):
                raise ConfigError(
                    f"{name} must be 'auto', 'on' or 'off', got {getattr(self, name)!r}"
                )
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        for name in (
            "kl_coef",
            "sft_weight",
            "weight_decay",
            "warmup_steps",
            "save_every",
            "eval_every",
            "eval_max_new_tokens",
            "keep_checkpoints",
            "lora_rank",
            "threads",
            "max_grad_norm",
            "max_nonfinite_steps",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, got {value}")
        if not all(0 <= beta < 1 for beta in self.adam_betas):
            raise ConfigError(f"adam_betas must both be in [0, 1), got {list(self.adam_betas)}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_rank and not self.lora_alpha > 0:
            raise ConfigError(
                f"lora_alpha must be > 0 with lora_rank > 0 (the adapters' output is scaled by "
                f"lora_alpha / lora_rank), got {self.lora_alpha}"
            )
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be in [0, 2^32), got {self.seed}")
        if self.lora_rank and not self.lora_target_modules:
            raise ConfigError("lora_rank > 0 needs at least one module in lora_target_modules")
        for name in self.lora_target_modules:
            if not name or any(c in name for c in ", \t\n"):
                raise ConfigError(
                    f"lora_target_modules: {name!r} is not a module name; list several as a "
                    "YAML list, e.g. --lora_target_modules '[q_proj, v_proj]'"
                )
        if self.reference_on_host and self.lora_rank:
            raise ConfigError(
                "reference_on_host has nothing to move with lora_rank > 0 (the reference is "
                "the policy with its adapters off)"
            )
        if self.micro_batch_tokens < 0:
            raise ConfigError(
                f"micro_batch_tokens must be >= 0 (0 = off), got {self.micro_batch_tokens}"
            )
        if self.micro_batch_tokens and self.distributed == "fsdp":
            raise ConfigError("micro_batch_tokens does not combine with distributed: fsdp "
                              "(every rank must run as many forwards, each gathering the "
                              "sharded layers; micro-batches by tokens differ between ranks)")
        if self.optimizer_on_host and self.distributed == "fsdp":
            raise ConfigError("optimizer_on_host does not combine with distributed: fsdp "
                              "(FSDP shards the optimizer state across ranks instead)")
        if self.reference_on_host and self.distributed == "fsdp":
            raise ConfigError("reference_on_host does not combine with distributed: fsdp "
                              "(FSDP shards the reference across ranks instead)")
        if self.on_data_error not in ("skip", "raise"):
            raise ConfigError(
                f"on_data_error must be 'skip' or 'raise', got {self.on_data_error!r}"
            )
        if self.warmup_steps > self.steps:
            raise ConfigError(f"warmup_steps ({self.warmup_steps}) exceeds steps ({self.steps})")
        if "{question}" not in self.prompt_template:
            raise ConfigError("prompt_template must contain {question}")
        if "{answer}" not in self.answer_template:
            raise ConfigError("answer_template must contain {answer}")
        for name, key in (("prompt_template", "question"), ("answer_template", "answer")):
            try:
                getattr(self, name).format(**{key: ""})
            except (KeyError, IndexError, ValueError) as error:
                raise ConfigError(
                    f"{name} must have {{{key}}} as its only placeholder (write other braces "
                    f"as {{{{ and }}}}): {type(error).__name__}: {error}"
                ) from error
        if not self.stop_strings or any(not s for s in self.stop_strings):
            raise ConfigError("stop_strings must be non-empty strings")
        if self.device not in ("auto", "cpu", "cuda") and not (
            self.device.startswith("cuda:") and self.device[5:].isdigit()
        ):
            raise ConfigError(
                f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}"
            )
        if self.penalty_mode == "batch_mean" and self.nonstop_penalty <= 0:
            raise ConfigError(
                "penalty_mode='batch_mean' multiplies the batch's mean answer log-prob (negative) by "
                f"nonstop_penalty, which must then be > 0 to penalize (reference: 2.0), got {self.nonstop_penalty}"
            )
        if self.penalty_mode == "constant" and self.nonstop_penalty >= 0:
            raise ConfigError(
                "penalty_mode='constant' gives a rationale that never stopped nonstop_penalty as "
                "its self-reward in place of log p(y|x,z), which is < 0, so it must be < 0 to "
                f"penalize (default -10), got {self.nonstop_penalty}"
            )
        if self.rollout_decoder not in ("auto", "static", "hf"):
            raise ConfigError(
                f"rollout_decoder must be 'auto', 'static' or 'hf', got {self.rollout_decoder!r}"
            )
        if self.keep_best and not self.eval_every:
            raise ConfigError(
                "keep_best needs eval_every > 0: the best checkpoint is the one of the best "
                "in-training evaluation"
            )
        if self.distributed_timeout_minutes <= 0:
            raise ConfigError(
                f"distributed_timeout_minutes must be > 0, got {self.distributed_timeout_minutes}"
            )
        if self.distributed not in ("auto", "none", "ddp", "fsdp"):
            raise ConfigError(
                f"distributed must be 'auto', 'none', 'ddp' or 'fsdp', got {self.distributed!r}"
            )
        if self.eval_temperature <= 0:
            raise ConfigError(
                f"eval_temperature must be > 0 (maj@k samples), got {self.eval_temperature}"
            )

    def bf16_autocast(self, device_type: str) -> bool:
        """Whether forwards on ``device_type`` ("cuda", "cpu") run under bf16 autocast: training,
        rollouts and evaluation alike, so a checkpoint is evaluated with the numerics it was
        trained with."""
        return self.bf16 == "on" or (self.bf16 == "auto" and device_type == "cuda")

    @property
    def rollout_batch_size(self) -> int:
        """Sequences per step: prompts_per_step * k."""
        return self.prompts_per_step * self.k

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def save_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> LatroConfig:
        known = {f.name: f for f in dataclasses.fields(cls)}
        # YAML reads keys such as 1 or on/off/yes/no as numbers and booleans.
        not_text = [k for k in values if not isinstance(k, str)]
        if not_text:
            raise ConfigError(
                "config keys must be text, got "
                + ", ".join(f"{k!r} ({type(k).__name__})" for k in not_text)
                + " (quote a key YAML reads as a number or a boolean)"
            )
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _coerce(k, v, hints[k]) for k, v in values.items()})

    @classmethod
    def from_yaml(cls, path: str | Path | None, overrides: Sequence[str] = ()) -> LatroConfig:
        """Loads a YAML file (safe loader) and applies ``key=value`` / ``--key value`` overrides."""
        values: dict[str, Any] = {}
        if path is not None:
            try:
                loaded = yaml.safe_load(Path(path).read_text()) or {}
            except OSError as error:
                raise ConfigError(f"{path}: cannot read the config file ({error})") from error
            except yaml.YAMLError as error:
                raise ConfigError(f"{path}: not valid YAML: {error}") from error
            if not isinstance(loaded, dict):
                raise ConfigError(f"{path}: the top level must be a mapping of config keys")
            values.update(loaded)
        values.update(parse_overrides(overrides))
        return cls.from_dict(values)


def parse_overrides(items: Sequence[str], cls: type | None = None) -> dict[str, Any]:
    """``["--k", "8", "lr=1e-4", "--plot=false"]`` -> {"k": 8, "lr": 1e-4, "plot": False};
    values are read as YAML scalars and coerced to the field's type later, except for text
    fields of ``cls`` (default LatroConfig), which keep the text as typed: YAML would read
    ``{question}`` as a mapping, ``Answer:`` as one and cut ``exp #2`` at its comment. A list of
    texts is a single text unless written as a YAML list (``'["a", "b"]'``)."""
    hints = typing.get_type_hints(cls or LatroConfig)
    result: dict[str, Any] = {}
    items = list(items)
    i = 0
    while i < len(items):
        item = items[i]
        key = item[2:] if item.startswith("--") else item
        if "=" in key:
            key, raw = key.split("=", 1)
        elif i + 1 < len(items):
            i += 1
            raw = items[i]
        else:
            raise ConfigError(f"override {item!r} has no value")
        key = key.replace("-", "_")
        hint = hints.get(key)
        if hint is str or (_is_text_list(hint) and not raw.lstrip().startswith("[")):
            result[key] = raw
        else:
            try:
                result[key] = yaml.safe_load(raw)
            except yaml.YAMLError:
                result[key] = raw
        i += 1
    return result


def _is_text_list(hint: Any) -> bool:
    return typing.get_origin(hint) is tuple and typing.get_args(hint)[:1] == (str,)


# Text fields whose values are 'auto', 'on' or 'off'.
_SWITCHES = ("bf16", "use_chat_template")


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Converts YAML values to the field's declared type, or raises ConfigError."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        args = typing.get_args(hint)
        item_type = args[0]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(name, v, item_type) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{name} must have {len(args)} items, got {value!r}")
        return tuple(_coerce(name, v, t) for v, t in zip(value, args))
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{name}: union types are not supported in LatroConfig")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML reads 1e-6 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{name} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if name in _SWITCHES and isinstance(value, bool):
            value = "on" if value else "off"  # YAML 1.1 reads on / off (and yes / no) as booleans
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    return value


def _check_types(config: LatroConfig) -> None:
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        setattr(config, f.name, _coerce(f.name, getattr(config, f.name), hints[f.name]))


__all__ = ["ConfigError", "DEFAULT_STOP_STRINGS", "LatroConfig", "describe", "parse_overrides"]

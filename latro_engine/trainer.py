"""The LaTRO trainer and the SFT baseline trainer.

One LaTRO step: sample K rationales for each of ``prompts_per_step`` questions (stopping each at
an answer template or EOS), score log p(z|x) and log p(y|x,z) in one pass over [x, z, y],
score log p_ref(z|x), turn them into rewards and leave-one-out advantages, and take one
optimizer step over micro-batches with gradient accumulation (on-policy).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from latro_engine import checkpoint as ckpt
from latro_engine.config import ConfigError, LatroConfig
from latro_engine.data import Example
from latro_engine.distributed import Distributed
from latro_engine.evaluation import EvalResult, Kind, write_eval_jsonl
from latro_engine.generation import (
    answers_after_rationales,
    context_length,
    encode_prompts,
    end_ids,
    evaluate_model,
    fit_to_context,
    pad_id,
    sft_targets,
)
from latro_engine.metrics import MetricsLog, plot_curves, read_metrics
from latro_engine.objective import batch_advantages, latro_loss, loss_weights
from latro_engine.offload import HostStateAdamW, discard_prefetch, keep_on_host, prefetch
from latro_engine.rollout import Rollout, sample_rationales, stop_token_sequences
from latro_engine.scoring import (
    SequenceScores,
    as_padded,
    length_batches,
    reference_logprobs,
    scoring_attention,
)

logger = logging.getLogger(__name__)


# The LaTRO step after its rollout, as two passes that the trainer (and the whole-step benchmark)
# run: ``score(rows, micro_batch_size=None, max_tokens=None, weights=None)`` scores rows of the
# rollout with the policy (``score_sequences``, under the run's autocast), ``reference(rows)``
# gives their log p_ref(z|x).
Score = Callable[..., SequenceScores]
Reference = Callable[[torch.Tensor], torch.Tensor]

# The no-grad scoring passes (the rewards' and the reference's) keep no activations for a
# backward: their forwards take this many times a micro-batch's rows and tokens.
NO_GRAD_BATCH_SCALE = 4


def no_grad_batch(config: LatroConfig) -> dict[str, int]:
    """``score_sequences``' rows and tokens per forward for a no-grad pass."""
    return {
        "micro_batch_size": config.micro_batch_size * NO_GRAD_BATCH_SCALE,
        "max_tokens": config.micro_batch_tokens * NO_GRAD_BATCH_SCALE,
    }


def rewards_in_gradient_pass(config: LatroConfig) -> bool:
    """Whether micro-batches get their rewards from their own gradient pass: when they hold
    whole groups and the penalty needs no batch-wide mean (and they are not cut by tokens,
    which splits groups). Two forwards per sequence (reference, policy) instead of three."""
    return (
        config.micro_batch_size % config.k == 0
        and config.penalty_mode == "constant"
        and not config.micro_batch_tokens
    )


# A micro-batch of whole groups is scored in one pass before its loss (the rewards need every
# row of a group), and the rows of a forward share one width, that of the longest. Where
# rationales stop at different lengths the pass runs in FORWARD_PARTS forwards of rows of
# similar length when that pads at least a fifth fewer tokens (more forwards cost launches
# and smaller matmuls, so rows of one length stay in one).
FORWARD_PARTS = 4
MIN_PADDING_SAVED = 0.2


def rows_per_forward(lengths: Sequence[int]) -> int | None:
    """Rows per forward for a micro-batch whose sequences have these lengths (sorted by length
    into FORWARD_PARTS forwards), or None for one forward."""
    n = len(lengths)
    size = -(-n // FORWARD_PARTS)
    if n == 0 or size >= n:
        return None
    ordered = sorted(lengths)
    split = sum(len(ordered[i : i + size]) * ordered[min(i + size, n) - 1] for i in range(0, n, size))
    return size if split <= (1.0 - MIN_PADDING_SAVED) * n * ordered[-1] else None


def nonfinite_gradients(model: torch.nn.Module, limit: int = 8) -> list[str]:
    """The names of the parameters whose gradient holds a NaN or an infinity (this process's
    part of it under FSDP), the first ``limit`` and then how many more: where a skipped step's
    non-finite gradient norm came from. One host synchronization per parameter: for a step
    already known to be bad."""
    bad = []
    for name, param in model.named_parameters():
        grad = param.grad
        if grad is None:
            continue
        grad = grad.to_local() if hasattr(grad, "to_local") else grad  # an FSDP2 DTensor
        if not bool(torch.isfinite(grad).all()):
            bad.append(name)
    return bad[:limit] + ([f"{len(bad) - limit} more"] if len(bad) > limit else [])


def advantages_pass(
    rollout: Rollout, config: LatroConfig, score: Score, reference: Reference, dist: Distributed
) -> tuple[torch.Tensor | None, dict[str, float]]:
    """The advantages of this rank's rows from one no-grad pass over them (rewards and their
    stats over the global batch), or ``(None, {})`` when the gradient pass computes its own
    (:func:`rewards_in_gradient_pass`)."""
    if rewards_in_gradient_pass(config):
        return None, {}
    rows = torch.arange(rollout.batch_size, device=rollout.prompt_ids.device)
    with torch.no_grad():
        scores = score(rows, **no_grad_batch(config))
    ref = reference(rows)
    advantages, stats = batch_advantages(
        *dist.gather_rows(scores.answer_logp, scores.rationale_logp, ref, rollout.finished),
        k=config.k,
        kl_coef=config.kl_coef,
        nonstop_penalty=config.nonstop_penalty,
        penalty_mode=config.penalty_mode,
    )
    return dist.shard(advantages)[0], stats


def gradient_pass(
    rollout: Rollout,
    advantages: torch.Tensor | None,
    config: LatroConfig,
    score: Score,
    reference: Reference,
    dist: Distributed,
    answer_lengths: Sequence[int] | None = None,
) -> dict[str, float]:
    """Accumulates the step's gradient over micro-batches (their losses weighted by their share
    of the rows); returns latro_loss's stats averaged over them. With ``advantages`` the loss is
    linear in the scores with known coefficients and each scoring pass takes its gradient as it
    goes (``loss_weights``: three LM-head matmuls instead of four), and micro-batches take the
    rows in order of length; without, the reference scores every row first (one pass) and
    each micro-batch (whole groups, in order) computes its own rewards. ``answer_lengths``:
    each row's answer tokens, counted in ``micro_batch_tokens`` (the scored rows are
    ``[x, z, y]``)."""
    total, mb = rollout.batch_size, config.micro_batch_size
    device = rollout.prompt_ids.device
    lengths = rollout.prompt_mask.sum(-1) + rollout.rationale_lengths
    if advantages is not None:
        # With the advantages known, any rows may share a micro-batch: rows of similar length
        # do, as a micro-batch is as wide as its longest row (rationales that stop early would
        # otherwise be padded to the length of those that ran on), up to micro_batch_size rows
        # and micro_batch_tokens tokens.
        tokens = lengths.tolist()
        if answer_lengths is not None:
            tokens = [t + a for t, a in zip(tokens, answer_lengths, strict=True)]
        batches = length_batches(tokens, mb, config.micro_batch_tokens, device)
    else:  # whole groups, in order
        batches = [list(range(b, min(b + mb, total))) for b in range(0, total, mb)]
    sums: dict[str, float] = {}
    own_scores: list[tuple[torch.Tensor, torch.Tensor]] = []  # (answer, rationale), in row order
    # The reference scores every row in one no-grad pass (one upload of its weights per step
    # when they are kept on the host), not one per micro-batch.
    all_ref = reference(torch.arange(total, device=device)) if advantages is None else None
    for number, batch in enumerate(batches):
        rows = torch.tensor(batch, device=device)
        last = number == len(batches) - 1
        share = len(batch) / total
        known = advantages[rows] if advantages is not None else None
        ref = all_ref[rows] if all_ref is not None else None
        weights = None
        if known is not None:
            weights = tuple(w * share for w in loss_weights(known, config.sft_weight))
        # gradients cross ranks once per step: in the last micro-batch's backward
        with dist.gradient_sync(last):
            if known is None:  # whole groups: their forwards split by length (rows_per_forward)
                size = rows_per_forward(lengths[rows].tolist())
                if dist.mode == "fsdp":
                    # Every forward gathers each sharded layer on all ranks: they must run as
                    # many (a split is always ceil(n / FORWARD_PARTS) rows, n the same on all).
                    split = dist.any_rank(size is not None)
                    size = -(-len(rows) // FORWARD_PARTS) if split else None
                scores = score(rows, micro_batch_size=size)
            else:
                scores = score(rows, weights=weights)
            # With known advantages latro_loss only reports (its inputs carry no gradient).
            loss, mb_stats = latro_loss(
                scores.answer_logp,
                scores.rationale_logp,
                ref if ref is not None else torch.zeros_like(scores.rationale_logp),
                rollout.finished[rows],
                k=config.k,
                kl_coef=config.kl_coef,
                sft_weight=config.sft_weight,
                nonstop_penalty=config.nonstop_penalty,
                penalty_mode=config.penalty_mode,
                advantages=known,
            )
            # the recompute of activation checkpointing runs in the backward: same kernels
            with scoring_attention(rollout.prompt_ids.device):
                (loss * share if known is None else scores.loss).backward()
        if known is None:
            own_scores.append((scores.answer_logp.detach(), scores.rationale_logp.detach()))
        for key, value in mb_stats.items():
            sums[key] = sums.get(key, 0.0) + value * share
    if all_ref is not None:
        # The stats of the rewards and advantages are the batch's, as advantages_pass reports
        # them (a std or a max is not the mean of the micro-batches'). Rows went in order here.
        answer_logp, rationale_logp = (torch.cat(column) for column in zip(*own_scores))
        _, batch_stats = batch_advantages(
            *dist.gather_rows(answer_logp, rationale_logp, all_ref, rollout.finished),
            k=config.k,
            kl_coef=config.kl_coef,
            nonstop_penalty=config.nonstop_penalty,
            penalty_mode=config.penalty_mode,
        )
        sums.update(batch_stats)
    return sums


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row)."""


def resolve_device(name: str) -> torch.device:
    """The config's ``device``; a CUDA device this machine does not have is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device {name!r}: this machine has no CUDA device (torch "
                              f"{torch.__version__}, CUDA build: {torch.version.cuda or 'no'})")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"device {name!r}: this machine has {count} CUDA device(s)")
    return device


def check_run_settings(config: LatroConfig, *, has_eval_data: bool) -> torch.device:
    """The checks of a run's settings against this machine and the run's data (the CLI makes
    them before it loads any model); returns the device."""
    if config.keep_best and not has_eval_data:
        raise ConfigError("keep_best needs an eval_dataset to evaluate every eval_every steps")
    output_dir = Path(config.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"output_dir {str(output_dir)!r} is a file, not a directory")
    return resolve_device(config.device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _lr_lambda(config: LatroConfig):
    def factor(step: int) -> float:
        if config.warmup_steps and step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.lr_schedule == "constant":
            return 1.0
        remaining = config.steps - config.warmup_steps
        return max(0.0, 1.0 - (step - config.warmup_steps) / max(1, remaining))

    return factor


def _data_digest(examples: Sequence[Example], *, rationales: bool = False) -> str:
    """A digest of the examples in their order (the data order is drawn over their indices, so
    resuming over other data would continue another sequence); with their worked solutions
    where the run trains on them (SFT)."""
    digest = hashlib.sha256()
    for e in examples:
        fields = [e.id, e.question, e.answer, e.options, *([e.rationale] if rationales else [])]
        digest.update(json.dumps(fields).encode())
    return f"{len(examples)} examples, sha256 {digest.hexdigest()[:16]}"


# Settings added after checkpoints were first written, with the value their runs had: a run
# saved without one is compared as having it, so resuming it under a new default is refused
# by name instead of silently training on with another objective.
_SETTINGS_BEFORE_THEY_EXISTED = {"answer_after_stop": "template", "sft_target": "answer"}


def _weights_digest(*models: torch.nn.Module | None) -> str:
    """A digest of the weights a run starts from: each parameter's name and shape and 64 of its
    values spread over it, bit for bit. Cheap (no pass over the weights) and exact: any update
    of a model changes most values, so a checkpoint of the run or another fine-tune passed as
    the model differs."""
    digest = hashlib.sha256()
    count = 0
    for model in models:
        for name, p in model.named_parameters() if model is not None else ():
            flat = p.detach().reshape(-1)
            n, m = flat.numel(), min(64, flat.numel())
            # Integer picks: a float32 linspace rounds past the end beyond 2^24 elements.
            picks = torch.arange(m, dtype=torch.int64) * (n - 1) // max(m - 1, 1)
            sample = flat[picks.to(flat.device)].double().cpu()
            digest.update(f"{name} {tuple(p.shape)} ".encode() + sample.numpy().tobytes())
            count += 1
    return f"{count} tensors, sha256 {digest.hexdigest()[:16]}"


class _Trainer:
    """What LaTRO and SFT share: device, optimizer, data order, checkpoints, metrics, eval."""

    name = "trainer"
    # Settings that make a run what it is, with its training data: a checkpoint whose run had
    # other values (another experiment pointed at the same output_dir) is not resumed. The
    # optimizer's settings, steps, memory, evaluation and logs may change on resuming.
    identity_fields: tuple[str, ...] = (
        "seed",
        "prompt_template",
        "answer_template",
        "answer_prefix",
        "use_chat_template",
        "lora_rank",
        "lora_alpha",
        "lora_target_modules",
    )

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        train_dataset: Sequence[Example],
        config: LatroConfig,
        eval_dataset: Sequence[Example] | None = None,
        *,
        eval_kind: Kind = "gsm8k",
        reference_model: torch.nn.Module | None = None,
    ):
        """``reference_model``: a frozen reference given apart from ``model`` (LaTRO's), whose
        weights are part of the run's identity as ``model``'s are."""
        if len(train_dataset) == 0:
            raise ValueError("train_dataset is empty")
        device = check_run_settings(config, has_eval_data=bool(eval_dataset))
        # Saved with each checkpoint: resuming must start from the same weights, which are also
        # the KL term's reference (a copy of them, or LoRA's base) and what LoRA adapts. Rank
        # 0's (below), whose weights every rank takes.
        start_weights = _weights_digest(model, reference_model)
        self.config = config
        self.tokenizer = tokenizer
        # Examples too long for the model are reported with their line, then skipped or
        # raised (config.on_data_error), before any step.
        context = context_length(model)
        use = "sft" if self.name == "sft" else "latro"
        self.train_dataset = fit_to_context(
            tokenizer, train_dataset, config, context, use=use, source="train_dataset"
        )
        # saved with each checkpoint
        self.train_data_digest = _data_digest(
            self.train_dataset, rationales=self.name == "sft" and config.sft_target == "rationale"
        )
        self.eval_dataset = None
        if eval_dataset is not None:
            self.eval_dataset = fit_to_context(
                tokenizer, eval_dataset, config, context, use="eval", source="eval_dataset"
            )
        self.eval_kind = eval_kind
        if config.threads:
            torch.set_num_threads(config.threads)
        if config.deterministic:
            if device.type == "cuda":
                # cuBLAS is deterministic only with a fixed workspace, which torch insists on
                # (a RuntimeError at the first matmul otherwise). Set before the model moves
                # to the device and runs its first matmul.
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        seed_everything(config.seed)
        self.dist = Distributed(config, device)
        self.start_weights = self.dist.from_main(start_weights)
        self.device = self.dist.device
        self.autocast = config.bf16_autocast(self.device.type)
        self.model = self.dist.prepare(
            self._prepare_model(model.to(self.device)), bf16=self.autocast
        )
        self._scorer = self.dist.scorer(self.model)  # score_sequences(self.model, ...), DDP-aware
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        optimizer_cls = HostStateAdamW if config.optimizer_on_host else torch.optim.AdamW
        self.optimizer = optimizer_cls(
            params,
            lr=config.learning_rate,
            betas=config.adam_betas,
            weight_decay=config.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(config))
        self.output_dir = Path(config.output_dir)
        self.step = 0
        self.epoch, self.index = 0, 0
        self.nonfinite_in_a_row = 0
        self.skipped_steps = 0
        self._resumed_from: Path | None = None  # a checkpoint resume_from was given
        # keep_best: the step and greedy accuracy of the best in-training evaluation so far
        self.best_step: int | None = None
        self.best_accuracy: float | None = None
        if config.keep_best and not self.eval_dataset:  # every eval example was too long
            raise ConfigError("keep_best needs an eval_dataset to evaluate every eval_every steps")
        self._order = self._epoch_order(0)

    # ------------------------------------------------------------------ set-up
    def _prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.config.gradient_checkpointing:
            set_activation_checkpointing(model, True)
        if self.config.lora_rank:
            try:
                from peft import LoraConfig, get_peft_model
            except ImportError as error:
                raise ImportError("lora_rank > 0 needs peft: pip install peft") from error
            try:
                model = get_peft_model(
                    model,
                    LoraConfig(
                        r=self.config.lora_rank,
                        lora_alpha=self.config.lora_alpha,
                        lora_dropout=self.config.lora_dropout,
                        target_modules=list(self.config.lora_target_modules),
                        task_type="CAUSAL_LM",
                    ),
                )
            except ValueError as error:  # peft: no module of the model has one of the names
                raise ConfigError(
                    f"lora_target_modules {list(self.config.lora_target_modules)}: "
                    f"{str(error).splitlines()[0]}"
                ) from error
        model.train()
        return model

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast)

    # ------------------------------------------------------------------ data order
    def _epoch_order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.train_dataset), generator=g).tolist()

    def _next_examples(self, count: int) -> list[Example]:
        batch = []
        while len(batch) < count:
            if self.index >= len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            batch.append(self.train_dataset[self._order[self.index]])
            self.index += 1
        return batch

    def _next_shard(self) -> tuple[list[Example], int]:
        """This process's ``prompts_per_step`` slice of the next global batch (the same global
        order on every rank), and the global index of its first prompt."""
        world = self.dist.world_size
        return self.dist.shard(self._next_examples(self.config.prompts_per_step * world))

    # ------------------------------------------------------------------ checkpoints
    def _trainer_state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "index": self.index,
            "skipped_steps": self.skipped_steps,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "best_step": self.best_step,
            "best_accuracy": self.best_accuracy,
            "trainer": self.name,
            "config": self.config.to_dict(),
            "train_data": self.train_data_digest,
            "start_weights": self.start_weights,
        }

    def _check_same_run(self, path: str | Path, state: dict[str, Any]) -> None:
        saved_by = state.get("trainer", self.name)
        if saved_by != self.name:  # e.g. `latro sft` pointed at a LaTRO run's directory
            raise ckpt.CheckpointError(
                f"{path} was written by the {saved_by} trainer, not {self.name}: use another "
                "output_dir for this run"
            )
        ours = {**self.config.to_dict(), "train_data": self.train_data_digest}
        saved = state.get("config", {})
        theirs = {**_SETTINGS_BEFORE_THEY_EXISTED, **saved, "train_data": state.get("train_data")}
        if not saved:  # a checkpoint without its settings (written by hand): nothing to compare
            theirs = {"train_data": state.get("train_data")}
        fields = [*self.identity_fields, "train_data"]
        if not ours["lora_rank"] and not theirs.get("lora_rank"):  # no adapters either side
            fields = [f for f in fields if f not in ("lora_alpha", "lora_target_modules")]
        differ = [
            f"{name} {theirs[name]!r} there, {ours[name]!r} here"
            for name in fields
            if theirs.get(name) is not None and theirs[name] != ours[name]
        ]
        if differ:
            raise ckpt.CheckpointError(
                f"{path} is a checkpoint of another run ({'; '.join(differ)}): use another "
                "output_dir for this run (resume is on, and continuing that run with these "
                "settings or data would silently mix the two)"
            )
        started = state.get("start_weights")  # (absent from checkpoints of older versions)
        if started is not None and started != self.start_weights:
            raise ckpt.CheckpointError(
                f"{path} continues a run that started from other weights ({started} there, "
                f"{self.start_weights} here; the same weights in another dtype differ too): "
                "resume with the model the run started from, not one of its checkpoints, since "
                "the KL term's reference and LoRA's base are those weights (to train on from a "
                "checkpoint as a new run, use another output_dir)"
            )

    def save_checkpoint(self) -> Path:
        return self.dist.save_checkpoint(
            self.output_dir,
            self.step,
            model=self.model,
            tokenizer=self.tokenizer,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            trainer_state=self._trainer_state(),
            keep=self.config.keep_checkpoints,
            best_step=self.best_step if self.config.keep_best else None,
        )

    def resume_from(self, path: str | Path) -> None:
        """Continues from checkpoint ``path``; :meth:`train` then goes on from it (and refuses
        an ``output_dir`` holding later checkpoints, or another run's)."""
        self._check_same_run(path, ckpt.read_trainer_state(path))
        self._resumed_from = Path(path)
        state = self.dist.load_checkpoint(
            path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler
        )
        self.step = int(state["step"])
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))
        self.best_step, self.best_accuracy = state.get("best_step"), state.get("best_accuracy")
        self._order = self._epoch_order(self.epoch)
        self._apply_optimizer_settings()
        logger.info("resumed from %s at step %d", path, self.step)

    def _apply_optimizer_settings(self) -> None:
        """After loading a checkpoint: the optimizer's state (AdamW moments) and the schedule's
        position are the checkpoint's, its settings (learning rate, betas, weight decay, the
        schedule) this run's config, so that resuming with a lower learning rate lowers it
        (loading alone would bring back the saved ones)."""
        config, groups = self.config, self.optimizer.param_groups
        saved = (self.scheduler.base_lrs[0], tuple(groups[0]["betas"]), groups[0]["weight_decay"])
        wanted = (config.learning_rate, tuple(config.adam_betas), config.weight_decay)
        if saved != wanted:
            logger.info(
                "resuming with learning_rate, adam_betas, weight_decay = %s (the checkpoint's: %s)",
                wanted,
                saved,
            )
        self.scheduler.base_lrs = [config.learning_rate] * len(groups)
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)  # this config's schedule
        saved_lr = groups[0]["lr"]
        if not math.isclose(saved_lr, config.learning_rate * factor, rel_tol=1e-9, abs_tol=0.0):
            # Another schedule, steps or warm-up: the rate moves at once, which a curve shows.
            logger.info(
                "resuming at step %d with learning rate %.3g (the checkpoint's run was at %.3g)",
                self.step, config.learning_rate * factor, saved_lr,
            )
        for group in groups:
            group.update(
                initial_lr=config.learning_rate,
                lr=config.learning_rate * factor,
                betas=tuple(config.adam_betas),
                weight_decay=config.weight_decay,
            )

    # ------------------------------------------------------------------ optimizer step
    def _apply_gradients(self, loss: float = 0.0) -> tuple[float, bool]:
        """Clips and steps; a non-finite gradient or ``loss`` (on any rank) skips the step
        (counted) instead."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = self.dist.clip_grad_norm(params, self.config.max_grad_norm or float("inf"))
        bad_loss = self.dist.reduce_metrics({"bad_loss": float(not math.isfinite(loss))})
        finite = bool(torch.isfinite(norm)) and bad_loss["bad_loss"] == 0.0
        if finite:
            self.optimizer.step()
            self.nonfinite_in_a_row = 0
        else:
            self.skipped_steps += 1
            self.nonfinite_in_a_row += 1
            logger.warning(
                "step %d: non-finite loss (%s) or gradient norm (%s), update skipped; "
                "non-finite gradients on this rank: %s",
                self.step + 1,
                loss,
                float(norm),
                ", ".join(nonfinite_gradients(self.model)) or "none",
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return float(norm), finite

    # ------------------------------------------------------------------ loop
    def train_step(self) -> dict[str, Any]:
        raise NotImplementedError

    def train(self) -> list[dict[str, Any]]:
        """Runs (or resumes) training to ``config.steps``; returns the metric records."""
        config = self.config
        resume_step = None
        # Rank 0 looks and every rank follows: ranks that each scanned their own view of
        # output_dir (a node-local disk, a stale network mount) could resume different steps.
        saved = self.dist.from_main([(s, p.name) for s, p in ckpt.list_checkpoints(self.output_dir)])
        found = [name for _, name in saved]
        if self._resumed_from is not None:  # resume_from was called: train on from there
            resume_step = self.step
            elsewhere = self._resumed_from.resolve().parent != self.output_dir.resolve()
            mixed = found if elsewhere else [name for s, name in saved if s > self.step]
            if mixed:
                raise ckpt.CheckpointError(
                    f"resumed from {self._resumed_from} at step {self.step}, but "
                    f"{self.output_dir} holds {', '.join(mixed)}, which this run's checkpoints "
                    "would be mixed with (a later resume or pruning goes by step number): "
                    "choose another output_dir, or move them away"
                )
            if elsewhere:  # its best checkpoint is not in this output_dir: keep_best starts over
                self.best_step, self.best_accuracy = None, None
        elif config.resume:
            if found:
                latest = self.output_dir / found[-1]
                if self.dist.any_rank(not ckpt.is_complete(latest)):  # every rank raises alike
                    raise ckpt.CheckpointError(
                        f"rank 0 resumes from {found[-1]}, which not every rank finds complete "
                        f"in {self.output_dir}: output_dir must be one directory all ranks share"
                    )
                self.resume_from(latest)
                resume_step = self.step
        elif found:
            # A fresh run among another run's checkpoints would prune them by step number and
            # a later resume could pick theirs: refused, nothing is deleted.
            names = ", ".join(found)
            raise ckpt.CheckpointError(
                f"{self.output_dir} holds checkpoints of an earlier run ({names}) and resume is "
                "off: resume it, choose another output_dir, or remove them"
            )
        main = self.dist.is_main  # only rank 0 writes logs, config and plots
        log = None
        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            config.save_yaml(self.output_dir / "config.yaml")
            log = MetricsLog(
                self.output_dir / "metrics.jsonl",
                resume_step=resume_step,
                tensorboard_dir=self.output_dir / "tensorboard" if config.tensorboard else None,
            )
        bar = tqdm(
            total=config.steps,
            initial=self.step,
            desc=self.name,
            disable=not (config.progress and main),
        )
        try:
            while self.step < config.steps:
                record = self.dist.reduce_metrics(self.train_step())
                self.step += 1
                record = {"step": self.step, "lr": self.scheduler.get_last_lr()[0], **record}
                new_best = False
                if config.eval_every and self.eval_dataset and self.step % config.eval_every == 0:
                    result = self.evaluate(maj_k=0)
                    record["eval_greedy_accuracy"] = result.greedy_accuracy
                    # over the examples that fit the context (fit_to_context skips the others)
                    record["eval_n"] = result.n
                    best = self.best_accuracy
                    if config.keep_best and (best is None or result.greedy_accuracy > best):
                        self.best_step, self.best_accuracy = self.step, result.greedy_accuracy
                        new_best = True  # saved now, and kept while better ones do not come
                if log and (self.step % config.log_every == 0 or self.step == config.steps):
                    log.write(record)
                bar.update(1)
                bar.set_postfix(
                    {k: f"{record[k]:.3g}" for k in ("loss", "reward_mean") if k in record}
                )
                limit = config.max_nonfinite_steps
                if limit and self.nonfinite_in_a_row >= limit:
                    path = self.save_checkpoint()
                    in_a_row = self.nonfinite_in_a_row  # (more than limit after a resume)
                    raise TrainingError(
                        f"{in_a_row} non-finite steps in a row (loss or gradients NaN/inf; no "
                        f"update since step {self.step - in_a_row}) at step {self.step}: stopped "
                        f"and saved {path}. Lower the learning rate or check the data, then "
                        "resume (max_nonfinite_steps sets the limit)."
                    )
                if (
                    new_best
                    or (config.save_every and self.step % config.save_every == 0)
                    or self.step == config.steps
                ):
                    self.save_checkpoint()
        finally:
            bar.close()
            if log:
                log.close()
        self.dist.barrier()
        records = read_metrics(self.output_dir / "metrics.jsonl")
        if config.plot and main:
            plot_curves(
                records, self.output_dir / "training_curves.png", title=f"{self.name} training"
            )
        return records

    # ------------------------------------------------------------------ evaluation
    def evaluate(
        self,
        dataset: Sequence[Example] | None = None,
        *,
        maj_k: int | None = None,
        write_path: str | Path | None = None,
    ) -> EvalResult:
        """Greedy and maj@k accuracy on ``dataset`` (default: the eval dataset)."""
        examples = dataset if dataset is not None else self.eval_dataset
        if not examples:
            raise ValueError("no evaluation dataset")
        with self.dist.full_params(self.model):
            result = evaluate_model(
                self.model,
                self.tokenizer,
                examples,
                self.config,
                kind=self.eval_kind,
                maj_k=maj_k,
                device=self.device,
            )
        if write_path is not None and self.dist.is_main:
            write_eval_jsonl(result, write_path)
        return result


def set_activation_checkpointing(model: torch.nn.Module, on: bool) -> None:
    """Turns activation (gradient) checkpointing of a Hugging Face model on or off: grad passes
    keep each decoder layer's input and recompute the rest in the backward. Non-reentrant, so
    it works under DDP. transformers 5 renamed the switch (``activation_checkpointing_*``); the
    old name stays for older versions. A model without either is left as it is."""
    new = "activation_checkpointing_enable" if on else "activation_checkpointing_disable"
    old = "gradient_checkpointing_enable" if on else "gradient_checkpointing_disable"
    if hasattr(model, new):
        kwargs = {"activation_checkpointing_kwargs": {"use_reentrant": False}} if on else {}
        getattr(model, new)(**kwargs)
    elif hasattr(model, old):
        kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}} if on else {}
        getattr(model, old)(**kwargs)


class LatroTrainer(_Trainer):
    """LaTRO: self-rewarding latent-reasoning optimization (Chen et al. 2024).

    ``LatroTrainer(model, tokenizer, train_dataset, config, eval_dataset=None, ref_model=None)``;
    the reference model p0 is ``ref_model``, else the policy with its LoRA adapters disabled
    (``lora_rank > 0``), else a frozen copy of the initial model.
    """

    name = "latro"
    identity_fields = (
        *_Trainer.identity_fields,
        "k",
        "max_rationale_tokens",
        "temperature",
        "top_k",
        "top_p",
        "min_p",
        "stop_strings",
        "answer_after_stop",
        "kl_coef",
        "sft_weight",
        "nonstop_penalty",
        "penalty_mode",
    )

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        train_dataset: Sequence[Example],
        config: LatroConfig,
        eval_dataset: Sequence[Example] | None = None,
        ref_model: torch.nn.Module | None = None,
        *,
        eval_kind: Kind = "gsm8k",
    ):
        given_reference = ref_model
        if ref_model is None and not config.lora_rank:
            ref_model = copy.deepcopy(model)
        super().__init__(
            model, tokenizer, train_dataset, config, eval_dataset, eval_kind=eval_kind,
            reference_model=given_reference,
        )
        self.ref_model = ref_model
        if ref_model is not None:
            frozen = ref_model.to(self.device).eval().requires_grad_(False)
            self.ref_model = self.dist.prepare(frozen, bf16=self.autocast)
            if config.reference_on_host:  # (after prepare: every rank holds rank 0's weights)
                keep_on_host(self.ref_model)
        # Rationales end at an answer template, or where the model ends its turn.
        self.stops = stop_token_sequences(
            tokenizer, config.stop_strings, end_ids=end_ids(tokenizer, config)
        )

    def _rollout(self, examples: list[Example], first: int) -> tuple[Rollout, list[list[int]]]:
        """Samples k rationales per example; ``first`` is the global index of ``examples[0]``:
        rows are seeded by global index, so any world size draws the same rationales."""
        config = self.config
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, examples, config, self.device)
        self.model.eval()  # sample without dropout
        try:
            with self.dist.full_params(self.model), self._autocast():
                rollout = sample_rationales(
                    self.model,
                    prompt_ids,
                    prompt_mask,
                    k=config.k,
                    max_new_tokens=config.max_rationale_tokens,
                    stop_sequences=self.stops,
                    pad_token_id=pad_id(self.tokenizer),
                    seed=config.seed * 1_000_003 + self.step,
                    temperature=config.temperature,
                    top_k=config.top_k,
                    top_p=config.top_p,
                    min_p=config.min_p,
                    sample_ids=torch.arange(first * config.k, (first + len(examples)) * config.k),
                    decoder=config.rollout_decoder,
                )
        finally:
            self.model.train()
        assert rollout.stop_index is not None
        answers = answers_after_rationales(
            self.tokenizer, examples, config, self.stops, rollout.stop_index.tolist()
        )
        return rollout, answers

    def _score(
        self,
        rollout: Rollout,
        rows: torch.Tensor,
        answers: list[list[int]] | None,
        micro_batch_size: int | None = None,
        weights: tuple[torch.Tensor, torch.Tensor] | None = None,
        max_tokens: int | None = None,
    ):
        idx = rows.tolist()
        with self._autocast():
            return self._scorer(
                rollout.prompt_ids[rows],
                rollout.prompt_mask[rows],
                rollout.rationale_ids[rows],
                rollout.rationale_lengths[rows],
                [answers[i] for i in idx] if answers is not None else None,
                micro_batch_size=micro_batch_size,
                max_tokens=max_tokens,
                loss_weights=weights,
            )

    def _reference(self, rollout: Rollout, rows: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return reference_logprobs(
                self.model,
                self.ref_model,
                rollout.prompt_ids[rows],
                rollout.prompt_mask[rows],
                rollout.rationale_ids[rows],
                rollout.rationale_lengths[rows],
                **no_grad_batch(self.config),
                fast_path=self.dist.fast_path,
            ).rationale_logp

    def train_step(self) -> dict[str, Any]:
        config = self.config
        start = time.perf_counter()
        examples, first = self._next_shard()
        # A reference kept in host memory: its upload for this step's reference pass overlaps
        # the rollout (a no-op otherwise); a step that fails first drops the copies.
        if self.ref_model is not None:
            prefetch(self.ref_model, self.device)
        try:
            rollout, answers = self._rollout(examples, first)
            rollout_time = time.perf_counter() - start

            def score(rows: torch.Tensor, **kwargs: Any) -> SequenceScores:
                return self._score(rollout, rows, answers, **kwargs)

            def reference(rows: torch.Tensor) -> torch.Tensor:
                return self._reference(rollout, rows)

            advantages, stats = advantages_pass(rollout, config, score, reference, self.dist)
            score_time = time.perf_counter() - start - rollout_time
            sums = gradient_pass(rollout, advantages, config, score, reference, self.dist,
                                 answer_lengths=[len(a) for a in answers])
        finally:
            if self.ref_model is not None:
                discard_prefetch(self.ref_model)
        grad_norm, finite = self._apply_gradients(sums.get("loss", 0.0))
        elapsed = time.perf_counter() - start
        lengths = rollout.rationale_lengths.float()
        tokens = int(rollout.rationale_lengths.sum()) + int(rollout.prompt_mask.sum())
        return {
            **stats,
            **sums,
            "grad_norm": grad_norm,
            "update_skipped": not finite,
            "skipped_steps": self.skipped_steps,
            "rationale_length_mean": float(lengths.mean()),
            "rationale_length_max": float(lengths.max()),
            "finished_frac": float(rollout.finished.float().mean()),
            "samples_per_s": rollout.batch_size / elapsed,
            "tokens_per_s": tokens / elapsed,
            "rollout_s": rollout_time,
            "score_s": score_time,
            "train_s": elapsed - rollout_time - score_time,
        }


class SFTTrainer(_Trainer):
    """The SFT baseline of the paper: question -> the data's worked solution, then the answer
    template (GSM8K), or the answer template alone where there is none (ARC), same data and
    budget (``steps`` x ``prompts_per_step`` questions), loss = -mean_i log p(z_i, y_i | x_i)
    (``sft_target``: :func:`latro_engine.generation.sft_targets`)."""

    name = "sft"
    identity_fields = (*_Trainer.identity_fields, "sft_target")

    def train_step(self) -> dict[str, Any]:
        config = self.config
        start = time.perf_counter()
        examples, _ = self._next_shard()
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, examples, config, self.device)
        rationales, answers = sft_targets(self.tokenizer, examples, config)
        total = len(examples)
        rationale_ids, rationale_lengths = as_padded(rationales, None, total, 1, self.device)
        answer_sum, rationale_sum = 0.0, 0.0  # of the scores, over all rows / total
        # loss = -mean_i log p(z_i, y_i | x_i): linear in the scores, its gradient taken in the
        # pass
        weight = torch.full((total,), -1.0 / total, device=self.device)
        # Micro-batches of questions of similar length (up to micro_batch_size rows and
        # micro_batch_tokens tokens), as in the LaTRO step's gradient pass.
        lengths = [
            p + len(r) + len(a)
            for p, r, a in zip(prompt_mask.sum(-1).tolist(), rationales, answers)
        ]
        batches = length_batches(
            lengths, config.micro_batch_size, config.micro_batch_tokens, self.device
        )
        for number, batch in enumerate(batches):
            sl = torch.tensor(batch, device=self.device)
            with self.dist.gradient_sync(number == len(batches) - 1):
                with self._autocast():
                    scores = self._scorer(
                        prompt_ids[sl],
                        prompt_mask[sl],
                        rationale_ids[sl],
                        rationale_lengths[sl],
                        [answers[i] for i in batch],
                        loss_weights=(weight[sl], weight[sl]),
                    )
                with scoring_attention(self.device):  # checkpointing's recompute
                    scores.loss.backward()
            answer_sum += float(scores.answer_logp.sum()) / total
            rationale_sum += float(scores.rationale_logp.sum()) / total
        loss = -(answer_sum + rationale_sum)
        grad_norm, finite = self._apply_gradients(loss)
        elapsed = time.perf_counter() - start
        return {
            "loss": loss,
            "answer_logp_mean": answer_sum,
            "rationale_logp_mean": rationale_sum,
            "grad_norm": grad_norm,
            "update_skipped": not finite,
            "skipped_steps": self.skipped_steps,
            "samples_per_s": total / elapsed,
        }

"""Tiny Llama base model for the embedded demo: build, pretrain on the synthetic corpus, cache.

The demo must start from a model with *latent but unused* reasoning: pretrained on a corpus
where most questions are answered directly (so greedy decoding answers directly and is
mostly wrong) while a minority is worked step by step (so the model can reason when it
happens to start a rationale).  Pretraining a 0.9M-parameter model for ~1000 steps takes a
few minutes on 2 CPU cores, which is the bulk of the demo's budget, so the result is cached
under ``$LATRO_CACHE`` (default ``~/.cache/latro_engine``) in a directory named by a hash of
every setting that changes the weights, and written atomically (temp dir, then rename) so
concurrent or interrupted runs never leave a half-written model that looks valid.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from latro_engine.synthetic import (
    CorpusSettings,
    TaskSettings,
    build_pretrain_corpus,
    tokenizer_training_texts,
)
from latro_engine.tokenizer import train_char_tokenizer

logger = logging.getLogger(__name__)

#: Bump when the pretraining code changes in a way that changes the weights.
FORMAT_VERSION = 2
_SETTINGS_FILE = "latro_base_settings.json"


@dataclass(frozen=True)
class ModelSettings:
    """Llama dimensions; the defaults give ~0.81M parameters (tied embeddings, 46-char vocab).

    Attributes:
        hidden_size: model width; 128 is enough to copy operands and run the mod-10 tables.
        num_layers: depth; 4 layers can do one step of arithmetic per rationale step.
        num_heads: attention heads (head dim 32); no grouped-query attention.
        intermediate_size: MLP width (about 2.7x hidden, as in Llama).
        max_positions: longest sequence (worked texts are under ~170 characters).
    """

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 352
    max_positions: int = 256


@dataclass(frozen=True)
class PretrainSettings:
    """Pretraining loop; each step draws fresh corpus examples (a single pass, no epochs).

    Attributes:
        steps: optimizer steps.
        batch_size: examples per step.
        lr: peak AdamW learning rate.  Measured with these defaults (about 5 minutes on 2
            free cores): forced to reason, the base answers 99.8% of held-out questions
            right; greedy, it answers directly and gets 21%.
        warmup_steps: linear warm-up, then cosine decay to ``min_lr_ratio * lr``.
        min_lr_ratio: floor of the cosine schedule.
        weight_decay: AdamW decoupled weight decay.
        grad_clip: gradient-norm clip.
        loss_on_prompt: also train on question tokens.  Off by default: the questions are
            uniformly random digits, so their loss is irreducible noise that slows learning.
        seed: seeds the corpus, the initial weights and the batch order.
    """

    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    loss_on_prompt: bool = False
    seed: int = 0


@dataclass(frozen=True)
class BaseSettings:
    """Everything that determines the cached base model, plus run-time knobs.

    ``num_threads`` and ``progress`` do not enter the cache key: they change speed and
    display, not (meaningfully) the weights.  On a 2-core machine ``num_threads=2`` is the
    faster choice when the cores are free, but was measured ~5-10x slower than 1 while other
    processes compete for them (OpenMP threads spin at every barrier); use 1 there.
    """

    task: TaskSettings = field(default_factory=TaskSettings)
    corpus: CorpusSettings = field(default_factory=CorpusSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    pretrain: PretrainSettings = field(default_factory=PretrainSettings)
    num_threads: int = 2
    progress: bool = True

    def key_dict(self) -> dict[str, Any]:
        """The settings that identify the weights (used for the cache key and saved alongside)."""
        return {
            "format_version": FORMAT_VERSION,
            "task": asdict(self.task),
            "corpus": asdict(self.corpus),
            "model": asdict(self.model),
            "pretrain": asdict(self.pretrain),
        }

    def cache_key(self) -> str:
        """Short stable hash of :meth:`key_dict`."""
        blob = json.dumps(self.key_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def cache_root() -> Path:
    """``$LATRO_CACHE`` or ``~/.cache/latro_engine``."""
    return Path(os.environ.get("LATRO_CACHE") or Path.home() / ".cache" / "latro_engine")


def base_model_dir(settings: BaseSettings) -> Path:
    """Where the base model for ``settings`` lives (whether or not it exists yet)."""
    return cache_root() / f"base-{settings.cache_key()}"


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(settings: ModelSettings, tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    """A freshly initialised tiny Llama sized for ``tokenizer``'s vocabulary."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_heads,
        max_position_embeddings=settings.max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def _encode_corpus(
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    completions: list[str],
    loss_on_prompt: bool,
) -> list[tuple[list[int], list[int]]]:
    """Token ids ``[BOS] prompt completion [EOS]`` and labels (-100 where no loss)."""
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(completions, add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    out = []
    for p, c in zip(p_ids, c_ids, strict=True):
        ids = [bos, *p, *c, eos]
        head = [-100] + (p if loss_on_prompt else [-100] * len(p))
        out.append((ids, head + [*c, eos]))
    return out


def _collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch (training needs no left padding)."""
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def machine_environment() -> dict[str, str]:
    """What besides the settings decides the pretrained weights, saved with them: pretraining
    is bitwise repeatable on one machine, but another CPU (torch's kernels for its vector
    unit sum in another order) or other library versions round differently, and over 1,000
    steps of a tiny model that gives another base (the demo's base scored 21.2% greedy on one
    machine of this project's pool and 37.6% on another, from the same code)."""
    import importlib.metadata

    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "absent"

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        **{name: version(name) for name in ("torch", "transformers", "sentencepiece", "numpy")},
    }


def _lr_at(step: int, cfg: PretrainSettings) -> float:
    """Linear warm-up then cosine decay to ``min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def pretrain(
    settings: BaseSettings,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase, dict[str, Any]]:
    """Train the tokenizer and pretrain a fresh model on the synthetic corpus (no caching).

    Returns the model (eval mode), the tokenizer and metrics (wall time, losses).
    """
    cfg = settings.pretrain
    torch.set_num_threads(settings.num_threads)
    seed_everything(cfg.seed)
    t0 = time.perf_counter()
    tokenizer = train_char_tokenizer(tokenizer_training_texts(settings.task, seed=cfg.seed))
    corpus = build_pretrain_corpus(
        cfg.steps * cfg.batch_size, cfg.seed, settings.task, settings.corpus
    )
    data = _encode_corpus(
        tokenizer, [e.prompt for e in corpus], [e.completion for e in corpus], cfg.loss_on_prompt
    )
    model = build_model(settings.model, tokenizer)
    n_params = count_parameters(model)
    logger.info(
        "pretraining base: %d params, %d steps x %d examples, %d threads",
        n_params,
        cfg.steps,
        cfg.batch_size,
        settings.num_threads,
    )
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98)
    )
    model.train()
    losses: list[float] = []
    bar = tqdm(
        range(cfg.steps), desc="pretrain base", disable=not settings.progress, mininterval=1.0
    )
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        batch = _collate(
            data[step * cfg.batch_size : (step + 1) * cfg.batch_size], tokenizer.pad_token_id
        )
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
    model.eval()
    wall = time.perf_counter() - t0
    tail = losses[-max(1, cfg.steps // 10) :]
    metrics = {
        "pretrain_wall_s": round(wall, 2),
        "num_parameters": n_params,
        "final_loss": float(np.mean(tail)),
        "num_threads": settings.num_threads,
        "environment": machine_environment(),
    }
    logger.info("pretrained base in %.1fs, final loss %.4f", wall, metrics["final_loss"])
    return model, tokenizer, metrics


def _save_atomically(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    settings: BaseSettings,
    metrics: dict[str, Any],
    dest: Path,
) -> Path:
    """Write model, tokenizer and settings to a temp dir, then rename it to ``dest``.

    If another process finished first, its copy wins and ours is discarded.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        meta = {"settings": settings.key_dict(), "metrics": metrics}
        (tmp / _SETTINGS_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        try:
            os.replace(tmp, dest)
        except OSError:
            if not (dest / _SETTINGS_FILE).exists():
                raise
            logger.info("another process cached %s first; using it", dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def load_base(path: str | os.PathLike[str]) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """Load a saved base model (eval mode, float32) and its tokenizer."""
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def read_base_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Settings and pretraining metrics saved next to a cached base model."""
    return json.loads((Path(path) / _SETTINGS_FILE).read_text())


def load_or_pretrain_base(
    settings: BaseSettings | None = None, force: bool = False
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase, Path]:
    """The cached base model for ``settings``, pretraining and caching it first if needed.

    ``force`` retrains and overwrites the cached copy.
    """
    settings = settings or BaseSettings()
    torch.set_num_threads(settings.num_threads)
    dest = base_model_dir(settings)
    if force and dest.exists():
        shutil.rmtree(dest)
    if (dest / _SETTINGS_FILE).exists():
        logger.info("loading cached base model from %s", dest)
        model, tokenizer = load_base(dest)
        return model, tokenizer, dest
    model, tokenizer, metrics = pretrain(settings)
    _save_atomically(model, tokenizer, settings, metrics, dest)
    logger.info("cached base model at %s", dest)
    model, tokenizer = load_base(dest)  # reload so callers always get the same object kind
    return model, tokenizer, dest

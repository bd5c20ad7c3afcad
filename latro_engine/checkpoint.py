"""Crash-safe checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a directory ``checkpoint-<step>/`` holding the model in ``save_pretrained``
format (safetensors; adapters only for LoRA), the tokenizer, ``optim.pt`` (optimizer and
scheduler state), ``rng.pt`` (torch, CUDA, Python and NumPy generators) and
``trainer_state.json`` (step, data position, config). It is written into a temporary
directory, flushed to disk, then renamed into place: a crash leaves either the previous
complete checkpoint or the new one, never a half-written one. ``latest`` names the newest.
State files load with ``torch.load(weights_only=True)``, which cannot run code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
LATEST_FILE = "latest"
BEST_FILE = "best"  # names the checkpoint of the best in-training evaluation (keep_best)
# A step's checkpoint moved aside while a new one of the same step takes its name: it counts
# as that step's checkpoint until the new one is in place (a crash between the two renames).
REPLACED = ".replaced-"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or unsafe to load."""


def _not_a_misfit() -> tuple[type[BaseException], ...]:
    """Errors of loading that say nothing about the checkpoint: the device's memory, the
    process group's communication."""
    kinds: list[type[BaseException]] = [CheckpointError, torch.cuda.OutOfMemoryError]
    dist_error = getattr(torch.distributed, "DistError", None)  # (torch builds without it)
    if dist_error is not None:
        kinds.append(dist_error)
    return tuple(kinds)


def _sharded_misfit() -> tuple[type[BaseException], ...]:
    """torch.distributed.checkpoint's error for a sharded load that does not fit (a
    BaseException, which no `except Exception` sees)."""
    try:
        from torch.distributed.checkpoint.api import CheckpointException
    except ImportError:  # (torch builds without distributed)
        return ()
    return (CheckpointException,)


@contextlib.contextmanager
def must_fit(path: Path, what: str):
    """Loading ``what`` from checkpoint ``path`` into live objects: torch's errors for state
    that does not fit them (other shapes: another model, another set of trainable parameters)
    become a CheckpointError that says so."""
    try:
        yield
    except _not_a_misfit():
        raise
    except (RuntimeError, ValueError, KeyError, *_sharded_misfit()) as error:
        failures = getattr(error, "failures", None)  # a sharded load's: {rank: (error, trace)}
        if isinstance(failures, dict):
            causes = [f"rank {rank}: {pair[0]!r}" for rank, pair in failures.items()]
        else:
            causes = str(error).strip().splitlines()[:3]
        raise CheckpointError(
            f"{path}: the saved {what} does not fit ({type(error).__name__}: "
            f"{' '.join(causes)[:500]}); resume with the model and settings of the run "
            "that wrote it, or choose another output_dir"
        ) from error


# ----------------------------------------------------------------------------- file helpers
def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(root))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Writes a file by temp + rename, so readers never see a partial file (UTF-8; the file
    gets the umask's permissions, as any file the process creates)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


# ----------------------------------------------------------------------------- RNG state
def rng_state() -> dict[str, Any]:
    """All generator states as tensors and plain Python values (weights_only-loadable)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [
            np_name,
            torch.from_numpy(np_keys.astype(np.int64)),
            int(np_pos),
            int(np_has_gauss),
            float(np_gauss),
        ],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, gauss_value = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss_value))
    if "cuda" in state and torch.cuda.is_available():
        # One state per device that saved it; a resume that sees fewer devices (one GPU per
        # rank under torchrun or SLURM) restores those it has.
        for device, device_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, device)


# ----------------------------------------------------------------------------- save / find
def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"{PREFIX}{step}"


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    model: torch.nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    trainer_state: dict[str, Any],
    keep: int = 2,
    best_step: int | None = None,
    model_state_dict: dict[str, torch.Tensor] | None = None,
    staging_dir: Path | None = None,
) -> Path:
    """Writes checkpoint-<step> atomically, points ``latest`` at it, prunes older ones but the
    ``keep`` newest and, with ``best_step``, that step's (which ``best`` then names).

    ``model_state_dict`` replaces ``model.state_dict()`` (a gathered FSDP2 model);
    ``staging_dir`` is a temporary directory other processes already wrote into (sharded
    state, which the optimizer then is part of: pass ``optimizer=None``).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(output_dir, step)
    tmp = staging_dir or output_dir / f".tmp-{PREFIX}{step}-{os.getpid()}"
    if staging_dir is None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    model.save_pretrained(tmp / "model", safe_serialization=True, state_dict=model_state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp / "model")
    optim = {"scheduler": scheduler.state_dict()}
    if optimizer is not None:
        optim["optimizer"] = optimizer.state_dict()
    torch.save(optim, tmp / "optim.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / STATE_FILE).write_text(
        json.dumps({**trainer_state, "step": step}, indent=1, sort_keys=True)
    )
    _fsync_tree(tmp)
    replaced = None
    if final.exists():  # a checkpoint of the same step from an earlier, interrupted run
        replaced = output_dir / f"{REPLACED}{PREFIX}{step}-{os.getpid()}"
        shutil.rmtree(replaced, ignore_errors=True)  # a crashed writer's, with a reused pid
        os.replace(final, replaced)
    os.replace(tmp, final)
    _fsync_dir(output_dir)
    if replaced is not None:  # deleted only once the new copy is in place
        _delete(replaced)
    write_text_atomic(output_dir / LATEST_FILE, final.name + "\n")
    protect = {final}
    if best_step is not None:
        best = checkpoint_dir(output_dir, best_step)
        write_text_atomic(output_dir / BEST_FILE, best.name + "\n")
        protect.add(best)
    _prune(output_dir, keep, protect=protect)
    logger.info("saved %s", final)
    return final


def is_complete(path: Path) -> bool:
    """Whether ``path`` holds a whole checkpoint (its state files, which make one complete)."""
    return (
        (path / STATE_FILE).is_file()
        and (path / "optim.pt").is_file()
        and (path / "rng.pt").is_file()
    )


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first: ``checkpoint-N``, or for a step without one the copy
    a re-save of that step moved aside before a crash kept the new one from its place."""
    found: dict[int, Path] = {}
    replaced: dict[int, Path] = {}
    root = Path(output_dir)
    if not root.is_dir():
        return []
    for path in root.iterdir():
        final = re.fullmatch(rf"{PREFIX}(\d+)", path.name)
        aside = re.fullmatch(rf"{re.escape(REPLACED)}{PREFIX}(\d+)-\d+", path.name)
        if (final or aside) and path.is_dir() and is_complete(path):
            (found if final else replaced)[int((final or aside).group(1))] = path
    return sorted({**replaced, **found}.items())


def best_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint of the best in-training evaluation (a run with ``keep_best``), or None."""
    pointer = Path(output_dir) / BEST_FILE
    if not pointer.is_file():
        return None
    path = Path(output_dir) / pointer.read_text().strip()
    return path if is_complete(path) else None


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (the ``latest`` pointer is a hint, the scan decides: a
    run's steps only grow, and a fresh run refuses a directory that holds checkpoints)."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1][1] if checkpoints else None


def _delete(path: Path) -> None:
    """Renamed out of sight first: a crash during the deletion must not leave a half-deleted
    directory that still looks like a checkpoint."""
    trash = path.with_name(f".trash-{path.name.lstrip('.')}-{os.getpid()}")
    shutil.rmtree(trash, ignore_errors=True)  # a crashed writer's, with a reused pid
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _prune(output_dir: Path, keep: int, protect: set[Path]) -> None:
    for pattern in (f".tmp-{PREFIX}*", f".trash-{PREFIX}*", f".trash-{REPLACED[1:]}*"):
        for root in output_dir.glob(pattern):
            if root not in protect:
                shutil.rmtree(root, ignore_errors=True)  # left by crashed writers
    for stale in output_dir.glob(f".{LATEST_FILE}.tmp-*"):
        stale.unlink(missing_ok=True)
    kept = list_checkpoints(output_dir)
    for aside in output_dir.glob(f"{REPLACED}{PREFIX}*"):
        if aside not in (path for _, path in kept):  # its step's new copy is in place
            _delete(aside)
    if keep <= 0:
        return
    for _, path in kept[:-keep]:
        if path not in protect:
            _delete(path)


# ----------------------------------------------------------------------------- load
def safe_torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle payloads, foreign classes, truncated files
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain tensor/state file ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}). Checkpoint state files are loaded "
            "with weights_only=True so that they cannot run code."
        ) from error


def load_model_weights(model: torch.nn.Module, model_dir: Path) -> None:
    """Loads safetensors weights saved by save_pretrained into ``model`` in place."""
    from safetensors.torch import load_file

    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        files = sorted(model_dir.glob("adapter_model*.safetensors"))
        if not files:
            raise CheckpointError(f"{model_dir}: no adapter_model.safetensors")
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(f))
        with must_fit(model_dir, "LoRA adapters"):
            result = set_peft_model_state_dict(model, state)
        # Adapters saved for other modules (another lora_target_modules) would load nothing.
        unexpected = list(getattr(result, "unexpected_keys", []))
        missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
        if unexpected or missing:
            raise CheckpointError(
                f"{model_dir}: the saved LoRA adapters do not fit the model (unexpected: "
                f"{unexpected[:3]}, missing: {missing[:3]}); same lora_target_modules / "
                "lora_rank as the run that saved them?"
            )
        return
    weights = read_model_weights(model_dir)
    with must_fit(model_dir, "model"):
        missing, unexpected = model.load_state_dict(weights, strict=False)
    check_weights_fit(model, model_dir, missing, unexpected)


def read_model_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """The safetensors weights of a (non-LoRA) ``save_pretrained`` directory."""
    from safetensors.torch import load_file

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"{model_dir}: no safetensors weights (pickled weights are not loaded)"
        )
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    return state


def check_weights_fit(model: torch.nn.Module, model_dir: Path, missing, unexpected) -> None:
    """Raises unless the only missing weights are tied ones (saved once)."""
    # Tied parameters (e.g. lm_head = embed_tokens) are saved once.
    all_names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    tied = all_names - {name for name, _ in model.named_parameters()}
    missing = [m for m in missing if m not in tied and m in all_names]
    if missing or unexpected:
        raise CheckpointError(
            f"{model_dir}: weights do not fit the model (missing {missing[:5]}, "
            f"unexpected {list(unexpected)[:5]})"
        )


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    """The trainer state a checkpoint was saved with (step, data position, trainer, config)."""
    file = Path(path) / STATE_FILE
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{file}: unreadable or not valid JSON ({error})") from error


def load_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restores a checkpoint into live objects; returns the trainer state (step, data position).

    ``model=None`` / ``optimizer=None`` leave those to the caller (sharded checkpoints)."""
    path = Path(path)
    if not is_complete(path):
        raise CheckpointError(f"{path} is not a complete checkpoint")
    optim_state = safe_torch_load(path / "optim.pt")
    rng = safe_torch_load(path / "rng.pt")
    state = read_trainer_state(path)
    if model is not None:
        load_model_weights(model, path / "model")
    if optimizer is not None:
        with must_fit(path, "optimizer state"):
            optimizer.load_state_dict(optim_state["optimizer"])
    if scheduler is not None:
        with must_fit(path, "learning-rate schedule"):
            scheduler.load_state_dict(optim_state["scheduler"])
    if restore_rng:
        set_rng_state(rng)
    return state

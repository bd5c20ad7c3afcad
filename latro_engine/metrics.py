"""Training metrics: JSON lines per step, optional TensorBoard, and a PNG of the curves."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from latro_engine.checkpoint import write_text_atomic

logger = logging.getLogger(__name__)

DEFAULT_PLOT_KEYS = (
    "reward_mean",
    "answer_logp_mean",
    "kl_mean",
    "rationale_length_mean",
    "finished_frac",
    "loss",
    "eval_greedy_accuracy",
    "lr",
)


class MetricsLog:
    """Appends one JSON object per record to ``path``; mirrors scalars to TensorBoard.

    Resuming truncates records newer than the checkpoint's step, so the file of a resumed run
    equals the file of an uninterrupted one.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        tensorboard_dir: str | Path | None = None,
        resume_step: int | None = None,
    ):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            # Temp file + rename: a crash while resuming must not lose the kept records.
            for stale in self.path.parent.glob(f".{self.path.name}.tmp-*"):
                stale.unlink(missing_ok=True)  # left by an earlier crash right here
            write_text_atomic(
                self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept)
            )
        self._writer = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # The events after the checkpoint's step are dropped too, as from the JSONL:
                # the steps a resumed run repeats would otherwise appear twice.
                purge = None if resume_step is None else resume_step + 1
                self._writer = SummaryWriter(str(tensorboard_dir), purge_step=purge)
            except ImportError:
                logger.warning("tensorboard is not installed; metrics go to %s only", self.path)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        if self._writer is not None:
            step = int(record.get("step", 0))
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
                    self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics file; a torn last line (crash mid-write) is dropped, and so is any
    line that is not a JSON object (a file damaged from outside must not stop a resume)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def plot_curves(
    records: Sequence[dict[str, Any]],
    path: str | Path,
    *,
    keys: Sequence[str] = DEFAULT_PLOT_KEYS,
    title: str = "LaTRO training",
) -> Path | None:
    """Saves a grid of line plots, one per metric present in the records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [k for k in keys if any(isinstance(r.get(k), (int, float)) for r in records)]
    if not present:
        return None
    cols = min(4, len(present))
    rows = math.ceil(len(present) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, key in zip(axes.flat, present):
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="." if len(xs) < 30 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

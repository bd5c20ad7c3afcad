"""Crash safety: training killed with SIGKILL at random moments (mid-step, mid-checkpoint-write,
mid-prune, mid-metrics-line) and started again, until it finishes.

After every kill: each visible ``checkpoint-N`` directory is complete and loads (weights,
optimizer, RNG and trainer state, with ``weights_only`` loading), the ``latest`` pointer names
one of them, and the next start continues from the newest of them. At the end the metrics and
the final weights equal those of an uninterrupted run exactly (CPU, deterministic mode).
The tiny run and its kills run in subprocesses (crash_worker.py); a fixed seed picks the kills.
"""

from __future__ import annotations

import math
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import tiny
import torch
from safetensors.torch import load_file

from latro_engine import checkpoint as ckpt
from latro_engine.metrics import read_metrics
from latro_engine.trainer import LatroTrainer, TrainingError

WORKER = Path(__file__).with_name("crash_worker.py")
STEPS = 20
TIMING = {"rollout_s", "score_s", "train_s", "samples_per_s", "tokens_per_s"}
# Each checkpoint-writing point once, at a drawn occurrence, and kills at random times.
HOOKS = ["state_file", "publish", "latest", "prune", "metrics"]
RANDOM_KILLS = 2


class _Worker:
    """crash_worker.py serving runs: each a forked child, killed on request."""

    def __init__(self, log):
        env = {
            **os.environ,
            "LATRO_BACKEND": "auto",
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), str(STEPS)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=env,
            cwd=WORKER.parent,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        assert self._next() == "READY"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put("EOF")

    def _next(self, timeout: float = 120) -> str:
        line = self.lines.get(timeout=timeout)
        assert line != "EOF", "the worker died"
        return line

    def run(self, run_dir: Path, *, crash_at: str | None = None, kill_after: float | None = None):
        """One run (SIGKILLed ``kill_after`` seconds into training); returns its exit code and
        the steps it began."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{run_dir} {crash_at or ''}\n")
        self.proc.stdin.flush()
        assert self._next().startswith("CHILD ")
        began: list[int] = []
        deadline = None
        while True:
            try:
                line = self._next(timeout=0.01 if deadline else 120)
            except queue.Empty:
                line = ""
            if deadline and time.monotonic() >= deadline:
                self.proc.stdin.write("KILL\n")  # the worker kills the child if still running
                self.proc.stdin.flush()
                deadline = None
                kill_after = None
            if line == "TRAINING" and kill_after is not None:
                deadline = time.monotonic() + kill_after
            elif line.startswith("STEP "):
                began.append(int(line.split()[1]))
            elif line.startswith("EXIT "):
                return int(line.split()[1]), began

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _check_visible_checkpoints(run_dir: Path) -> int:
    """Every checkpoint-N in sight is complete and loadable; returns the newest step (0: none)."""
    out = run_dir / "run"
    names = sorted(p.name for p in out.glob(f"{ckpt.PREFIX}*")) if out.is_dir() else []
    steps = []
    for name in names:
        path = out / name
        step = int(name[len(ckpt.PREFIX) :])
        model = tiny.model(seed=99)
        optimizer = torch.optim.AdamW(model.parameters())
        state = ckpt.load_checkpoint(path, model=model, optimizer=optimizer, restore_rng=False)
        assert state["step"] == step, (name, state["step"])
        steps.append(step)
    if steps and (out / ckpt.LATEST_FILE).exists():
        pointed = (out / ckpt.LATEST_FILE).read_text().strip()
        assert pointed in names, f"latest names {pointed!r}, not one of {names}"
    assert [p for p, _ in ckpt.list_checkpoints(out)] == sorted(steps)
    return max(steps, default=0)


def _metrics(run_dir: Path) -> list[dict]:
    records = read_metrics(run_dir / "run" / "metrics.jsonl")
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


@pytest.fixture(autouse=True)
def _nondeterministic_after_each_test():
    yield
    torch.use_deterministic_algorithms(False)


def test_sigkill_at_random_moments_then_resume_matches_an_uninterrupted_run(tmp_path):
    rng = random.Random(20261125)
    with open(tmp_path / "worker.log", "w") as log:
        worker = _Worker(log)
        try:
            code, began = worker.run(tmp_path / "reference")
            assert code == 0 and began == list(range(1, STEPS + 1)), (code, began)

            plan: list[dict] = [{"crash_at": f"{hook}:{rng.randint(1, 2)}"} for hook in HOOKS]
            plan += [{"kill_after": rng.uniform(0.0, 0.8)} for _ in range(RANDOM_KILLS)]
            rng.shuffle(plan)
            crashed = tmp_path / "crashed"
            newest, kills = 0, 0
            for attempt in [*plan, {}]:
                code, began = worker.run(crashed, **attempt)
                if began:  # it continued from the newest complete checkpoint
                    assert began[0] == newest + 1, (attempt, began, newest)
                if code != 0:
                    assert code == -signal.SIGKILL, (
                        attempt,
                        code,
                        (tmp_path / "worker.log").read_text()[-3000:],
                    )
                    kills += 1
                newest = _check_visible_checkpoints(crashed)
                if code == 0:
                    assert newest == STEPS
                    break
        finally:
            worker.close()
    assert kills >= len(HOOKS), f"only {kills} of the planned kills landed"
    assert newest == STEPS
    leftovers = [p.name for p in (crashed / "run").iterdir() if p.name.startswith(".")]
    assert leftovers == [], f"crashed writers' temp files were not cleaned up: {leftovers}"
    assert _metrics(crashed) == _metrics(tmp_path / "reference")
    final = f"{ckpt.PREFIX}{STEPS}/model/model.safetensors"
    expected = load_file(tmp_path / "reference" / "run" / final)
    got = load_file(crashed / "run" / final)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


# ----------------------------------------------------------------------------- non-finite steps
def _poison_gradients(model: torch.nn.Module, bad_calls: set[int]) -> None:
    """Makes the gradient NaN in the backward passes whose (1-based) number is in bad_calls."""
    calls = {"n": 0}
    param = next(p for p in model.parameters() if p.requires_grad)

    def hook(grad: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return grad * math.nan if calls["n"] in bad_calls else grad

    param.register_hook(hook)


def test_non_finite_gradients_skip_the_step_and_training_goes_on(tmp_path, caplog):
    # micro_batch_size 8 = the whole rollout batch: one backward per step.
    config = tiny.config(tmp_path, steps=4, micro_batch_size=8, save_every=0)
    trainer = LatroTrainer(tiny.model(), tiny.tokenizer(), tiny.examples(8), config)
    _poison_gradients(trainer.model, bad_calls={2, 3})
    poisoned = next(n for n, p in trainer.model.named_parameters() if p.requires_grad)
    snapshots = []
    step = trainer.train_step

    def recording_step():
        snapshots.append([p.detach().clone() for p in trainer.model.parameters()])
        return step()

    trainer.train_step = recording_step
    records = trainer.train()
    assert [r["update_skipped"] for r in records] == [False, True, True, False]
    assert [r["skipped_steps"] for r in records] == [0, 1, 2, 2]
    assert not math.isfinite(records[1]["grad_norm"])
    after_step_2 = snapshots[2]  # the weights going into step 3: step 2 changed nothing
    assert all(torch.equal(a, b) for a, b in zip(snapshots[1], after_step_2))
    assert any(not torch.equal(a, b) for a, b in zip(snapshots[0], snapshots[1]))
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "checkpoint-4"
    # The warning names the parameter whose gradient went bad, and (torch 2.6+, where the norm
    # and the scaling are separate) only it: clipping by a non-finite norm makes every one NaN.
    assert f"non-finite gradients on this rank: {poisoned}" in caplog.text
    if hasattr(torch.nn.utils, "get_total_norm"):
        assert f"non-finite gradients on this rank: {poisoned}\n" in caplog.text + "\n"


def test_non_finite_loss_skips_the_step(tmp_path, monkeypatch):
    from latro_engine import trainer as trainer_module

    real_loss = trainer_module.latro_loss
    calls = {"n": 0}

    def inf_loss_on_second_call(*args, **kwargs):
        loss, stats = real_loss(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:  # +inf whose gradient is finite (that of a constant: 0)
            return loss + math.inf, {**stats, "loss": math.inf}
        return loss, stats

    monkeypatch.setattr(trainer_module, "latro_loss", inf_loss_on_second_call)
    config = tiny.config(tmp_path, steps=3, micro_batch_size=8, save_every=0)
    records = LatroTrainer(tiny.model(), tiny.tokenizer(), tiny.examples(8), config).train()
    assert [r["update_skipped"] for r in records] == [False, True, False]
    assert math.isfinite(records[1]["grad_norm"])  # the gradient alone would have passed


def test_too_many_non_finite_steps_in_a_row_stop_with_a_checkpoint(tmp_path):
    config = tiny.config(tmp_path, steps=6, micro_batch_size=8, max_nonfinite_steps=2)
    trainer = LatroTrainer(tiny.model(), tiny.tokenizer(), tiny.examples(8), config)
    _poison_gradients(trainer.model, bad_calls={2, 3, 4, 5, 6})
    with pytest.raises(TrainingError, match=r"2 non-finite steps in a row .* at step 3") as info:
        trainer.train()
    assert "checkpoint-3" in str(info.value) and "max_nonfinite_steps" in str(info.value)
    latest = ckpt.latest_checkpoint(tmp_path / "run")
    assert latest.name == "checkpoint-3"
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["update_skipped"] for r in records] == [False, True, True]
    state = ckpt.load_checkpoint(latest, model=tiny.model(), restore_rng=False)
    assert state["skipped_steps"] == 2 and state["nonfinite_in_a_row"] == 2
    # Resumed unchanged, one more bad step stops it again, counting the steps before.
    resumed = LatroTrainer(tiny.model(), tiny.tokenizer(), tiny.examples(8), config)
    _poison_gradients(resumed.model, bad_calls={1})
    with pytest.raises(TrainingError, match=r"^3 non-finite steps in a row \(.*no update since "
                       r"step 1\) at step 4"):
        resumed.train()

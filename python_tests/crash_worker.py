"""A tiny deterministic LaTRO run in its own process, for test_crash_resume.py.

    python crash_worker.py STEPS

imports everything once, then serves runs, one per line on stdin: ``RUN_DIR [CRASH_AT]``.
Each run is a forked child process (no import cost per run) that trains the tiny model of
tiny.py on the CPU for STEPS steps with a checkpoint after every step, resuming from
RUN_DIR/run when it holds one; a line ``KILL`` sends the running child SIGKILL. On stdout: ``CHILD <pid>`` when the child starts, ``TRAINING``
when its training loop begins, ``STEP <n>`` before each step, and ``EXIT <code>`` when it is
gone (``-9`` after SIGKILL).

CRASH_AT = "POINT:N" makes the child SIGKILL itself the N-th time it reaches POINT:

    state_file  half-way through writing a state file (optim.pt, rng.pt) of a new checkpoint
    publish     with the new checkpoint complete in its temp directory, before its rename
    latest      before the ``latest`` pointer is replaced
    prune       half-way through deleting an old checkpoint
    metrics     half-way through writing a metrics line

The hooks live here, not in the library: they wrap, in the child only, the functions the
checkpoint and metrics code calls.
"""

from __future__ import annotations

import io
import os
import select
import shutil
import signal
import sys
import traceback
from pathlib import Path

import tiny
import torch
import transformers

from latro_engine import checkpoint as ckpt
from latro_engine import metrics
from latro_engine.trainer import LatroTrainer

DATA_SIZE = 16


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install_crash_hook(point: str, count: int) -> None:
    seen = {"n": 0}

    def reached(name: str) -> bool:
        if name != point:
            return False
        seen["n"] += 1
        return seen["n"] == count

    real_replace, real_rmtree, real_save = os.replace, shutil.rmtree, torch.save
    real_write = metrics.MetricsLog.write

    def replace(src, dst, *args, **kwargs):
        src_name, dst_name = Path(src).name, Path(dst).name
        if src_name.startswith(f".tmp-{ckpt.PREFIX}") and reached("publish"):
            _die()
        if dst_name == ckpt.LATEST_FILE and reached("latest"):
            _die()
        return real_replace(src, dst, *args, **kwargs)

    def rmtree(path, *args, **kwargs):
        path = Path(path)
        if path.name.startswith(".trash-") or path.name.startswith(ckpt.PREFIX):
            if reached("prune"):
                files = sorted(p for p in path.rglob("*") if p.is_file())
                for f in files[: len(files) // 2]:
                    f.unlink()
                _die()
        return real_rmtree(path, *args, **kwargs)

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and reached("state_file"):
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            with open(f, "wb") as handle:
                handle.write(data[: len(data) // 2])
                handle.flush()
                os.fsync(handle.fileno())
            _die()
        return real_save(obj, f, *args, **kwargs)

    def write(self, record):
        if reached("metrics"):
            import json

            line = json.dumps(record, sort_keys=True)
            with open(self.path, "a") as handle:
                handle.write(line[: len(line) // 2])
            _die()
        return real_write(self, record)

    os.replace = replace
    shutil.rmtree = rmtree
    torch.save = save
    metrics.MetricsLog.write = write


def train(run_dir: Path, steps: int, crash_at: str | None) -> None:
    if crash_at:
        point, count = crash_at.split(":")
        install_crash_hook(point, int(count))
    config = tiny.config(run_dir, steps=steps, save_every=1, keep_checkpoints=2, deterministic=True)
    trainer = LatroTrainer(tiny.model(), tiny.tokenizer(), tiny.examples(DATA_SIZE), config)
    step = trainer.train_step

    def announced_step():
        print(f"STEP {trainer.step + 1}", flush=True)  # the step about to run
        return step()

    trainer.train_step = announced_step
    print("TRAINING", flush=True)
    trainer.train()


def serve(steps: int) -> None:
    tiny.tokenizer()  # trained once, inherited by every child
    transformers.LlamaForCausalLM  # noqa: B018  (the lazy import of the model code, once)
    print("READY", flush=True)
    while line := sys.stdin.readline():
        if not line.strip() or line.strip() == "KILL":  # a KILL that came after its run ended
            continue
        run_dir, *crash_at = line.split()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: train, then leave without running the parent's clean-up
            code = 0
            try:
                train(Path(run_dir), steps, crash_at[0] if crash_at else None)
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        print(f"CHILD {pid}", flush=True)
        while True:  # wait for the child; a "KILL" line meanwhile sends it SIGKILL
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if (
                select.select([sys.stdin], [], [], 0.01)[0]
                and sys.stdin.readline().strip() == "KILL"
            ):
                os.kill(pid, signal.SIGKILL)  # not yet reaped: the pid is still the child's
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(f"EXIT {code}", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no Rust thread pool before fork
    serve(int(sys.argv[1]))

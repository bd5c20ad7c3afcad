"""Checkpoints: round trip, atomic writes, newest-complete selection, and safe loading."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import tiny
import torch

from latro_engine import checkpoint as ckpt


def _parts(lr=1e-2):
    model = tiny.model(seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / 10)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    sched.step()
    return model, opt, sched


def test_round_trip_restores_everything(tmp_path):
    model, opt, sched = _parts()
    torch.manual_seed(123)
    path = ckpt.save_checkpoint(
        tmp_path,
        7,
        model=model,
        tokenizer=tiny.tokenizer(),
        optimizer=opt,
        scheduler=sched,
        trainer_state={"epoch": 1, "index": 5},
    )
    expected_draw = torch.rand(3)
    fresh, fresh_opt, fresh_sched = tiny.model(seed=2), None, None
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    fresh_sched = torch.optim.lr_scheduler.LambdaLR(fresh_opt, lambda s: 1.0 - s / 10)
    state = ckpt.load_checkpoint(path, model=fresh, optimizer=fresh_opt, scheduler=fresh_sched)
    assert state["step"] == 7 and state["epoch"] == 1 and state["index"] == 5
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert fresh_sched.state_dict()["last_epoch"] == 1
    assert torch.equal(
        fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"]
    )
    assert torch.equal(torch.rand(3), expected_draw)  # the RNG continues where it was saved
    assert (path / "model" / "model.safetensors").exists()
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-7"


def test_newest_complete_checkpoint_wins_and_old_ones_are_pruned(tmp_path):
    model, opt, sched = _parts()
    for step in (1, 2, 3):
        ckpt.save_checkpoint(
            tmp_path,
            step,
            model=model,
            tokenizer=None,
            optimizer=opt,
            scheduler=sched,
            trainer_state={},
            keep=2,
        )
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 3]
    # A crash mid-write leaves a temp dir and maybe a half checkpoint dir: both ignored.
    (tmp_path / ".tmp-checkpoint-4-999").mkdir()
    half = tmp_path / "checkpoint-5"
    (half / "model").mkdir(parents=True)
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-3"


class _Payload:
    """Unpickling this would create a file: what a malicious state file could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_refuses_a_state_file_that_would_run_code(tmp_path):
    model, opt, sched = _parts()
    path = ckpt.save_checkpoint(
        tmp_path, 1, model=model, tokenizer=None, optimizer=opt, scheduler=sched, trainer_state={}
    )
    marker = tmp_path / "pwned"
    with open(path / "optim.pt", "wb") as handle:
        pickle.dump({"optimizer": _Payload(str(marker))}, handle)
    with pytest.raises(ckpt.CheckpointError, match="refusing to load"):
        ckpt.load_checkpoint(path, model=tiny.model(), optimizer=opt, scheduler=sched)
    assert not marker.exists()


def test_weights_that_do_not_fit_are_rejected(tmp_path):
    model, opt, sched = _parts()
    path = ckpt.save_checkpoint(
        tmp_path, 1, model=model, tokenizer=None, optimizer=opt, scheduler=sched, trainer_state={}
    )
    wider = tiny.model().config
    wider.hidden_size, wider.intermediate_size = 48, 96  # another model of the family
    with pytest.raises(ckpt.CheckpointError, match="the saved model does not fit"):
        ckpt.load_checkpoint(path, model=type(model)(wider))
    other_params = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])  # another optimizer
    with pytest.raises(ckpt.CheckpointError, match="the saved optimizer state does not fit"):
        ckpt.load_checkpoint(path, model=tiny.model(), optimizer=other_params)
    os.remove(path / "model" / "model.safetensors")
    with pytest.raises(ckpt.CheckpointError, match="no safetensors"):
        ckpt.load_checkpoint(path, model=tiny.model())


def test_resaving_a_step_survives_a_crashed_writers_trash(tmp_path):
    """A trash directory left by a crashed writer whose pid this process now has does not
    block re-saving the same step."""
    model, opt, sched = _parts()
    kw = dict(model=model, tokenizer=None, optimizer=opt, scheduler=sched, trainer_state={})
    ckpt.save_checkpoint(tmp_path, 3, **kw)
    leftover = tmp_path / f".trash-checkpoint-3-{os.getpid()}"
    (leftover / "model").mkdir(parents=True)
    (leftover / "model" / "half.bin").write_bytes(b"x")
    assert ckpt.save_checkpoint(tmp_path, 3, **kw) == tmp_path / "checkpoint-3"
    assert not leftover.exists()


def test_a_crash_while_resaving_a_step_keeps_its_old_copy(tmp_path, monkeypatch):
    """Re-saving step 3 moves the old copy aside, then renames the new one into place: a crash
    between the two renames leaves the old copy, which still counts as step 3's checkpoint and
    loads; the next save puts things in order."""
    model, opt, sched = _parts()
    kw = dict(model=model, tokenizer=None, optimizer=opt, scheduler=sched, keep=1)
    ckpt.save_checkpoint(tmp_path, 3, trainer_state={"copy": "old"}, **kw)
    real_replace = os.replace

    def crash_into_place(src, dst):
        if Path(dst).name == "checkpoint-3" and ".tmp-" in Path(src).name:
            raise OSError("power cut")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_into_place)
    with pytest.raises(OSError, match="power cut"):
        ckpt.save_checkpoint(tmp_path, 3, trainer_state={"copy": "new"}, **kw)
    monkeypatch.setattr(os, "replace", real_replace)
    assert not (tmp_path / "checkpoint-3").exists()
    (step, aside), = ckpt.list_checkpoints(tmp_path)
    assert step == 3 and aside.name.startswith(".replaced-checkpoint-3-")
    assert ckpt.latest_checkpoint(tmp_path) == aside
    assert ckpt.load_checkpoint(aside, model=tiny.model())["copy"] == "old"
    ckpt.save_checkpoint(tmp_path, 4, trainer_state={}, **kw)  # keep=1: step 4 alone stays
    assert sorted(p.name for p in tmp_path.iterdir() if "checkpoint" in p.name) == ["checkpoint-4"]


def test_cuda_rng_restores_the_devices_this_process_sees(monkeypatch):
    """A checkpoint saved with 8 visible GPUs resumes with one per rank: the states of the
    devices it has are restored, the others ignored (no IndexError)."""
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: restored.update({d: s}))
    state = ckpt.rng_state()
    state["cuda"] = [torch.full((4,), i, dtype=torch.uint8) for i in range(8)]
    ckpt.set_rng_state(state)
    assert list(restored) == [0] and torch.equal(restored[0], state["cuda"][0])


def test_a_resumed_metrics_log_drops_what_followed_the_checkpoint(tmp_path, monkeypatch):
    """The JSONL keeps the records up to the checkpoint's step (atomically rewritten), and the
    TensorBoard writer purges its events after that step, so repeated steps appear once."""
    import sys
    import types

    from latro_engine.metrics import MetricsLog, read_metrics

    writers = []

    class FakeWriter:  # torch.utils.tensorboard needs the tensorboard package
        def __init__(self, logdir, purge_step=None):
            writers.append((logdir, purge_step))

        def add_scalar(self, key, value, step):
            pass

    fake = types.SimpleNamespace(SummaryWriter=FakeWriter)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    path = tmp_path / "metrics.jsonl"
    first = MetricsLog(path, tensorboard_dir=tmp_path / "tb")
    for step in (1, 2, 3, 4):
        first.write({"step": step, "loss": float(step)})
    MetricsLog(path, tensorboard_dir=tmp_path / "tb", resume_step=2)
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    assert writers == [(str(tmp_path / "tb"), None), (str(tmp_path / "tb"), 3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temp file left


def test_the_best_step_is_kept_beside_the_newest(tmp_path):
    model, opt, sched = _parts()
    kw = dict(model=model, tokenizer=None, optimizer=opt, scheduler=sched, keep=1)
    assert ckpt.best_checkpoint(tmp_path) is None
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, trainer_state={}, best_step=min(step, 2), **kw)
    names = sorted(p.name for _, p in ckpt.list_checkpoints(tmp_path))
    assert names == ["checkpoint-2", "checkpoint-4"]
    assert ckpt.best_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    ckpt.save_checkpoint(tmp_path, 5, trainer_state={}, **kw)  # no best any more: pruned
    assert [p.name for _, p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-5"]
    assert ckpt.best_checkpoint(tmp_path) is None


def test_only_state_that_does_not_fit_is_reported_as_such(tmp_path):
    """must_fit names a misfit (torch's size mismatch, a sharded load's CheckpointException)
    as the checkpoint's, but lets an out-of-memory error or a process group's failure (the
    device or the network, not the checkpoint) and its own errors through."""
    from torch.distributed.checkpoint.api import CheckpointException

    with pytest.raises(ckpt.CheckpointError, match="the saved model does not fit"):
        with ckpt.must_fit(tmp_path, "model"):
            raise RuntimeError("size mismatch for lm_head.weight")
    with pytest.raises(ckpt.CheckpointError, match=r"the saved sharded state does not fit "
                       r"\(CheckpointException: rank 0: ValueError\('Size mismatch'\)\)"):
        with ckpt.must_fit(tmp_path, "sharded state"):
            raise CheckpointException("load", {0: (ValueError("Size mismatch"), None)})
    for error in (torch.cuda.OutOfMemoryError("CUDA out of memory"),
                  torch.distributed.DistBackendError("NCCL error")):
        with pytest.raises(type(error)):
            with ckpt.must_fit(tmp_path, "model"):
                raise error
    with pytest.raises(ckpt.CheckpointError, match="^no adapters$"):
        with ckpt.must_fit(tmp_path, "model"):
            raise ckpt.CheckpointError("no adapters")

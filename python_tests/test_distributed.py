"""Two gloo processes on CPU against one: DDP and FSDP2 reproduce a single process's losses and
updated weights for the same global batch and seeds, and checkpoints move between world sizes.

One ``torch.multiprocessing`` spawn runs every two-rank job (starting processes is the slow
part); the one-process runs happen in the test process itself.
"""

from __future__ import annotations

import datetime
import math
import shutil
from pathlib import Path

import pytest
import tiny
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from latro_engine import checkpoint as ckpt
from latro_engine import distributed
from latro_engine import trainer as trainer_module
from latro_engine.config import ConfigError
from latro_engine.metrics import read_metrics
from latro_engine.trainer import LatroTrainer, SFTTrainer

WORLD = 2
GLOBAL_PROMPTS = 4
STEPS = 3
# ddp: micro-batches of whole groups (rewards inside the gradient pass); fsdp: the two-pass
# path with the batch-mean penalty, whose rewards need scores gathered from every rank;
# groups-fsdp: whole groups under FSDP2, where only rank 0 would split its forwards by length
# (see _train): the ranks must agree, as each forward gathers every sharded layer.
RECIPES = {
    "ddp": {},
    "fsdp": {"micro_batch_size": 3, "penalty_mode": "batch_mean", "nonstop_penalty": 2.0},
    "groups-fsdp": {},
    "sft-ddp": {"micro_batch_size": 1},  # the SFT baseline: two micro-batches per rank
    # micro-batches by tokens: each rank cuts its rows by length, so the ranks may run
    # different numbers of micro-batches (DDP syncs once, in each rank's last backward)
    "tokens-ddp": {"micro_batch_size": 8, "micro_batch_tokens": 200},
}
COMPARED = (
    "loss", "pg_loss", "sft_loss", "reward_mean", "reward_std", "kl_mean", "answer_logp_mean",
    "rationale_length_mean", "rationale_length_max", "finished_frac", "grad_norm", "lr",
)


def _train(out: Path, world: int, recipe: str) -> None:
    config = tiny.config(
        out,
        prompts_per_step=GLOBAL_PROMPTS // world,
        steps=STEPS,
        save_every=2,
        keep_checkpoints=0,
        distributed=recipe.split("-")[-1] if world > 1 else "none",
        **RECIPES[recipe],
    )
    cls = SFTTrainer if recipe.startswith("sft") else LatroTrainer
    real = trainer_module.rows_per_forward
    if recipe == "groups-fsdp":  # rank 0 (and one process) splits every micro-batch, rank 1 none
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        trainer_module.rows_per_forward = lambda lengths: -(-len(lengths) // 4) if rank0 else None
    try:
        cls(tiny.model(), tiny.tokenizer(), tiny.examples(16), config).train()
    finally:
        trainer_module.rows_per_forward = real


def _ranks(rank: int, store: str, jobs: list[tuple[str, str]]) -> None:
    # A short timeout: ranks whose collectives do not line up fail the test, not hang CI.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        for out, mode in jobs:
            if mode == "node-local":  # each rank its own output_dir; only rank 0's holds one
                try:
                    _train(Path(out) / f"rank{rank}", WORLD, "ddp")
                except ckpt.CheckpointError as error:
                    (Path(out) / f"rank{rank}.error").write_text(str(error))
                continue
            _train(Path(out), WORLD, mode)
    finally:
        dist.destroy_process_group()


def _resume_dir(src: Path, dst: Path) -> Path:
    """A run directory holding only ``src``'s step-2 checkpoint."""
    (dst / "run").mkdir(parents=True)
    shutil.copytree(src / "run" / "checkpoint-2", dst / "run" / "checkpoint-2")
    return dst


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return ckpt.read_model_weights(out / "run" / f"checkpoint-{STEPS}" / "model")


def _assert_same_weights(got: Path, want: Path, what: str) -> None:
    a, b = _weights(got), _weights(want)
    assert a.keys() == b.keys(), what
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=f"{what}: {name}")


def _assert_same_metrics(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for key in (k for k in COMPARED if k in want):
        assert math.isclose(got[key], want[key], rel_tol=1e-4, abs_tol=1e-5), (what, key, got, want)


@pytest.fixture(autouse=True)
def _nondeterministic_after_each_test():
    yield
    torch.use_deterministic_algorithms(False)


def test_two_ranks_match_one_process_and_checkpoints_move_across_world_sizes(tmp_path):
    modes = ["ddp", "fsdp"]  # + checkpoints written by 1 and 2 processes, resumed on 2 and 1
    for recipe in RECIPES:  # the single-process references
        _train(tmp_path / recipe / "one", 1, recipe)
    for mode in modes:
        _resume_dir(tmp_path / mode / "one", tmp_path / mode / "one_to_two")
    jobs = [(str(tmp_path / r / "two"), r) for r in RECIPES]
    jobs += [(str(tmp_path / m / "one_to_two"), m) for m in modes]
    _resume_dir(tmp_path / "ddp" / "one", tmp_path / "node-local" / "rank0")
    (tmp_path / "node-local" / "rank1" / "run").mkdir(parents=True)
    jobs.append((str(tmp_path / "node-local"), "node-local"))
    mp.spawn(_ranks, args=(str(tmp_path / "store"), jobs), nprocs=WORLD, join=True)
    for mode in modes:
        _resume_dir(tmp_path / mode / "two", tmp_path / mode / "two_to_one")
        _train(tmp_path / mode / "two_to_one", 1, mode)

    for recipe in RECIPES:
        root = tmp_path / recipe
        one = read_metrics(root / "one" / "run" / "metrics.jsonl")
        two = read_metrics(root / "two" / "run" / "metrics.jsonl")
        assert [r["step"] for r in two] == [1, 2, 3], f"{recipe}: rank 0 alone writes the log"
        for a, b in zip(two, one):
            _assert_same_metrics(a, b, f"{recipe} step {b['step']}: 2 ranks vs 1 process")
        # the same global batch gives the same updated weights on any world size
        _assert_same_weights(root / "two", root / "one", f"{recipe}: 2 ranks vs 1 process")
    for mode in modes:  # a checkpoint continues on another world size as if never interrupted
        root = tmp_path / mode
        one = read_metrics(root / "one" / "run" / "metrics.jsonl")
        for resumed, what in (("one_to_two", "written by 1, resumed on 2"),
                              ("two_to_one", "written by 2, resumed on 1")):
            last = read_metrics(root / resumed / "run" / "metrics.jsonl")
            assert [r["step"] for r in last] == [STEPS], f"{mode} {what}"
            _assert_same_metrics(last[-1], one[-1], f"{mode} {what}")
            _assert_same_weights(root / resumed, root / "one", f"{mode} {what}")
    # Ranks that do not all see rank 0's checkpoint refuse together (none resumes alone).
    for rank in range(WORLD):
        error = (tmp_path / "node-local" / f"rank{rank}.error").read_text()
        assert "rank 0 resumes from checkpoint-2, which not every rank finds complete" in error
    # FSDP2 checkpoints hold DCP shards plus the full model; DDP ones are the usual kind
    assert (tmp_path / "fsdp" / "two" / "run" / "checkpoint-2" / "dcp").is_dir()
    assert not (tmp_path / "ddp" / "two" / "run" / "checkpoint-2" / "dcp").exists()


def test_a_distributed_mode_must_fit_the_launch(monkeypatch):
    with pytest.raises(ConfigError, match="distributed must be"):
        tiny.config(Path("unused"), distributed="deepspeed")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match="needs a launcher"):
        distributed.resolve_mode(tiny.config(Path("unused"), distributed="fsdp"))
    assert distributed.resolve_mode(tiny.config(Path("unused"))) == "none"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.resolve_mode(tiny.config(Path("unused"))) == "ddp"
    with pytest.raises(ConfigError, match="each would train alone"):
        distributed.resolve_mode(tiny.config(Path("unused"), distributed="none"))


def test_the_process_group_waits_distributed_timeout_minutes(monkeypatch):
    """The group the trainer starts (under torchrun) takes the config's timeout: rank 0 writes
    a whole DDP checkpoint while the others wait, which NCCL's 10-minute default can cut off."""
    started = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: started.update(kw))
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    config = tiny.config(Path("unused"), distributed_timeout_minutes=7.5)
    distributed.Distributed(config, torch.device("cpu"))
    assert started["timeout"] == datetime.timedelta(minutes=7.5)

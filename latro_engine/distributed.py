"""Multi-process training with PyTorch's own stack: DDP or FSDP2, launched by ``torchrun``.

``torchrun --nproc-per-node N -m latro_engine train ...`` (or the Python API under torchrun)
starts N processes; :class:`Distributed` is what the trainers need from them:

- **Data.** ``prompts_per_step`` is per process. Every rank walks the same global data order and
  takes its own contiguous slice of each global batch of ``prompts_per_step x world`` prompts;
  rollout rows are seeded by their *global* index, so N processes draw exactly the rationales
  one process would draw for the whole global batch.
- **Gradients.** The loss of a rank is a mean over its sequences, all ranks hold the same number
  of them, and DDP / FSDP2 average gradients over ranks: the global mean, as in one process.
  Gradients are synchronized once per step (``no_sync`` / ``set_requires_gradient_sync`` for
  the earlier micro-batches). Rewards that need the whole batch (``penalty_mode="batch_mean"``)
  are computed from scores gathered from every rank.
- **DDP** (``distributed: ddp``, the default under torchrun) keeps a full replica per rank and
  wraps the *scoring pass* (decoder body + chunked LM-head log-probs) in DDP, since that pass
  calls the model's parts directly rather than its ``forward``.
- **FSDP2** (``distributed: fsdp``) applies ``fully_shard`` to every decoder layer (the model's
  ``_no_split_modules``) and to the root, for the policy and the frozen reference alike.
  Scoring then goes through the model's ``forward`` (full logits of a micro-batch, never a
  float32 copy), and rollouts and evaluation run with the parameters gathered once
  (``unshard``): ranks stop decoding at different steps, so per-step collectives would hang.
- **Logs.** Metrics are reduced over ranks (means; sums for throughputs; maxima for maxima and
  phase times); only rank 0 writes metrics, config, plots and progress bars.
- **Checkpoints.** DDP and single-process runs: rank 0 writes the usual checkpoint (all ranks
  hold the same weights and optimizer state). FSDP2: every rank writes its shards of the model
  and optimizer with ``torch.distributed.checkpoint`` into ``checkpoint-N/dcp/``, and rank 0
  adds the full model in ``save_pretrained`` format (``model/``, for evaluation and export)
  and the small state files. Either kind resumes at any world size: DCP reshards on load (also
  into a single process), and a usual checkpoint is loaded as full state dicts and sharded.
- **RNG states.** All ranks seed the global generators alike at start-up; the checkpoint keeps
  rank 0's generator states and every rank restores them on resume, whatever the world size,
  so a resumed run starts like a fresh one: ranks in step. The engine itself draws no random
  numbers from those generators (rationales use per-row Philox seeds, the data order its own
  generator); only dropout does, so with dropout, ranks other than 0 draw other masks after a
  resume than the uninterrupted run would have.
"""

from __future__ import annotations

import datetime
import inspect
import logging
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from latro_engine import checkpoint as ckpt
from latro_engine.config import ConfigError, LatroConfig
from latro_engine.scoring import score_sequences

logger = logging.getLogger(__name__)

__all__ = ["Distributed", "resolve_mode", "shutdown"]

#: Metrics summed over ranks (throughputs) and maximized (maxima, phase times); others averaged.
SUM_KEYS = frozenset({"samples_per_s", "tokens_per_s"})
MAX_KEYS = frozenset({"rationale_length_max", "advantage_abs_max", "rollout_s", "score_s", "train_s"})


def _launched_world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_mode(config: LatroConfig) -> str:
    """'none', 'ddp' or 'fsdp' for this process; checked before any model is loaded."""
    world = _launched_world_size()
    mode = config.distributed
    if mode == "auto":
        return "ddp" if world > 1 else "none"
    if mode == "none" and world > 1:
        raise ConfigError(
            f"distributed='none' but {world} processes were launched: each would train alone "
            "and write the same output_dir; use 'ddp' or 'fsdp' (or 'auto')"
        )
    launched = "WORLD_SIZE" in os.environ or (dist.is_available() and dist.is_initialized())
    if mode != "none" and not launched:
        raise ConfigError(
            f"distributed={mode!r} needs a launcher: torchrun --nproc-per-node N -m latro_engine "
            "train ... (or an initialized torch.distributed process group)"
        )
    return mode


def shutdown() -> None:
    """Destroys the default process group if one is up (the CLI calls it at the end)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class _ScoreModule(torch.nn.Module):
    """``score_sequences`` as a module. The scoring pass calls the model's decoder and LM head
    directly, so DDP must wrap this pass, not the model's ``forward``, to arm its hooks."""

    def __init__(self, model: torch.nn.Module, fast_path: bool | None):
        super().__init__()
        self.model = model
        self.fast_path = fast_path

    def forward(self, *args: Any, **kwargs: Any):
        return score_sequences(self.model, *args, fast_path=self.fast_path, **kwargs)


class Distributed:
    """This process's place in the run and the collectives the trainers need.

    With ``mode == "none"`` every method is the single-process behaviour (no collectives).
    """

    def __init__(self, config: LatroConfig, device: torch.device):
        self.mode = resolve_mode(config)
        self.rank, self.world_size, self.local_rank = 0, 1, 0
        self.device = device
        self._ddp: torch.nn.parallel.DistributedDataParallel | None = None
        self._sharded: torch.nn.Module | None = None
        if self.mode == "none":
            return
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda" and device.index is None:
            self.device = torch.device("cuda", self.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if not dist.is_initialized():  # (a launcher's own process group keeps its timeout)
            dist.init_process_group(
                "nccl" if self.device.type == "cuda" else "gloo",
                timeout=datetime.timedelta(minutes=config.distributed_timeout_minutes),
            )
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        logger.info("rank %d of %d, %s on %s", self.rank, self.world_size, self.mode, self.device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def fast_path(self) -> bool | None:
        """Scoring's fast path calls the decoder and LM head outside ``forward``, where FSDP2
        has not gathered them; sharded models are scored through their full logits."""
        return False if self.mode == "fsdp" else None

    def barrier(self) -> None:
        if self.mode != "none":
            dist.barrier()

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank (one all-reduce; the flag itself alone)."""
        if self.mode == "none":
            return flag
        value = torch.tensor([int(flag)], device=self._comm)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def from_main(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (a picklable object; one broadcast)."""
        if self.mode == "none":
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # ------------------------------------------------------------------ models
    def prepare(self, model: torch.nn.Module, *, bf16: bool = False) -> torch.nn.Module:
        """Gives every rank rank 0's weights and, under FSDP2, shards the model in place."""
        if self.mode == "none":
            return model
        with torch.no_grad():
            for tensor in list(model.state_dict().values()):
                dist.broadcast(tensor, src=0)
        if self.mode == "fsdp":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            kwargs = {}
            if bf16:  # gather bf16 weights, reduce gradients in float32
                kwargs["mp_policy"] = MixedPrecisionPolicy(
                    param_dtype=torch.bfloat16, reduce_dtype=torch.float32
                )
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            blocks = set(getattr(base, "_no_split_modules", None) or ())
            for module in model.modules():
                if type(module).__name__ in blocks:
                    fully_shard(module, **kwargs)
            fully_shard(model, **kwargs)
            if self._sharded is None:  # the trainer prepares the policy first
                self._sharded = model
        return model

    def scorer(self, model: torch.nn.Module) -> Callable[..., Any]:
        """The gradient-carrying scoring pass: ``score_sequences(model, ...)``, under DDP."""
        module = _ScoreModule(model, self.fast_path)
        if self.mode != "ddp":
            return module
        ddp = torch.nn.parallel.DistributedDataParallel
        # Buffers (rotary tables) are constants: no broadcast per forward, whose count would
        # otherwise have to match between ranks. The option was renamed in torch 2.13.
        params = inspect.signature(ddp).parameters
        quiet = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
        ids = [self.device.index] if self.device.type == "cuda" else None
        self._ddp = ddp(module, device_ids=ids, **{quiet: False})
        return self._ddp

    @contextmanager
    def gradient_sync(self, enabled: bool) -> Iterator[None]:
        """Synchronizes gradients in this backward only when ``enabled`` (the last micro-batch)."""
        if self._ddp is not None and not enabled:
            with self._ddp.no_sync():
                yield
        elif self._sharded is not None:
            self._sharded.set_requires_gradient_sync(enabled)
            try:
                yield
            finally:
                self._sharded.set_requires_gradient_sync(True)
        else:
            yield

    @contextmanager
    def full_params(self, *models: torch.nn.Module | None) -> Iterator[None]:
        """FSDP2: all-gathers the parameters once for generation (a decode loop whose length
        differs between ranks), and reshards afterwards. A no-op otherwise."""
        if self.mode != "fsdp":
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        units = [m for model in models if model is not None for m in model.modules()
                 if isinstance(m, FSDPModule)]
        for unit in units:
            unit.unshard()
            unit.set_reshard_after_forward(False, recurse=False)
        try:
            yield
        finally:
            roots = {id(model) for model in models}
            for unit in units:
                unit.reshard()
                # FSDP itself keeps the root gathered after forward (backward needs it next).
                unit.set_reshard_after_forward(id(unit) not in roots, recurse=False)

    def clip_grad_norm(self, params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
        """``clip_grad_norm_`` returning a plain tensor (FSDP2's norm is a DTensor). From torch
        2.6 on, a non-finite norm leaves the gradients as they are (scaling by it would make
        every one NaN), so the skipped step can name the parameters it came from
        (:func:`latro_engine.trainer.nonfinite_gradients`); before, the step names them all."""
        utils = torch.nn.utils
        if not hasattr(utils, "get_total_norm"):  # torch < 2.6: the norm and the scaling in one
            norm = utils.clip_grad_norm_(params, max_norm)
            return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        total = utils.get_total_norm([p.grad for p in params if p.grad is not None])
        norm = total.full_tensor() if hasattr(total, "full_tensor") else total
        if bool(torch.isfinite(norm)):
            utils.clip_grads_with_norm_(params, max_norm, norm)  # the plain norm: no reduction
        return norm

    # ------------------------------------------------------------------ data and metrics
    def shard(self, batch: list[Any]) -> tuple[list[Any], int]:
        """This rank's contiguous slice of a global batch and the global index of its start."""
        per = len(batch) // self.world_size
        start = self.rank * per
        return batch[start : start + per], start

    def gather_rows(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Concatenates equal-length 1-D float or bool tensors over ranks, in rank order (one
        collective, through float64: exact for those, not for integers past 2^53)."""
        for t in tensors:
            if not (t.is_floating_point() or t.dtype == torch.bool):
                raise TypeError(f"gather_rows takes float or bool tensors, got {t.dtype}")
        if self.mode == "none":
            return list(tensors)
        packed = torch.stack([t.detach().double() for t in tensors])
        parts = [torch.empty_like(packed) for _ in range(self.world_size)]
        dist.all_gather(parts, packed)
        full = torch.cat(parts, dim=1)
        return [full[i].to(t.dtype) for i, t in enumerate(tensors)]

    def reduce_metrics(self, record: dict[str, Any]) -> dict[str, Any]:
        """Averages float metrics over ranks (sums and maxima for SUM_KEYS / MAX_KEYS); ints and
        bools are the same on every rank and left alone."""
        if self.mode == "none":
            return record
        keys = sorted(k for k, v in record.items() if type(v) is float)
        maxed = [k for k in keys if k in MAX_KEYS]
        summed = [k for k in keys if k not in MAX_KEYS]
        out = dict(record)
        for names, op in ((summed, dist.ReduceOp.SUM), (maxed, dist.ReduceOp.MAX)):
            if not names:
                continue
            values = torch.tensor([record[k] for k in names], dtype=torch.float64, device=self._comm)
            dist.all_reduce(values, op=op)
            for name, value in zip(names, values.tolist()):
                divide = op == dist.ReduceOp.SUM and name not in SUM_KEYS
                out[name] = value / self.world_size if divide else value
        return out

    @property
    def _comm(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(
        self,
        output_dir: Path,
        step: int,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        **kwargs: Any,
    ) -> Path:
        """Writes ``checkpoint-<step>`` (see the module docstring); returns its path."""
        final = ckpt.checkpoint_dir(output_dir, step)
        if self.mode != "fsdp":
            if self.is_main:
                ckpt.save_checkpoint(output_dir, step, model=model, optimizer=optimizer, **kwargs)
            self.barrier()
            return final
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_state_dict,
        )

        staging = Path(output_dir) / f".tmp-{ckpt.PREFIX}{step}-dcp"
        if self.is_main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        self.barrier()
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=staging / "dcp")
        full = get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if self.is_main:
            ckpt.save_checkpoint(
                output_dir, step, model=model, optimizer=None, model_state_dict=full,
                staging_dir=staging, **kwargs,
            )
        self.barrier()
        return final

    def load_checkpoint(
        self,
        path: Path,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
    ) -> dict[str, Any]:
        """Restores a checkpoint of any world size and kind; returns the trainer state."""
        path = Path(path)
        if (path / "dcp").is_dir():  # written by FSDP2: DCP reshards to this world size
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            state = ckpt.load_checkpoint(path, model=None, scheduler=scheduler)
            model_state, optim_state = get_state_dict(model, optimizer)
            target = {"model": model_state, "optimizer": optim_state}
            with warnings.catch_warnings(), ckpt.must_fit(path / "dcp", "sharded state"):
                warnings.filterwarnings("ignore", "torch.distributed is disabled")
                dcp.load(target, checkpoint_id=path / "dcp", no_dist=self.mode == "none")
                set_state_dict(
                    model, optimizer, model_state_dict=target["model"],
                    optim_state_dict=target["optimizer"],
                )
            return state
        if self.mode != "fsdp":
            return ckpt.load_checkpoint(
                path, model=model, optimizer=optimizer, scheduler=scheduler
            )
        return self._load_full_into_sharded(path, model, optimizer, scheduler)

    def _load_full_into_sharded(self, path, model, optimizer, scheduler) -> dict[str, Any]:
        """A usual (unsharded) checkpoint into an FSDP2 model: full state dicts, then shards."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        if hasattr(model, "peft_config"):
            raise ckpt.CheckpointError(
                f"{path}: a LoRA checkpoint written without FSDP cannot be resumed under "
                "FSDP; resume it with distributed 'ddp' or 'none'"
            )
        state = ckpt.load_checkpoint(path, model=None, scheduler=scheduler)
        weights = ckpt.read_model_weights(path / "model")
        with ckpt.must_fit(path / "model", "model"):
            keys = set_model_state_dict(
                model, weights, options=StateDictOptions(full_state_dict=True, strict=False)
            )
        ckpt.check_weights_fit(model, path / "model", keys.missing_keys, keys.unexpected_keys)
        saved = ckpt.safe_torch_load(path / "optim.pt")["optimizer"]
        names = [name for name, p in model.named_parameters() if p.requires_grad]
        by_name = {
            "state": {names[i]: v for i, v in saved["state"].items()},
            "param_groups": [
                {**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]
            ],
        }
        with ckpt.must_fit(path, "optimizer state"):
            set_optimizer_state_dict(
                model, optimizer, by_name, options=StateDictOptions(full_state_dict=True)
            )
        return state

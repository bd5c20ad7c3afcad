"""A frozen model whose weights stay in host memory and visit the GPU only while it computes.

LaTRO's reference model p0 runs once per step (one no-grad pass over the sampled rationales for
the KL term), yet a device-resident copy holds 2 bytes per parameter in bfloat16 (4 in float32)
for the whole step, through the rollout and the training passes where the peak memory is.
``keep_on_host`` moves its weights to pinned host memory once; ``visiting`` uploads them
asynchronously (on the current stream, so the forward that follows waits for nothing else) for
the duration of a block and drops the device copies after it. The cost is one host-to-device
copy of the weights per step, a few hundred milliseconds for billions of parameters.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch

_HOST_RESIDENT: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()


def _tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters and buffers, each once (tied weights are one tensor)."""
    seen: dict[int, torch.Tensor] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        seen.setdefault(id(tensor), tensor)
    return list(seen.values())


def keep_on_host(model: torch.nn.Module) -> torch.nn.Module:
    """Freezes ``model`` (no gradients) and moves its weights to host memory, pinned when CUDA is
    available so uploads are asynchronous. Returns the model; ``visiting`` brings it back."""
    model.requires_grad_(False)
    pin = torch.cuda.is_available()
    with torch.no_grad():
        for tensor in _tensors(model):
            host = tensor.data.to("cpu")
            tensor.data = host.pin_memory() if pin else host
    _HOST_RESIDENT.add(model)
    return model


def is_host_resident(model: torch.nn.Module) -> bool:
    return model in _HOST_RESIDENT


@contextlib.contextmanager
def visiting(
    model: torch.nn.Module, device: torch.device | str, *, force: bool = False
) -> Iterator[torch.nn.Module]:
    """Within the block the model's weights are copies on ``device``; after it the copies are
    dropped and the host weights are the model's again. A no-op for a model that is not
    host-resident, or when ``device`` is the CPU (unless ``force``: tests use it to exercise the
    swap without a GPU)."""
    device = torch.device(device)
    if not is_host_resident(model) or (device.type == "cpu" and not force):
        yield model
        return
    host = [(tensor, tensor.data) for tensor in _tensors(model)]
    try:
        for tensor, data in host:
            tensor.data = data.to(device, non_blocking=True, copy=True)
        yield model
    finally:
        # Work queued on the stream still reads the device copies: the caching allocator reuses
        # their memory only after it, as for any tensor freed on the stream it was used on.
        for tensor, data in host:
            tensor.data = data


class HostStateAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` whose moment estimates (``exp_avg``, ``exp_avg_sq``: twice the
    parameters' size) live in pinned host memory between steps.

    ``step`` walks the parameters in chunks of about ``chunk_bytes`` of state: it uploads a
    chunk's moments (asynchronously, on the current stream), runs AdamW's own update on that
    chunk on the parameters' device, and copies the moments back; one synchronization at the
    end makes the host copies final (for the next step and for checkpoints). The device then
    holds one chunk of optimizer state instead of all of it, for one round trip of the moments
    over the host link per step. The update itself is AdamW's, so the results are the same as
    ``torch.optim.AdamW`` with the same arguments (bit for bit: tested), and ``state_dict`` /
    ``load_state_dict`` keep the usual format.
    """

    _MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def __init__(self, params, *, chunk_bytes: int = 256 << 20, **kwargs):
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be > 0, got {chunk_bytes}")
        super().__init__(params, **kwargs)
        self.chunk_bytes = chunk_bytes

    def _to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        host = torch.empty(
            tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=torch.cuda.is_available()
        )
        return host.copy_(tensor, non_blocking=True)

    def _moments_to_host(self, state: dict, host: dict | None = None) -> None:
        """Moves a parameter's moments that are on a device back to the host, asynchronously:
        into its ``host`` tensors where it has them (pinned once: allocating is slow), else
        into new pinned ones (a first step or a load created them on the device)."""
        for name in self._MOMENTS:
            value = state.get(name)
            if isinstance(value, torch.Tensor) and value.device.type != "cpu":
                if host and name in host:
                    state[name] = host[name].copy_(value, non_blocking=True)
                else:
                    state[name] = self._to_host(value)

    def _chunks(self, params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        chunks, current, size = [], [], 0
        for p in params:
            current.append(p)
            size += 2 * p.numel() * p.element_size()
            if size >= self.chunk_bytes:
                chunks.append(current)
                current, size = [], 0
        if current:
            chunks.append(current)
        return chunks

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = [group["params"] for group in self.param_groups]
        devices = set()
        try:
            for index in range(len(self.param_groups)):
                live = [p for p in groups[index] if p.grad is not None]
                for chunk in self._chunks(live):
                    # Only this chunk is visible to AdamW's step; the other groups see nothing.
                    for other, g in enumerate(self.param_groups):
                        g["params"] = chunk if other == index else []
                    hosts = []  # each parameter's host moments, written back in place
                    for p in chunk:
                        devices.add(p.device)
                        state, host = self.state[p], {}
                        for name in self._MOMENTS:
                            if name in state:
                                host[name] = state[name]
                                state[name] = host[name].to(p.device, non_blocking=True)
                        hosts.append(host)
                    # AdamW's update itself: once any AdamW exists, torch wraps AdamW.step with
                    # the step hooks, which belong to this whole step (wrapped the same way),
                    # not to each chunk.
                    update = getattr(torch.optim.AdamW.step, "__wrapped__", torch.optim.AdamW.step)
                    update(self)
                    for p, host in zip(chunk, hosts):
                        self._moments_to_host(self.state[p], host)
        finally:
            for group, params in zip(self.param_groups, groups):
                group["params"] = params
        for device in devices:
            if device.type == "cuda":
                torch.cuda.current_stream(device).synchronize()
        return loss

    def load_state_dict(self, state_dict) -> None:
        """AdamW's load, a chunk of parameters at a time: torch's casts every moment to its
        parameter's device at once, which is all the device memory this class exists to
        spare (a resume could run out of memory where training does not). Each chunk's
        moments go back to the host before the next chunk is loaded."""
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        if len(saved_ids) != len(params):  # torch's own check names the mismatch
            super().load_state_dict(state_dict)
        id_of = {p: i for p, i in zip(params, saved_ids)}
        loaded = {}
        for chunk in self._chunks(params):
            ids = {id_of[p] for p in chunk}
            super().load_state_dict(  # the param groups' settings each time; state of this chunk
                {**state_dict, "state": {i: v for i, v in state_dict["state"].items() if i in ids}}
            )
            for p, state in self.state.items():
                self._moments_to_host(state)
                loaded[p] = state
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the chunk's device copies are free once copied
        self.state.clear()
        self.state.update(loaded)

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

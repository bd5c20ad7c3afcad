"""A frozen model whose weights stay in host memory and visit the GPU only while it computes.

LaTRO's reference model p0 runs once per step (one no-grad pass over the sampled rationales for
the KL term), yet a device-resident copy holds 2 bytes per parameter in bfloat16 (4 in float32)
for the whole step, through the rollout and the training passes where the peak memory is.
``keep_on_host`` moves its weights to pinned host memory once; ``visiting`` uploads them
asynchronously (on the current stream, so the forward that follows waits for nothing else) for
the duration of a block and drops the device copies after it. The cost is one host-to-device
copy of the weights per step, a few hundred milliseconds for billions of parameters, which
``prefetch`` hides behind other work: it starts the copy on a side stream (the trainer calls it
before the rollout), and the next visit uses the copies once they are there.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch

_HOST_RESIDENT: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
# model -> (device, [(its tensor, its host data's address, the device copy)], the event the
# copies are ready at or None)
_PREFETCHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _indexed(device: torch.device) -> torch.device:
    """``device`` with its index ("cuda" is the current CUDA device), so that two names of one
    device compare equal."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


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


def prefetch(model: torch.nn.Module, device: torch.device | str, *, force: bool = False) -> None:
    """Starts copying a host-resident model's weights to ``device`` on a side stream, so that
    the copy overlaps the work queued after this call (the rollout); the next
    :func:`visiting` of the model on that device uses these copies, its stream waiting for
    them. The copies take the weights' size of device memory from now until that visit ends
    (during a rollout, which holds no gradients, that is below a training pass's peak); they
    are allocated from the current stream's memory, which the training passes reuse after the
    visit. A no-op for a model that is not host-resident, or on the CPU (unless ``force``:
    tests copy there at once). A second call before a visit replaces the first's copies;
    :func:`discard_prefetch` drops them."""
    device = torch.device(device)
    if not is_host_resident(model) or (device.type == "cpu" and not force):
        return
    device = _indexed(device)
    discard_prefetch(model)  # an unused earlier prefetch: its copies go first
    tensors = _tensors(model)
    ready = None
    if device.type == "cuda":
        current = torch.cuda.current_stream(device)
        if device not in _SIDE_STREAMS:
            _SIDE_STREAMS[device] = torch.cuda.Stream(device)
        side = _SIDE_STREAMS[device]
        # Allocated on the current stream (its pool is the one the training passes draw
        # from); their memory may have been freed by work still queued there, which the
        # side stream waits for before it writes.
        copies = [torch.empty_like(t.data, device=device) for t in tensors]
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for t, copy in zip(tensors, copies):
                copy.copy_(t.data, non_blocking=True)
                copy.record_stream(side)
            ready = torch.cuda.Event()
            ready.record(side)
    else:
        copies = [t.data.to(device, copy=True) for t in tensors]
    entries = [(t, t.data.data_ptr(), copy) for t, copy in zip(tensors, copies)]
    _PREFETCHED[model] = (device, entries, ready)


def discard_prefetch(model: torch.nn.Module) -> None:
    """Drops the copies of an unused :func:`prefetch` (a step that failed before its visit)."""
    _PREFETCHED.pop(model, None)


@contextlib.contextmanager
def visiting(
    model: torch.nn.Module, device: torch.device | str, *, force: bool = False
) -> Iterator[torch.nn.Module]:
    """Within the block the model's weights are copies on ``device`` (a :func:`prefetch`'s
    when there is one for this device and these weights); after it the copies are dropped
    and the host weights are the model's again. A no-op for a model that is not
    host-resident, or when ``device`` is the CPU (unless ``force``: tests use it to exercise the
    swap without a GPU)."""
    device = torch.device(device)
    if not is_host_resident(model) or (device.type == "cpu" and not force):
        yield model
        return
    device = _indexed(device)
    tensors = _tensors(model)
    host = [(tensor, tensor.data) for tensor in tensors]
    prefetched = _PREFETCHED.pop(model, None)
    if prefetched is not None and (
        prefetched[0] != device
        or len(prefetched[1]) != len(tensors)  # weights replaced since
        or any(t is not now or t.data.data_ptr() != ptr
               for (t, ptr, _), now in zip(prefetched[1], tensors))
    ):
        prefetched = None  # copies of something else: dropped, the usual upload instead
    try:
        if prefetched is not None:
            _, entries, ready = prefetched
            if ready is not None:  # copied on the side stream
                torch.cuda.current_stream(device).wait_event(ready)
            for tensor, _, copy in entries:
                tensor.data = copy
        else:
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

    ``step`` walks the parameters in chunks of at most ``chunk_bytes`` of state: it uploads a
    chunk's moments (asynchronously, on the current stream), runs AdamW's own update on that
    chunk on the parameters' device, and copies the moments back; one synchronization at the
    end makes the host copies final (for the next step and for checkpoints). A parameter whose
    moments alone exceed ``chunk_bytes`` (an embedding or LM head of a 128k vocabulary: 1 GiB
    in bf16) is updated in slices of its flattened elements, AdamW being elementwise. The
    device then holds one chunk of optimizer state instead of all of it, for one round trip of
    the moments over the host link per step. The update itself is AdamW's, so the results are
    the same as ``torch.optim.AdamW`` with the same arguments (bit for bit: tested), and
    ``state_dict`` / ``load_state_dict`` keep the usual format.
    """

    _MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def __init__(self, params, *, chunk_bytes: int = 256 << 20, **kwargs):
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be > 0, got {chunk_bytes}")
        super().__init__(params, **kwargs)
        self.chunk_bytes = chunk_bytes

    def _to_host(self, tensor: torch.Tensor, *, zeros: bool = False) -> torch.Tensor:
        """A pinned host copy of ``tensor`` (asynchronous), or pinned zeros of its shape."""
        host = (torch.zeros if zeros else torch.empty)(
            tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=torch.cuda.is_available()
        )
        return host if zeros else host.copy_(tensor, non_blocking=True)

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

    @staticmethod
    def _sliceable(p: torch.Tensor) -> bool:
        return p.is_contiguous() and (p.grad is None or p.grad.is_contiguous())

    def _chunks(
        self, params: list[torch.Tensor], *, split: bool = False
    ) -> list[list[tuple[torch.Tensor, int, int]]]:
        """The parameters as chunks of ``(parameter, first, end)`` pieces (flattened elements)
        whose moments take at most ``chunk_bytes`` (one piece may take more when it cannot be
        split). With ``split``, a contiguous parameter larger than that comes in slices of
        ``chunk_bytes``, each in a chunk of its own or with whole parameters: never two slices
        of one parameter in a chunk."""
        chunks: list[list[tuple[torch.Tensor, int, int]]] = []
        current: list[tuple[torch.Tensor, int, int]] = []
        size = 0
        for p in params:
            per_element = 2 * p.element_size()
            n = p.numel()
            # Slices start at whole multiples of 64 elements where a chunk holds that many:
            # vectorized update kernels (torch's fused CPU AdamW) round the elements of their
            # scalar tails differently, and aligned starts keep every element in the path it
            # takes in the whole parameter's update.
            step = max(1, self.chunk_bytes // per_element)
            step = step // 64 * 64 if step >= 64 else step
            if split and n > step and self._sliceable(p):
                pieces = [(begin, min(begin + step, n)) for begin in range(0, n, step)]
            else:
                pieces = [(0, n)]
            for begin, end in pieces:
                piece = (end - begin) * per_element
                if current and size + piece > self.chunk_bytes:
                    chunks.append(current)
                    current, size = [], 0
                current.append((p, begin, end))
                size += piece
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
        # AdamW's update itself: once any AdamW exists, torch wraps AdamW.step with the step
        # hooks, which belong to this whole step (wrapped the same way), not to each chunk.
        update = getattr(torch.optim.AdamW.step, "__wrapped__", torch.optim.AdamW.step)
        steps_before: dict[torch.Tensor, torch.Tensor] = {}  # a sliced parameter's step count
        # A sliced parameter's whole data and gradient and its host moments, while a slice
        # is updated: put back if the update raises.
        sliced: dict[torch.Tensor, tuple[torch.Tensor, torch.Tensor, dict]] = {}
        try:
            for index in range(len(self.param_groups)):
                live = [p for p in groups[index] if p.grad is not None]
                for chunk in self._chunks(live, split=True):
                    # Only this chunk is visible to AdamW's step; the other groups see nothing.
                    for other, g in enumerate(self.param_groups):
                        g["params"] = [p for p, _, _ in chunk] if other == index else []
                    pieces = []  # (parameter, first, end, its host moments, its whole tensors)
                    for p, begin, end in chunk:
                        devices.add(p.device)
                        state, host = self.state[p], {}
                        self._moments_to_host(state)  # a load or torch's AdamW left them there
                        for name in self._MOMENTS:
                            if name in state:
                                host[name] = state[name]
                        whole = None
                        if end - begin < p.numel():  # a slice: the views are the parameter's
                            whole = (p.data, p.grad)
                            sliced[p] = (*whole, host)
                            p.data = whole[0].view(-1)[begin:end]
                            p.grad = whole[1].view(-1)[begin:end]
                            if host:  # each slice starts from the step count before this step
                                state["step"] = steps_before.setdefault(p, state["step"]).clone()
                        for name, moment in host.items():
                            piece = moment if whole is None else moment.view(-1)[begin:end]
                            state[name] = piece.to(p.device, non_blocking=True)
                        pieces.append((p, begin, end, host, whole))
                    update(self)
                    for p, begin, end, host, whole in pieces:
                        state = self.state[p]
                        if whole is None:
                            self._moments_to_host(state, host)
                            continue
                        if not host:  # its first step: AdamW made the slice's moments
                            for name in self._MOMENTS:
                                if name in state:
                                    host[name] = self._to_host(whole[0], zeros=True)
                            steps_before[p] = state["step"].clone().sub_(1)
                        for name, moment in host.items():
                            moment.view(-1)[begin:end].copy_(state[name], non_blocking=True)
                            state[name] = moment
                        p.data, p.grad = sliced.pop(p)[:2]
        finally:
            # An update that raised: each sliced parameter whole again, with its whole host
            # moments and the step count it had (no state at all if this was its first step
            # and no slice of it was done: AdamW made the slice's moments).
            for p, (data, grad, host) in sliced.items():
                p.data, p.grad = data, grad
                if not host:
                    self.state.pop(p, None)
                    continue
                self.state[p].update(host)
                if p in steps_before:
                    self.state[p]["step"] = steps_before[p]
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
        moments go back to the host before the next chunk is loaded. Chunks hold whole
        parameters here (torch's load casts whole tensors): a parameter larger than a chunk
        brings its whole moments to the device for a moment, before any activation exists."""
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        if len(saved_ids) != len(params):  # torch's own check names the mismatch
            super().load_state_dict(state_dict)
        id_of = {p: i for p, i in zip(params, saved_ids)}
        loaded = {}
        for chunk in self._chunks(params):  # whole parameters: a loaded state is whole
            ids = {id_of[p] for p, _, _ in chunk}
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

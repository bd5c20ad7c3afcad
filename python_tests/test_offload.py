"""The reference model kept in host memory (latro_engine.offload): its weights visit the device
only inside ``visiting``, its scores are unchanged, and training with it is the same run."""

from __future__ import annotations

import contextlib
import copy

import pytest
import tiny
import torch

from latro_engine import scoring as scoring_module
from latro_engine.config import ConfigError
from latro_engine.offload import (
    HostStateAdamW,
    is_host_resident,
    keep_on_host,
    prefetch,
    visiting,
)
from latro_engine.scoring import reference_logprobs
from latro_engine.trainer import LatroTrainer


def _rationales(vocab: int, rows: int = 6, length: int = 9):
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, vocab, (rows, 5), generator=g)
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0  # a left-padded prompt
    rationale = torch.randint(3, vocab, (rows, length), generator=g)
    lengths = torch.tensor([length, 0, 3, length, 1, 5])[:rows]
    return prompt, mask, rationale, lengths


def test_visiting_swaps_in_device_copies_and_restores_the_host_weights():
    model = keep_on_host(tiny.model())
    assert is_host_resident(model)
    assert not any(p.requires_grad for p in model.parameters())
    host = {name: t.data_ptr() for name, t in model.state_dict(keep_vars=True).items()}
    # On the CPU the swap is skipped unless forced; forced, the block sees fresh copies.
    with visiting(model, "cpu"):
        assert all(t.data_ptr() == host[n] for n, t in model.state_dict(keep_vars=True).items())
    with visiting(model, "cpu", force=True):
        inside = model.state_dict(keep_vars=True)
        assert all(t.data_ptr() != host[n] for n, t in inside.items())
    assert all(t.data_ptr() == host[n] for n, t in model.state_dict(keep_vars=True).items())
    # A model that is not host-resident is left alone.
    plain = tiny.model()
    before = [p.data_ptr() for p in plain.parameters()]
    with visiting(plain, "cpu", force=True):
        assert [p.data_ptr() for p in plain.parameters()] == before


def test_a_prefetched_visit_uses_the_prefetched_copies_once():
    """prefetch starts the upload ahead (at once on the CPU, forced); the next visit swaps in
    those copies, the one after makes its own; copies for another device, or of weights
    replaced since, are not used; discard_prefetch drops them; a model that is not
    host-resident is not copied."""
    from latro_engine import offload

    model = keep_on_host(tiny.model())
    host = {name: t.data_ptr() for name, t in model.state_dict(keep_vars=True).items()}

    held = []  # the prefetched copies stay alive here, so no later copy reuses their memory

    def prefetched_ptrs():
        held.append(offload._PREFETCHED[model][1])
        return {copy.data_ptr() for _, _, copy in held[-1]}

    def visited_ptrs():
        with visiting(model, "cpu", force=True):
            inside = model.state_dict(keep_vars=True)
            assert all(t.data_ptr() != host[n] for n, t in inside.items())
            return {t.data_ptr() for t in inside.values()}

    prefetch(model, "cpu")  # not forced: nothing on the CPU
    assert model not in offload._PREFETCHED
    prefetch(model, "cpu", force=True)
    prefetch(model, "cpu", force=True)  # a second prefetch replaces the first
    _, entries, ready = offload._PREFETCHED[model]
    assert ready is None and len(entries) == len(offload._tensors(model))
    copies = prefetched_ptrs()
    # (the copies also hold buffers the state dict leaves out, the rotary table)
    assert visited_ptrs() <= copies
    assert model not in offload._PREFETCHED  # used once
    assert all(t.data_ptr() == host[n] for n, t in model.state_dict(keep_vars=True).items())
    assert not visited_ptrs() & copies  # the next visit: its own copies

    prefetch(model, "cpu", force=True)
    copies = prefetched_ptrs()
    device, entries, ready = offload._PREFETCHED[model]
    offload._PREFETCHED[model] = (torch.device("meta"), entries, ready)  # another device's
    assert not visited_ptrs() & copies

    prefetch(model, "cpu", force=True)
    copies = prefetched_ptrs()
    weight = next(model.parameters())
    weight.data = weight.data.clone()  # reloaded since the prefetch: its copies are stale
    host[next(n for n, t in model.state_dict(keep_vars=True).items() if t is weight)] = (
        weight.data_ptr()
    )
    assert not visited_ptrs() & copies

    prefetch(model, "cpu", force=True)
    offload.discard_prefetch(model)
    assert model not in offload._PREFETCHED
    plain = tiny.model()
    prefetch(plain, "cpu", force=True)
    assert plain not in offload._PREFETCHED


def test_tied_weights_stay_tied_through_a_visit():
    model = tiny.model()
    model.lm_head.weight = model.model.embed_tokens.weight
    keep_on_host(model)
    with visiting(model, "cpu", force=True):
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_reference_scores_do_not_change(monkeypatch):
    policy = tiny.model()
    ref = tiny.model(seed=4).eval()
    args = _rationales(policy.config.vocab_size)
    want = reference_logprobs(policy, ref, *args).rationale_logp
    host_ref = keep_on_host(copy.deepcopy(ref))
    # Force the swap on this CPU-only machine: the scores come from the visiting copies.
    import latro_engine.scoring as scoring

    calls = []

    def forced(model, device, **_):
        calls.append(device)
        return visiting(model, device, force=True)

    monkeypatch.setattr(scoring, "visiting", forced)
    got = reference_logprobs(policy, host_ref, *args).rationale_logp
    assert calls, "the reference did not visit the policy's device"
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_training_with_the_reference_on_host_is_the_same_run(tmp_path):
    runs = {}
    for on_host in (False, True):
        config = tiny.config(tmp_path / str(on_host), reference_on_host=on_host, steps=2)
        trainer = LatroTrainer(tiny.model(), tiny.tokenizer(), tiny.examples(8), config)
        assert is_host_resident(trainer.ref_model) == on_host
        runs[on_host] = trainer.train()
    for a, b in zip(runs[False], runs[True]):
        assert a["loss"] == b["loss"] and a["kl_mean"] == b["kl_mean"]


def test_a_step_uses_its_prefetched_reference_or_drops_it(tmp_path, monkeypatch):
    """The trainer prefetches the host-resident reference before the rollout (forced here on
    the CPU): a step's reference pass uses those copies, the same losses as the usual upload;
    a step that fails before its reference pass drops them."""
    from latro_engine import offload
    from latro_engine import trainer as trainer_module

    runs, visits = {}, []
    visiting_now = offload.visiting

    @contextlib.contextmanager
    def seen(model, device, **kwargs):
        visits.append(model in offload._PREFETCHED)
        with visiting_now(model, device, **kwargs) as visited:
            yield visited

    for forced in (False, True):
        config = tiny.config(tmp_path / str(forced), reference_on_host=True, steps=2)
        trainer = LatroTrainer(tiny.model(), tiny.tokenizer(), tiny.examples(8), config)
        if forced:
            monkeypatch.setattr(trainer_module, "prefetch",
                                lambda model, device: offload.prefetch(model, device, force=True))
            monkeypatch.setattr(scoring_module, "visiting",
                                lambda model, device: seen(model, device, force=True))
        runs[forced] = trainer.train()
    assert visits == [True, True]  # each step's reference pass found its prefetch
    for a, b in zip(runs[False], runs[True]):
        assert a["loss"] == b["loss"] and a["kl_mean"] == b["kl_mean"]

    def fails(*args):
        raise RuntimeError("rollout failed")

    monkeypatch.setattr(trainer, "_rollout", fails)
    with pytest.raises(RuntimeError, match="rollout failed"):
        trainer.train_step()
    assert trainer.ref_model not in offload._PREFETCHED


@pytest.mark.parametrize(
    "option,overrides",
    [
        ("reference_on_host", dict(lora_rank=4)),
        ("reference_on_host", dict(distributed="fsdp")),
        ("optimizer_on_host", dict(distributed="fsdp")),
    ],
    ids=["reference-lora", "reference-fsdp", "optimizer-fsdp"],
)
def test_host_options_refuse_what_they_cannot_do(tmp_path, option, overrides):
    with pytest.raises(ConfigError, match=option):
        tiny.config(tmp_path, **{option: True}, **overrides)


def _trained(optimizer_cls, steps: int = 4, **kwargs):
    """A few AdamW steps on a tiny model with two parameter groups and a frozen-grad parameter."""
    torch.manual_seed(0)
    model = tiny.model()
    params = list(model.parameters())
    groups = [
        {"params": params[::2], "weight_decay": 0.1},
        {"params": params[1::2], "lr": 3e-3},
    ]
    optimizer = optimizer_cls(groups, lr=1e-3, betas=(0.9, 0.99), **kwargs)
    ids = torch.randint(0, 20, (3, 9), generator=torch.Generator().manual_seed(1))
    for step in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if step == 1:
            params[3].grad = None  # a parameter without a gradient this step is left alone
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, optimizer


@pytest.mark.parametrize(
    "chunk_bytes,options",
    [
        (1000, {"amsgrad": True}),  # slices of 64 float32 elements (125 rounded down)
        (6, {}),  # of one element
        (1000, {"fused": True}),  # torch's vectorized CPU kernel: slices start aligned
        (1000, {"fused": True, "amsgrad": True}),
        (264, {"foreach": False}),
    ],
)
def test_host_state_adamw_in_slices_is_adamw_bit_for_bit(chunk_bytes, options):
    """Parameters larger than a chunk, updated in slices, from their first step (AdamW creates
    a slice's moments) on, with AdamW's implementations on the CPU."""
    amsgrad = options.get("amsgrad", False)
    want, plain = _trained(torch.optim.AdamW, **options)
    got, offloaded = _trained(HostStateAdamW, chunk_bytes=chunk_bytes, **options)
    names = ("exp_avg", "exp_avg_sq", "step") + (("max_exp_avg_sq",) if amsgrad else ())
    for a, b in zip(want.parameters(), got.parameters()):
        assert torch.equal(a, b)
        for name in names:
            assert torch.equal(plain.state[a][name], offloaded.state[b][name]), name
            assert offloaded.state[b][name].shape == plain.state[a][name].shape


def test_host_state_adamw_chunks_cover_each_parameter_once_within_the_budget():
    model = tiny.model()
    params = list(model.parameters())
    optimizer = HostStateAdamW(params, chunk_bytes=3000)
    chunks = optimizer._chunks(params, split=True)
    covered = {id(p): [] for p in params}
    for chunk in chunks:
        assert sum(2 * (end - begin) * p.element_size() for p, begin, end in chunk) <= 3000
        assert len({id(p) for p, _, _ in chunk}) == len(chunk)  # no parameter twice in a chunk
        for p, begin, end in chunk:
            covered[id(p)].append((begin, end))
    for p in params:
        pieces = covered[id(p)]
        assert pieces[0][0] == 0 and pieces[-1][1] == p.numel()
        assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
    assert any(len(covered[id(p)]) > 1 for p in params)
    # Without split (loading a state) every parameter is one piece.
    assert all(
        (begin, end) == (0, p.numel()) for chunk in optimizer._chunks(params) for p, begin, end in chunk
    )


@pytest.mark.parametrize("first_step", [True, False])
def test_host_state_adamw_restores_sliced_parameters_when_the_update_raises(monkeypatch, first_step):
    """An update that raises in the middle of a step (the third chunk) leaves every parameter,
    gradient and moment whole-shaped, so the next step runs (and a checkpoint holds the
    usual shapes)."""
    model = tiny.model()
    params = list(model.parameters())
    optimizer = HostStateAdamW(params, lr=1e-3, chunk_bytes=1000)
    for p in params:
        p.grad = torch.ones_like(p)
    if not first_step:
        optimizer.step()
    shapes = [(p.shape, p.grad.shape) for p in params]
    update = torch.optim.AdamW.step
    calls = []

    def fails_third(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("update failed")
        return getattr(update, "__wrapped__", update)(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", fails_third)
    with pytest.raises(RuntimeError, match="update failed"):
        optimizer.step()
    monkeypatch.setattr(torch.optim.AdamW, "step", update)
    assert [(p.shape, p.grad.shape) for p in params] == shapes
    assert [g["params"] for g in optimizer.param_groups] == [params]
    for p, state in optimizer.state.items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert state[name].shape == p.shape, name
        # done before the failure, or put back to the count before this step
        assert float(state["step"]) in ((0.0, 1.0) if first_step else (1.0, 2.0))
    optimizer.step()
    for p in params:
        assert optimizer.state[p]["exp_avg"].shape == p.shape


def test_host_state_adamw_is_adamw_bit_for_bit():
    want, plain = _trained(torch.optim.AdamW)
    # Small chunks: many chunks per group, each updated on its own.
    got, offloaded = _trained(HostStateAdamW, chunk_bytes=4096)
    for a, b in zip(want.parameters(), got.parameters()):
        assert torch.equal(a, b)
    for p in got.parameters():
        for name in ("exp_avg", "exp_avg_sq"):
            assert offloaded.state[p][name].device.type == "cpu"
    # The same checkpoint format: each loads into the other and continues the same way.
    state = offloaded.state_dict()
    assert state.keys() == plain.state_dict().keys()
    for key, value in plain.state_dict()["state"].items():
        for name, tensor in value.items():
            assert torch.equal(tensor, state["state"][key][name]), (key, name)
    again, _ = _trained(HostStateAdamW, steps=0, chunk_bytes=4096)
    reloaded = HostStateAdamW(
        [{"params": list(again.parameters())[::2], "weight_decay": 0.1},
         {"params": list(again.parameters())[1::2], "lr": 3e-3}],
        lr=1e-3, betas=(0.9, 0.99), chunk_bytes=4096,
    )
    reloaded.load_state_dict(plain.state_dict())
    assert all(
        reloaded.state[p]["exp_avg"].device.type == "cpu" for p in again.parameters()
    )
    for p, q in zip(again.parameters(), want.parameters()):
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(reloaded.state[p][name], plain.state[q][name]), name
    assert [g["lr"] for g in reloaded.param_groups] == [g["lr"] for g in plain.param_groups]


def test_host_state_adamw_loads_a_chunk_at_a_time(monkeypatch):
    """torch's load casts every moment to its parameter's device at once; HostStateAdamW loads
    one chunk of parameters at a time (its moments back on the host before the next), so a
    resume needs no more device memory than a step."""
    _, plain = _trained(torch.optim.AdamW)
    model, optimizer = _trained(HostStateAdamW, steps=0, chunk_bytes=4096)
    loads = []
    load = torch.optim.Optimizer.load_state_dict

    def counted(self, state_dict):
        loads.append(len(state_dict["state"]))
        return load(self, state_dict)

    monkeypatch.setattr(torch.optim.Optimizer, "load_state_dict", counted)
    optimizer.load_state_dict(plain.state_dict())
    chunks = optimizer._chunks([p for g in optimizer.param_groups for p in g["params"]])
    assert len(loads) == len(chunks) > 2 and loads == [len(c) for c in chunks]
    assert all((begin, end) == (0, p.numel()) for c in chunks for p, begin, end in c)
    assert len(optimizer.state) == len(list(model.parameters()))


def test_host_state_adamw_runs_its_step_hooks_once_a_step():
    """AdamW's step hooks wrap AdamW.step once any AdamW exists (built first here); the chunks'
    updates must not fire them again, each seeing one chunk as the parameters."""
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    model = tiny.model()
    optimizer = HostStateAdamW(model.parameters(), lr=1e-3, chunk_bytes=4096)
    calls = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append("pre"))
    optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append("post"))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    assert len(optimizer._chunks(list(model.parameters()))) > 2
    optimizer.step()
    assert calls == ["pre", "post"]


def test_host_state_adamw_refuses_a_bad_chunk_size():
    with pytest.raises(ValueError, match="chunk_bytes"):
        HostStateAdamW(tiny.model().parameters(), chunk_bytes=0)


def test_training_with_the_optimizer_state_on_host_is_the_same_run(tmp_path):
    runs = {}
    for on_host in (False, True):
        config = tiny.config(tmp_path / str(on_host), optimizer_on_host=on_host, steps=2)
        trainer = LatroTrainer(tiny.model(), tiny.tokenizer(), tiny.examples(8), config)
        assert isinstance(trainer.optimizer, HostStateAdamW) == on_host
        runs[on_host] = (trainer.train(), [p.detach().clone() for p in trainer.model.parameters()])
    for a, b in zip(runs[False][0], runs[True][0]):
        assert a["loss"] == b["loss"]
    for a, b in zip(runs[False][1], runs[True][1]):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- on a GPU
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_cuda_host_state_adamw_matches_adamw_on_the_device():
    """Asynchronous uploads and write-backs through pinned memory, chunk by chunk: the same
    weights as torch's AdamW on the device (both take the foreach path there)."""
    results = {}
    for cls, kwargs in ((torch.optim.AdamW, {}), (HostStateAdamW, {"chunk_bytes": 1 << 16})):
        torch.manual_seed(0)
        model = tiny.model().cuda()
        optimizer = cls(model.parameters(), lr=1e-3, weight_decay=0.05, **kwargs)
        ids = torch.randint(0, 20, (4, 11), generator=torch.Generator().manual_seed(1)).cuda()
        for _ in range(3):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        results[cls] = [p.detach().cpu() for p in model.parameters()]
        if cls is HostStateAdamW:
            moments = [s["exp_avg"] for s in optimizer.state.values()]
            assert all(m.device.type == "cpu" and m.is_pinned() for m in moments)
    for a, b in zip(results[torch.optim.AdamW], results[HostStateAdamW]):
        assert torch.equal(a, b)


@needs_cuda
def test_cuda_host_state_adamw_holds_one_chunk_of_state_on_the_device():
    """A parameter of 8 MiB of moments (an embedding's shape) updated with 1 MiB chunks: the
    step's device memory beyond the weights and gradients stays near one chunk (the moments'
    copies and AdamW's temporaries), where a whole-parameter chunk would take 8 MiB and more;
    and the update is torch's AdamW's on the device."""
    results = {}
    for cls, kwargs in ((torch.optim.AdamW, {}), (HostStateAdamW, {"chunk_bytes": 1 << 20})):
        torch.manual_seed(0)
        embedding = torch.nn.Embedding(8191, 128).cuda()  # 1,048,448 float32 elements
        optimizer = cls(embedding.parameters(), lr=1e-3, weight_decay=0.05, **kwargs)
        ids = torch.randint(0, 8191, (64,), device="cuda")
        for _ in range(3):
            embedding(ids).square().sum().backward()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            optimizer.step()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - before
            optimizer.zero_grad(set_to_none=True)
        results[cls] = embedding.weight.detach().cpu()
        if cls is HostStateAdamW:
            assert peak <= 3 * (1 << 20), peak
    assert torch.equal(results[torch.optim.AdamW], results[HostStateAdamW])


@needs_cuda
def test_cuda_reference_on_host_scores_like_the_device_copy():
    policy = tiny.model().cuda()
    ref = tiny.model(seed=4).cuda().eval()
    args = [t.cuda() for t in _rationales(policy.config.vocab_size)]
    want = reference_logprobs(policy, ref, *args).rationale_logp
    host_ref = keep_on_host(copy.deepcopy(ref))
    assert all(p.device.type == "cpu" and p.is_pinned() for p in host_ref.parameters())
    got = reference_logprobs(policy, host_ref, *args).rationale_logp
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert all(p.device.type == "cpu" for p in host_ref.parameters())  # the visit ended
    # Prefetched on the side stream ahead of other work, the same scores; after the visit its
    # copies are freed (the allocated memory is back where it was before the prefetch; the first
    # scores go first, or their 512-byte block would count in `before` and not after).
    del got
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    prefetch(host_ref, "cuda")
    busy = torch.randn(2048, 2048, device="cuda")
    for _ in range(20):  # work queued after the prefetch, as a rollout is
        busy = busy @ busy.t() / 2048
    got = reference_logprobs(policy, host_ref, *args).rationale_logp
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    del busy, got
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before
    assert all(p.device.type == "cpu" for p in host_ref.parameters())
    # The copies came from the current stream's pool: tensors of the weights' shapes made on
    # it after the visit reuse their memory instead of reserving more (copies allocated on
    # the side stream would sit in its pool, reserved through the training passes).
    reserved = torch.cuda.memory_reserved()
    reuse = [torch.empty_like(t, device="cuda") for t in host_ref.parameters()]
    assert torch.cuda.memory_reserved() == reserved
    del reuse

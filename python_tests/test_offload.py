"""The reference model kept in host memory (latro_engine.offload): its weights visit the device
only inside ``visiting``, its scores are unchanged, and training with it is the same run."""

from __future__ import annotations

import copy

import pytest
import tiny
import torch

from latro_engine.config import ConfigError
from latro_engine.offload import is_host_resident, keep_on_host, visiting
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


@pytest.mark.parametrize(
    "overrides", [dict(lora_rank=4), dict(distributed="fsdp")], ids=["lora", "fsdp"]
)
def test_reference_on_host_refuses_what_it_cannot_do(tmp_path, overrides):
    with pytest.raises(ConfigError, match="reference_on_host"):
        tiny.config(tmp_path, reference_on_host=True, **overrides)

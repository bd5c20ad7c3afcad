"""End to end on a tiny random model: LaTRO and SFT steps, metrics, checkpoints, exact resume."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import shutil
from types import SimpleNamespace

import pytest
import tiny
import torch
from conftest import DEVICES

from latro_engine import checkpoint as ckpt
from latro_engine import trainer as trainer_module
from latro_engine.config import ConfigError
from latro_engine.data import Example
from latro_engine.generation import evaluate_model, pad_id
from latro_engine.metrics import read_metrics
from latro_engine.objective import batch_advantages, latro_loss
from latro_engine.trainer import LatroTrainer, SFTTrainer, rows_per_forward

TIMING = {"rollout_s", "score_s", "train_s", "samples_per_s", "tokens_per_s"}


def _strip_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


@pytest.mark.parametrize(
    "micro_batch_size,penalty_mode,penalty", [(4, "constant", -10.0), (3, "batch_mean", 2.0)]
)
def test_latro_trains_and_checkpoints(tmp_path, micro_batch_size, penalty_mode, penalty):
    config = tiny.config(
        tmp_path,
        micro_batch_size=micro_batch_size,
        penalty_mode=penalty_mode,
        nonstop_penalty=penalty,
        plot=True,
        eval_every=2,
    )
    data = tiny.examples(16)
    trainer = LatroTrainer(tiny.model(), tiny.tokenizer(), data, config, eval_dataset=data[:4])
    before = [p.detach().clone() for p in trainer.model.parameters()]
    records = trainer.train()
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        for key in (
            "loss",
            "pg_loss",
            "sft_loss",
            "reward_mean",
            "kl_mean",
            "rationale_length_mean",
            "finished_frac",
            "tokens_per_s",
            "lr",
            "grad_norm",
        ):
            assert math.isfinite(r[key]), (key, r)
        assert 0 <= r["finished_frac"] <= 1
    assert "eval_greedy_accuracy" in records[1]
    assert records[1]["eval_n"] == 4  # the examples the accuracy is over
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert (tmp_path / "run" / "training_curves.png").stat().st_size > 0
    latest = ckpt.latest_checkpoint(tmp_path / "run")
    assert latest.name == "checkpoint-3"
    reloaded = tiny.model(seed=5)
    ckpt.load_checkpoint(latest, model=reloaded, restore_rng=False)
    for a, b in zip(trainer.model.state_dict().values(), reloaded.state_dict().values()):
        assert torch.equal(a, b)
    # The policy moved but the frozen reference did not.
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.ref_model.parameters()))


@pytest.fixture(autouse=True)
def _nondeterministic_after_each_test():
    yield
    torch.use_deterministic_algorithms(False)  # the trainer switches it on for the process


@pytest.mark.parametrize("host_state", [False, True], ids=["device-state", "host-state"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, monkeypatch, host_state):
    """host-state: the AdamW moments and the reference kept in host memory (offload.py)."""
    data = tiny.examples(16)
    extra = dict(optimizer_on_host=True, reference_on_host=True) if host_state else {}
    full = tiny.config(tmp_path / "full", steps=4, save_every=2, deterministic=True, **extra)
    LatroTrainer(tiny.model(), tiny.tokenizer(), data, full).train()
    reference = _strip_timing(read_metrics(tmp_path / "full" / "run" / "metrics.jsonl"))

    # The same run crashes during step 3, after the step-2 checkpoint...
    crashing = tiny.config(tmp_path / "part", steps=4, save_every=2, deterministic=True, **extra)
    trainer = LatroTrainer(tiny.model(), tiny.tokenizer(), data, crashing)
    original_step = LatroTrainer.train_step

    def crash_at_step_3(self):
        if self.step == 2:
            raise KeyboardInterrupt("simulated crash")
        return original_step(self)

    monkeypatch.setattr(LatroTrainer, "train_step", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    monkeypatch.setattr(LatroTrainer, "train_step", original_step)
    # ... and is started again from the same base model, as a user would after a crash.
    LatroTrainer(tiny.model(), tiny.tokenizer(), data, crashing).train()
    got = _strip_timing(read_metrics(tmp_path / "part" / "run" / "metrics.jsonl"))
    assert got == reference


def test_resume_takes_this_runs_optimizer_settings(tmp_path, caplog):
    """The checkpoint brings back the AdamW moments and the schedule's position; the learning
    rate, betas and weight decay are the resuming run's (a run stopped for non-finite steps is
    resumed with a lower learning rate), and the log says where the rate jumps. LoRA settings
    without LoRA on either side do not make it another run."""
    data = tiny.examples(16)
    first = tiny.config(tmp_path, steps=2, learning_rate=1e-3, lr_schedule="constant")
    LatroTrainer(tiny.model(), tiny.tokenizer(), data, first).train()
    lower = tiny.config(tmp_path, steps=4, learning_rate=1e-5, weight_decay=0.25,
                        adam_betas=(0.8, 0.9), lr_schedule="linear", lora_alpha=4.0)
    trainer = LatroTrainer(tiny.model(), tiny.tokenizer(), data, lower)
    with caplog.at_level("INFO", logger="latro_engine.trainer"):
        trainer.train()
    assert "the checkpoint's: (0.001" in caplog.text
    assert "resuming at step 2 with learning rate 5e-06 (the checkpoint's run was at 0.001)" in (
        caplog.text
    )
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    lrs = {r["step"]: r["lr"] for r in records if "lr" in r}
    # linear decay over 4 steps from 1e-5: after steps 3 and 4, 1e-5 * (1 - 3/4) and 0
    assert lrs[1] == pytest.approx(1e-3) and lrs[3] == pytest.approx(2.5e-6) and lrs[4] == 0.0
    group = trainer.optimizer.param_groups[0]
    assert (group["weight_decay"], tuple(group["betas"])) == (0.25, (0.8, 0.9))


def test_sft_baseline_trains(tmp_path):
    config = tiny.config(tmp_path, micro_batch_size=3)
    trainer = SFTTrainer(tiny.model(), tiny.tokenizer(), tiny.examples(8), config)
    records = trainer.train()
    assert len(records) == 3 and all(math.isfinite(r["loss"]) for r in records)
    assert records[-1]["loss"] < records[0]["loss"] * 1.5


@pytest.mark.parametrize("target", ["rationale", "answer"])
def test_sft_trains_on_the_worked_solutions_where_the_data_has_them(tmp_path, monkeypatch, target):
    """The paper's GSM8K SFT baseline trains on the dataset's rationales, then the answer:
    the step's loss is -mean_i log p(z_i, y_i | x_i), by the model's own forward over the
    texts (examples without a rationale, ARC's, answer directly); sft_target 'answer' trains
    on y alone."""
    import random

    from latro_engine import synthetic
    from latro_engine.generation import encode_prompts, prompt_texts, sft_targets

    problems = synthetic.sample_problems(4, 0, tiny.TASK, "train")
    examples = [
        Example(id=str(i), question=p.question, answer=p.answer, source_line=i + 1,
                rationale=synthetic.worked_rationale(p, random.Random(i))[0].strip() if i else "")
        for i, p in enumerate(problems)
    ]
    config = tiny.config(tmp_path, prompts_per_step=4, micro_batch_size=3, bf16="off",
                         sft_target=target)
    model, tok = tiny.model(), tiny.tokenizer()
    trainer = SFTTrainer(model, tok, examples, config)
    _capture_gradients(trainer, monkeypatch, {})
    record = trainer.train_step()
    ids, mask = encode_prompts(tok, examples, config, "cpu")
    rationales, answers = sft_targets(tok, examples, config)
    want = 0.0
    with torch.no_grad():
        for i, (ex, rationale, answer) in enumerate(zip(examples, rationales, answers)):
            prompt = ids[i][mask[i].bool()].tolist()
            # The solution continues the prompt's text, after a space where it ends without one.
            text = prompt_texts(tok, [ex], config)[0]
            assert tok.decode(rationale) == ("" if target == "answer" or not i else
                                             (" " if not text[-1].isspace() else "") + ex.rationale)
            full = torch.tensor([prompt + rationale + answer])
            logp = trainer.model(full).logits.float().log_softmax(-1)[0, :-1]
            scored = logp.gather(-1, full[0, 1:, None])[len(prompt) - 1 :]
            want -= float(scored.sum()) / len(examples)
    assert record["loss"] == pytest.approx(want, rel=1e-5)
    if target == "answer":
        assert record["rationale_logp_mean"] == 0.0


def test_sft_micro_batches_by_tokens_take_the_same_gradient(tmp_path, monkeypatch):
    """SFT's micro-batches by length and tokens (up to 8 rows, budgets that cut them to two or
    three questions, rows x width within the budget) give the gradient of one micro-batch of
    every question."""
    grads, forwards = {}, {}
    for tokens in (0, 180, 270):
        config = tiny.config(tmp_path / str(tokens), prompts_per_step=5, micro_batch_size=8,
                             micro_batch_tokens=tokens, bf16="off")
        trainer = SFTTrainer(tiny.model(), tiny.tokenizer(), tiny.examples(8), config)
        seen: dict = {}
        widths: list[tuple[int, int]] = []
        scorer = trainer._scorer

        def recorded(prompt_ids, prompt_mask, r_ids, r_len, answers, scorer=scorer,
                     widths=widths, **kwargs):
            widths.append((len(answers), int(max(
                int(m.sum()) + len(a) for m, a in zip(prompt_mask, answers)))))
            return scorer(prompt_ids, prompt_mask, r_ids, r_len, answers, **kwargs)

        monkeypatch.setattr(trainer, "_scorer", recorded)
        _capture_gradients(trainer, monkeypatch, seen)
        trainer.train_step()
        grads[tokens], forwards[tokens] = seen["grads"], widths
    assert len(forwards[0]) == 1 and len(forwards[180]) > len(forwards[270]) > 1
    for tokens in (180, 270):
        assert sum(rows for rows, _ in forwards[tokens]) == 5
        assert all(rows == 1 or rows * width <= tokens for rows, width in forwards[tokens])
        for got, want in zip(grads[tokens], grads[0]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_evaluate_writes_per_example_jsonl(tmp_path):
    config = tiny.config(tmp_path)
    data = tiny.examples(5)
    trainer = LatroTrainer(tiny.model(), tiny.tokenizer(), data, config, eval_dataset=data)
    result = trainer.evaluate(maj_k=2, write_path=tmp_path / "eval.jsonl")
    assert result.n == 5 and 0 <= result.greedy_accuracy <= 1 and result.maj_accuracy is not None
    assert len((tmp_path / "eval.jsonl").read_text().splitlines()) == 5


def test_keep_best_keeps_the_checkpoint_of_the_best_evaluation(tmp_path, monkeypatch):
    """keep_best (the reference code's choice): each evaluation that improves the greedy
    accuracy saves a checkpoint, which pruning spares while no better one comes; a resumed run
    knows its best."""
    accuracies = iter([0.5, 0.9, 0.7, 0.8, 0.95])

    def evaluate(self, dataset=None, *, maj_k=None, write_path=None):
        return SimpleNamespace(greedy_accuracy=next(accuracies), n=4)

    monkeypatch.setattr(LatroTrainer, "evaluate", evaluate)
    data = tiny.examples(16)
    config = tiny.config(tmp_path, eval_every=1, keep_best=True, keep_checkpoints=1, save_every=0)
    LatroTrainer(tiny.model(), tiny.tokenizer(), data, config, eval_dataset=data[:4]).train()
    run = tmp_path / "run"
    assert [p.name for _, p in ckpt.list_checkpoints(run)] == ["checkpoint-2", "checkpoint-3"]
    assert ckpt.best_checkpoint(run) == run / "checkpoint-2"
    assert ckpt.read_trainer_state(run / "checkpoint-3")["best_accuracy"] == 0.9
    config = tiny.config(tmp_path, eval_every=1, keep_best=True, keep_checkpoints=1, steps=5)
    resumed = LatroTrainer(tiny.model(), tiny.tokenizer(), data, config, eval_dataset=data[:4])
    resumed.train()  # step 4 evaluates 0.8 (not the best), step 5 0.95 (the best)
    assert (resumed.best_step, resumed.best_accuracy) == (5, 0.95)
    assert [p.name for _, p in ckpt.list_checkpoints(run)] == ["checkpoint-5"]
    with pytest.raises(ValueError, match="keep_best needs an eval_dataset"):
        LatroTrainer(tiny.model(), tiny.tokenizer(), data, config)


@pytest.mark.parametrize("bf16", ["off", "on"])
def test_every_evaluation_path_scores_a_model_alike(tmp_path, bf16):
    # The trainer's evaluate, `latro eval` and the demo's base row all call evaluate_model with
    # its defaults: the config's evaluation seed and its bf16 autocast, whatever the caller.
    config = tiny.config(tmp_path, bf16=bf16)
    data = tiny.examples(5)
    trainer = LatroTrainer(tiny.model(), tiny.tokenizer(), data, config, eval_dataset=data)
    autocast_seen = []
    hook = trainer.model.register_forward_pre_hook(
        lambda module, args: autocast_seen.append(torch.is_autocast_enabled("cpu"))
    )
    from_trainer = trainer.evaluate(maj_k=2)
    direct = evaluate_model(trainer.model, trainer.tokenizer, data, config, maj_k=2)
    hook.remove()
    assert autocast_seen and set(autocast_seen) == {bf16 == "on"}
    assert [r.sampled_predictions for r in direct.records] == [
        r.sampled_predictions for r in from_trainer.records
    ]
    assert [r.greedy_completion for r in direct.records] == [
        r.greedy_completion for r in from_trainer.records
    ]


def test_lora_trains_adapters_and_uses_the_base_as_reference(tmp_path):
    pytest.importorskip("peft")
    config = tiny.config(tmp_path, lora_rank=4, lora_alpha=8.0, steps=2)
    base = tiny.model()
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    trainer = LatroTrainer(base, tiny.tokenizer(), tiny.examples(8), config)
    assert trainer.ref_model is None  # no second copy: the policy with adapters disabled
    records = trainer.train()
    assert all(math.isfinite(r["loss"]) for r in records)
    assert records[0]["kl_mean"] == pytest.approx(0.0, abs=1e-4)  # adapters start as a no-op
    lora = {k: v for k, v in trainer.model.state_dict().items() if "lora_" in k}
    assert lora and any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)
    base_now = trainer.model.get_base_model().state_dict()
    for key, value in frozen.items():
        peft_key = (
            key.replace("q_proj.weight", "q_proj.base_layer.weight")
            .replace("k_proj.weight", "k_proj.base_layer.weight")
            .replace("v_proj.weight", "v_proj.base_layer.weight")
            .replace("o_proj.weight", "o_proj.base_layer.weight")
        )
        assert torch.equal(base_now[peft_key], value), key
    latest = ckpt.latest_checkpoint(tmp_path / "run")
    assert (latest / "model" / "adapter_model.safetensors").exists()
    again = LatroTrainer(tiny.model(), tiny.tokenizer(), tiny.examples(8), config)
    again.resume_from(latest)
    for k, v in lora.items():
        assert torch.equal(again.model.state_dict()[k], v), k


def test_lora_adapters_for_other_modules_are_refused(tmp_path):
    """Resuming with another lora_target_modules would load no adapter weight (and the AdamW
    moments onto other parameters): refused by name instead."""
    pytest.importorskip("peft")
    config = tiny.config(tmp_path, lora_rank=4, lora_alpha=8.0, steps=2,
                         lora_target_modules=("q_proj", "v_proj"))
    LatroTrainer(tiny.model(), tiny.tokenizer(), tiny.examples(8), config).train()
    other = tiny.config(tmp_path, lora_rank=4, lora_alpha=8.0, steps=3,
                        lora_target_modules=("k_proj", "o_proj"))
    trainer = LatroTrainer(tiny.model(), tiny.tokenizer(), tiny.examples(8), other)
    with pytest.raises(ckpt.CheckpointError, match="lora_target_modules"):
        trainer.train()
    # A checkpoint without the run's settings (written by hand, or by an older version) is
    # still refused when its adapters do not fit.
    with pytest.raises(ckpt.CheckpointError, match="LoRA adapters do not fit"):
        ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "run"), model=trainer.model)


def test_lora_target_modules_the_model_lacks_are_a_config_error(tmp_path):
    pytest.importorskip("peft")
    config = tiny.config(tmp_path, lora_rank=4, lora_target_modules=("qproj",))
    with pytest.raises(ConfigError, match=r"lora_target_modules \['qproj'\]: Target modules"):
        LatroTrainer(tiny.model(), tiny.tokenizer(), tiny.examples(8), config)


def test_the_starting_weights_digest_reads_large_and_empty_parameters():
    """Picks past 2^24 elements stay in range (a float32 linspace rounded the last one past the
    end: every 7B model's embedding), the last element is one of them, and an empty parameter
    counts by its name and shape."""
    big = torch.nn.Linear(1, 2**24 + 3, bias=False)
    empty = torch.nn.Linear(0, 5)
    digest = trainer_module._weights_digest(big, empty)
    assert digest.startswith("3 tensors, sha256 ")
    with torch.no_grad():
        big.weight[-1] += 1.0
    assert trainer_module._weights_digest(big, empty) != digest


def test_resuming_from_other_starting_weights_is_refused(tmp_path):
    """The KL term's reference is the weights the run started from: resuming with one of the
    run's own checkpoints as the model (or another model) would silently change it."""
    data = tiny.examples(8)
    LatroTrainer(tiny.model(), tiny.tokenizer(), data, tiny.config(tmp_path, steps=2)).train()
    more = tiny.config(tmp_path, steps=3)
    trained = tiny.model()
    ckpt.load_model_weights(trained, ckpt.latest_checkpoint(tmp_path / "run") / "model")
    for other in (trained, tiny.model(seed=3)):
        with pytest.raises(ckpt.CheckpointError, match="started from other weights"):
            LatroTrainer(other, tiny.tokenizer(), data, more).train()
    reference = tiny.model(seed=4)  # a reference given apart is part of the identity too
    with pytest.raises(ckpt.CheckpointError, match="started from other weights"):
        LatroTrainer(tiny.model(), tiny.tokenizer(), data, more, ref_model=reference).train()
    resumed = LatroTrainer(tiny.model(), tiny.tokenizer(), data, more)
    resumed.train()
    assert resumed.step == 3


def test_train_goes_on_from_the_checkpoint_resume_from_was_given(tmp_path):
    """resume_from(an older checkpoint) then train() goes on from it, not from the newest; an
    output_dir with later checkpoints (which a later resume would pick) is refused, as is one
    holding another run's."""
    data = tiny.examples(8)
    config = tiny.config(tmp_path, steps=3, save_every=1, keep_checkpoints=5)
    LatroTrainer(tiny.model(), tiny.tokenizer(), data, config).train()
    run = tmp_path / "run"
    again = LatroTrainer(tiny.model(), tiny.tokenizer(), data, config)
    again.resume_from(run / "checkpoint-1")
    with pytest.raises(ckpt.CheckpointError, match="holds checkpoint-2, checkpoint-3, which"):
        again.train()
    other = tiny.config(tmp_path / "other", steps=3)
    elsewhere = LatroTrainer(tiny.model(), tiny.tokenizer(), data, other)
    elsewhere.resume_from(run / "checkpoint-3")  # into an empty output_dir: fine
    elsewhere.best_step = 2  # (as keep_best would have it: its best is not in this output_dir)
    assert elsewhere.train() == [] and elsewhere.step == 3 and elsewhere.best_step is None
    for name in ("checkpoint-2", "checkpoint-3"):
        shutil.move(run / name, tmp_path / name)
    branch = LatroTrainer(tiny.model(), tiny.tokenizer(), data, config)
    branch.resume_from(run / "checkpoint-1")
    records = branch.train()  # the log's step 1, then steps 2 and 3 trained again
    assert [r["step"] for r in records] == [1, 2, 3] and branch.step == 3
    assert sorted(p.name for _, p in ckpt.list_checkpoints(run)) == [
        "checkpoint-1", "checkpoint-2", "checkpoint-3"]
    foreign = LatroTrainer(tiny.model(), tiny.tokenizer(), data, config)
    foreign.resume_from(tmp_path / "checkpoint-2")  # a checkpoint from outside output_dir
    with pytest.raises(ckpt.CheckpointError, match="holds checkpoint-1, checkpoint-2, checkpoint-3"):
        foreign.train()


def test_a_run_saved_before_a_setting_existed_resumes_only_with_its_old_value(tmp_path):
    """A checkpoint written before answer_after_stop existed trained with the fixed y: resuming
    it under the new default is refused by name, and goes on with the old value."""
    data = tiny.examples(8)
    LatroTrainer(tiny.model(), tiny.tokenizer(), data, tiny.config(tmp_path, steps=2)).train()
    state_file = ckpt.latest_checkpoint(tmp_path / "run") / ckpt.STATE_FILE
    state = json.loads(state_file.read_text())
    del state["config"]["answer_after_stop"]
    state_file.write_text(json.dumps(state))
    with pytest.raises(ckpt.CheckpointError, match="answer_after_stop 'template' there, 'own'"):
        LatroTrainer(tiny.model(), tiny.tokenizer(), data, tiny.config(tmp_path, steps=3)).train()
    old = tiny.config(tmp_path, steps=3, answer_after_stop="template")
    resumed = LatroTrainer(tiny.model(), tiny.tokenizer(), data, old)
    resumed.train()
    assert resumed.step == 3


def test_a_run_does_not_start_among_another_runs_checkpoints(tmp_path):
    """A fresh run (resume off) in a directory with checkpoints, or a run of the other trainer
    resuming one, is refused before it touches them."""
    data = tiny.examples(8)
    LatroTrainer(tiny.model(), tiny.tokenizer(), data, tiny.config(tmp_path, steps=2)).train()
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    fresh = tiny.config(tmp_path, steps=3, resume=False)
    with pytest.raises(ckpt.CheckpointError, match="holds checkpoints of an earlier run"):
        LatroTrainer(tiny.model(), tiny.tokenizer(), data, fresh).train()
    with pytest.raises(ckpt.CheckpointError, match="written by the latro trainer, not sft"):
        SFTTrainer(tiny.model(), tiny.tokenizer(), data, tiny.config(tmp_path, steps=3)).train()
    # Another experiment in the same output_dir (resume is on by default): other data, or
    # another objective or seed, is refused by name instead of continuing that run.
    other_data = tiny.examples(9)
    with pytest.raises(ckpt.CheckpointError, match=r"another run \(train_data '8 examples"):
        LatroTrainer(tiny.model(), tiny.tokenizer(), other_data, tiny.config(tmp_path, steps=3)).train()
    for setting in ({"kl_coef": 0.5}, {"seed": 3}, {"k": 3}):
        name, value = next(iter(setting.items()))
        with pytest.raises(ckpt.CheckpointError, match=f"{name} .* there, {value} here"):
            LatroTrainer(tiny.model(), tiny.tokenizer(), data,
                         tiny.config(tmp_path, steps=3, **setting)).train()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before


@pytest.mark.parametrize("lora", [False, True])
def test_static_rollout_decoder_trains_like_the_hf_loop(tmp_path, lora):
    """rollout_decoder=static (the CUDA-graph decoder, eager on the CPU) draws the rationales the
    model's own forward draws, so training and evaluation follow the same path."""
    if lora:
        pytest.importorskip("peft")
    extra = dict(lora_rank=4, lora_alpha=8.0) if lora else {}
    runs = {}
    for decoder in ("hf", "static"):
        config = tiny.config(tmp_path / decoder, rollout_decoder=decoder, steps=2, eval_every=2,
                             **extra)
        trainer = LatroTrainer(tiny.model(), tiny.tokenizer(), tiny.examples(8), config,
                               eval_dataset=tiny.examples(4))
        runs[decoder] = trainer.train()
    for a, b in zip(runs["hf"], runs["static"]):
        assert a["rationale_length_mean"] == b["rationale_length_mean"]
        assert a["finished_frac"] == b["finished_frac"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)
    assert runs["hf"][-1]["eval_greedy_accuracy"] == runs["static"][-1]["eval_greedy_accuracy"]


def test_gradient_checkpointing_recomputes_layers_and_trains_the_same(tmp_path):
    """gradient_checkpointing recomputes each decoder layer in the backward (fewer activations
    kept) and changes nothing else: the same losses and the same weights after two steps."""
    runs, forwards = {}, {}
    for on in (False, True):
        config = tiny.config(tmp_path / str(on), gradient_checkpointing=on, steps=2)
        trainer = LatroTrainer(tiny.model(), tiny.tokenizer(), tiny.examples(8), config)
        calls = [0]
        mlp = trainer.model.model.layers[0].mlp
        forward = mlp.forward

        def counted(*args, forward=forward, calls=calls, **kwargs):
            # Counted in forward itself: the recomputation runs it without module hooks.
            calls[0] += 1
            return forward(*args, **kwargs)

        mlp.forward = counted
        runs[on] = (trainer.train(), [p.detach().clone() for p in trainer.model.parameters()])
        forwards[on] = calls[0]
    # Recomputation runs the layer again for every grad pass.
    assert forwards[True] > forwards[False]
    for a, b in zip(runs[False][0], runs[True][0]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
    for a, b in zip(runs[False][1], runs[True][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _capture_gradients(trainer, monkeypatch, seen: dict) -> None:
    """Replaces the optimizer's step: the step's accumulated gradients go to seen["grads"]."""

    def capture(loss=0.0):
        seen["grads"] = [p.grad.clone() for p in trainer.model.parameters()]
        trainer.optimizer.zero_grad(set_to_none=True)
        return 0.0, True

    monkeypatch.setattr(trainer, "_apply_gradients", capture)


@pytest.mark.parametrize("device", DEVICES)
def test_step_with_known_advantages_takes_the_latro_loss_gradient(tmp_path, monkeypatch, device):
    """Micro-batches of 3 rows do not hold whole groups of 4: the advantages come from a no-grad
    pass first and each micro-batch's gradient is taken in its own scoring pass (loss_weights,
    scaled by the micro-batch's share). Summed over micro-batches, that is the gradient of
    latro_loss over the whole batch by plain autograd. On CUDA the whole step runs there (the
    static decoder's graphs, the native scorers), in float32: under bf16 autocast the
    micro-batches' matmuls (other shapes, other cuBLAS kernels) round differently from the whole
    batch's (the bf16 run of this test failed its 1e-3 tolerance on an H100, 2026-11-26)."""
    config = tiny.config(tmp_path, micro_batch_size=3, penalty_mode="batch_mean", nonstop_penalty=2.0,
                         device=device, bf16="off")
    trainer = LatroTrainer(tiny.model(), tiny.tokenizer(), tiny.examples(16), config)
    seen = {}
    rollout_fn = trainer._rollout
    monkeypatch.setattr(trainer, "_rollout", lambda *a: seen.setdefault("rollout", rollout_fn(*a)))

    _capture_gradients(trainer, monkeypatch, seen)
    trainer.train_step()

    rollout, answers = seen["rollout"]
    rows = torch.arange(rollout.batch_size)
    with torch.no_grad():
        scores = trainer._score(rollout, rows, answers)
    ref = trainer._reference(rollout, rows)
    kw = dict(k=config.k, kl_coef=config.kl_coef, nonstop_penalty=config.nonstop_penalty,
              penalty_mode=config.penalty_mode)
    advantages, _ = batch_advantages(scores.answer_logp, scores.rationale_logp, ref,
                                     rollout.finished, **kw)
    scores = trainer._score(rollout, rows, answers)
    loss, _ = latro_loss(scores.answer_logp, scores.rationale_logp, ref, rollout.finished,
                         sft_weight=config.sft_weight, advantages=advantages, **kw)
    loss.backward()
    # Micro-batches sum in other orders than the whole batch: float32 rounding, relative to
    # gradient entries of up to about 35 here (on the CPU 6e-6 in absolute terms for 2 of 1,024
    # entries of one rollout), and more on CUDA
    rtol, atol = (1e-4, 1e-5) if device == "cpu" else (1e-3, 1e-5)
    for (name, param), got in zip(trainer.model.named_parameters(), seen["grads"]):
        torch.testing.assert_close(got, param.grad, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")
    assert any(g.abs().sum() > 0 for g in seen["grads"])


def _latro_gradient_float64(model, ref_model, rollout, answers, config):
    """The gradient of one LaTRO step written out by hand (LATRO.md) in float64, each row scored
    alone on its unpadded [x, z, y]: rewards log p(y|x,z) (the penalty where z never stopped)
    minus kl_coef (log p(z|x) - log p_ref(z|x)), leave-one-out advantages within each question's
    k samples (no gradient), loss -mean(A log p(z|x)) - sft_weight mean(log p(y|x,z))."""
    model = copy.deepcopy(model).double()
    ref_model = copy.deepcopy(ref_model).double()

    def token_logprobs(m, seq):
        logp = torch.log_softmax(m(input_ids=torch.tensor([seq])).logits[0], -1)
        return logp[:-1].gather(1, torch.tensor(seq[1:])[:, None])[:, 0]

    lz, ly, lz_ref = [], [], []
    for i in range(rollout.batch_size):
        x = rollout.prompt_ids[i][rollout.prompt_mask[i].bool()].tolist()
        z = rollout.rationale_ids[i, : int(rollout.rationale_lengths[i])].tolist()
        tok = token_logprobs(model, x + z + answers[i])  # tok[t - 1]: log p(token t | before)
        lz.append(tok[len(x) - 1 : len(x) - 1 + len(z)].sum())
        ly.append(tok[len(x) - 1 + len(z) :].sum())
        with torch.no_grad():
            lz_ref.append(token_logprobs(ref_model, x + z)[len(x) - 1 :].sum())
    lz, ly, lz_ref = torch.stack(lz), torch.stack(ly), torch.stack(lz_ref)
    answer = ly.detach()
    if config.penalty_mode == "constant":
        penalty = torch.tensor(config.nonstop_penalty, dtype=torch.float64)
    else:  # the reference code's: nonstop_penalty x the batch's mean reward, unfinished rows too
        penalty = config.nonstop_penalty * answer.mean()
    reward = torch.where(rollout.finished, answer, penalty) - config.kl_coef * (lz.detach() - lz_ref)
    r = reward.view(-1, config.k)
    advantage = (r - (r.sum(1, keepdim=True) - r) / (config.k - 1)).view(-1)
    (-(advantage * lz).mean() - config.sft_weight * ly.mean()).backward()
    return [p.grad for p in model.parameters()]


@pytest.mark.parametrize(
    "micro_batch_size,penalty_mode,penalty,micro_batch_tokens",
    [
        (3, "constant", -10.0, 0),
        (3, "batch_mean", 2.0, 0),
        (4, "constant", -10.0, 0),
        (4, "batch_mean", 2.0, 0),
        (8, "constant", -10.0, 200),
    ],
)
def test_a_step_takes_the_gradient_of_the_latro_estimator(
    tmp_path, monkeypatch, micro_batch_size, penalty_mode, penalty, micro_batch_tokens
):
    """End to end against _latro_gradient_float64: a reference that differs from the policy
    (a KL term), rationales that never stopped, stopped early or are empty, sft_weight 0.3; the
    two-pass path (micro-batches of 3), whole groups (4, with the constant penalty) and
    micro-batches cut by a token budget (up to 8 rows: the two-pass path, rows of the two
    groups mixed)."""
    config = tiny.config(tmp_path, micro_batch_size=micro_batch_size, penalty_mode=penalty_mode,
                         nonstop_penalty=penalty, sft_weight=0.3, kl_coef=0.25, bf16="off",
                         max_grad_norm=0.0, micro_batch_tokens=micro_batch_tokens)
    trainer = LatroTrainer(tiny.model(), tiny.tokenizer(), tiny.examples(16), config)
    with torch.no_grad():
        g = torch.Generator().manual_seed(7)
        for p in trainer.ref_model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    policy = copy.deepcopy(trainer.model)
    pad = pad_id(trainer.tokenizer)
    seen = {}
    rollout_fn = trainer._rollout

    def rollout_with_lengths(*args):
        rollout, answers = rollout_fn(*args)
        limit = rollout.rationale_ids.shape[1]
        lengths = torch.tensor([limit, 3, 0, 7, limit, limit, 5, 9])
        cols = torch.arange(limit)[None]
        ids = (cols * 7 + 11) % 36 + 4  # non-pad tokens, cut at each row's length
        ids = ids.expand(len(lengths), -1).masked_fill(cols >= lengths[:, None], pad)
        rollout = dataclasses.replace(rollout, rationale_ids=ids, rationale_lengths=lengths,
                                      finished=lengths < limit)
        seen["rollout"] = rollout, answers
        return rollout, answers

    monkeypatch.setattr(trainer, "_rollout", rollout_with_lengths)
    _capture_gradients(trainer, monkeypatch, seen)
    trainer.train_step()
    want = _latro_gradient_float64(policy, trainer.ref_model, *seen["rollout"], config)
    scale = max(float(w.abs().max()) for w in want)
    for (name, _), got, w in zip(trainer.model.named_parameters(), seen["grads"], want):
        torch.testing.assert_close(got.double(), w, rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("micro_batch_tokens", [0, 200])
def test_known_advantages_micro_batches_take_rows_of_similar_length(
    tmp_path, monkeypatch, micro_batch_tokens
):
    """A micro-batch is as wide as its longest row. With the advantages known any rows may share
    one, so the gradient pass takes the rows in order of length: no row of a micro-batch is
    longer than a row of the next, and every row comes once. With micro_batch_tokens a
    micro-batch's rows x its longest row stay within the budget (a longer row alone), and the
    no-grad passes take four times the rows and tokens."""
    config = tiny.config(tmp_path, micro_batch_size=3, penalty_mode="batch_mean", nonstop_penalty=2.0,
                         micro_batch_tokens=micro_batch_tokens)
    trainer = LatroTrainer(tiny.model(), tiny.tokenizer(), tiny.examples(16), config)
    seen: dict = {"batches": [], "no_grad": []}
    rollout_fn, score_fn = trainer._rollout, trainer._score
    monkeypatch.setattr(trainer, "_rollout", lambda *a: seen.setdefault("rollout", rollout_fn(*a)))

    def score(rollout, rows, answers, weights=None, **kwargs):
        if weights is not None:  # the gradient pass's calls
            seen["batches"].append(rows.tolist())
        else:
            seen["no_grad"].append(kwargs)
        return score_fn(rollout, rows, answers, weights=weights, **kwargs)

    monkeypatch.setattr(trainer, "_score", score)
    trainer.train_step()
    rollout, answers = seen["rollout"]
    # the scored rows' tokens: [x, z, y]
    lengths = [int(p + r) + len(a) for p, r, a in
               zip(rollout.prompt_mask.sum(-1), rollout.rationale_lengths, answers)]
    assert len(set(lengths)) > 1, "the rollout's rows all have one length: nothing to order"
    batches = seen["batches"]
    assert sorted(i for b in batches for i in b) == list(range(rollout.batch_size))
    for this, after in zip(batches, batches[1:]):
        assert max(lengths[i] for i in this) <= min(lengths[i] for i in after)
    assert all(len(b) <= 3 for b in batches)
    assert seen["no_grad"] == [{"micro_batch_size": 12, "max_tokens": 4 * micro_batch_tokens}]
    if micro_batch_tokens:
        assert any(len(b) < 3 for b in batches[:-1]), "the budget never cut a micro-batch"
        for b in batches:
            assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= micro_batch_tokens


@pytest.mark.parametrize(
    "lengths,want",
    [
        ([100] * 16, None),  # one length: one forward
        ([10] * 12 + [100] * 4, 4),  # three quarters short: split
        ([90, 95, 100, 100] * 4, None),  # under a fifth saved
        ([5, 100], 1),  # fewer rows than parts: a row per forward
        ([7], None),
        ([], None),
    ],
)
def test_rows_per_forward_splits_only_where_it_saves_padding(lengths, want):
    assert rows_per_forward(lengths) == want


def test_whole_group_micro_batches_split_their_forward_by_length(tmp_path, monkeypatch):
    """Micro-batches of whole groups get their rewards from their own pass, so each is scored
    before its loss; where rationale lengths differ its forward runs in parts of rows of
    similar length (forced here for every micro-batch). The gradient is the one of a single
    forward over the micro-batch."""
    config = tiny.config(tmp_path, micro_batch_size=8, bf16="off")  # both groups in one
    trainer = LatroTrainer(tiny.model(), tiny.tokenizer(), tiny.examples(16), config)
    monkeypatch.setattr(trainer_module, "MIN_PADDING_SAVED", -1.0)  # split wherever it can
    seen: dict = {"sizes": []}
    rollout_fn, score_fn = trainer._rollout, trainer._score
    monkeypatch.setattr(trainer, "_rollout", lambda *a: seen.setdefault("rollout", rollout_fn(*a)))

    def score(rollout, rows, answers, micro_batch_size=None, **kwargs):
        if torch.is_grad_enabled():
            seen["sizes"].append(micro_batch_size)
        return score_fn(rollout, rows, answers, micro_batch_size=micro_batch_size, **kwargs)

    monkeypatch.setattr(trainer, "_score", score)
    _capture_gradients(trainer, monkeypatch, seen)
    trainer.train_step()
    assert seen["sizes"] == [2]  # 8 rows in four forwards

    rollout, answers = seen["rollout"]
    rows = torch.arange(rollout.batch_size)
    ref = trainer._reference(rollout, rows)
    scores = score_fn(rollout, rows, answers)  # one forward
    loss, _ = latro_loss(scores.answer_logp, scores.rationale_logp, ref, rollout.finished,
                         k=config.k, kl_coef=config.kl_coef, sft_weight=config.sft_weight,
                         nonstop_penalty=config.nonstop_penalty, penalty_mode=config.penalty_mode)
    loss.backward()
    for (name, param), got in zip(trainer.model.named_parameters(), seen["grads"]):
        # float32 sums over other row groupings (measured: 2.4e-6 on one element of 1,280)
        torch.testing.assert_close(got, param.grad, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")
    assert any(g.abs().sum() > 0 for g in seen["grads"])


def test_whole_group_micro_batches_report_the_batchs_reward_stats(tmp_path):
    """Micro-batches of one group each compute their own rewards; the step's reward and
    advantage stats are still the whole batch's (a std or max is not the mean of two groups'),
    as micro-batches of 3 rows (advantages from the no-grad pass over the batch) report them."""
    records = {}
    for mb in (4, 3):
        config = tiny.config(tmp_path / str(mb), micro_batch_size=mb, steps=1, bf16="off")
        records[mb] = LatroTrainer(tiny.model(), tiny.tokenizer(), tiny.examples(8), config).train()[0]
    keys = ("reward_mean", "reward_std", "advantage_std", "advantage_abs_max", "kl_mean",
            "answer_logp_mean", "finished_frac", "advantage_abs_mean", "loss")
    for key in keys:
        assert records[4][key] == pytest.approx(records[3][key], rel=1e-4, abs=1e-5), key
    assert records[4]["reward_std"] > 0 and records[4]["advantage_abs_max"] > 0


def test_the_reference_scores_a_step_in_one_pass(tmp_path, monkeypatch):
    """With micro-batches of whole groups too: one pass over all rows (one upload of a
    reference kept on the host per step, not one per micro-batch)."""
    for mb in (4, 3):
        config = tiny.config(tmp_path / str(mb), micro_batch_size=mb, steps=1)
        trainer = LatroTrainer(tiny.model(), tiny.tokenizer(), tiny.examples(8), config)
        calls = []
        reference = trainer._reference
        def counted(rollout, rows, calls=calls, reference=reference):
            calls.append(len(rows))
            return reference(rollout, rows)

        monkeypatch.setattr(trainer, "_reference", counted)
        trainer.train_step()
        assert calls == [config.rollout_batch_size], mb


@pytest.mark.parametrize("micro_batch_size,weighted", [(3, True), (4, False)])
def test_scoring_pass_takes_the_gradient_when_the_advantages_are_known(
    tmp_path, monkeypatch, micro_batch_size, weighted
):
    """Micro-batches of 3 (not whole groups of 4): every gradient pass goes through
    ops.linear_weighted_logprob_sum (three LM-head matmuls); whole groups compute their rewards
    in the pass and go through ops.linear_token_logprobs' autograd instead."""
    from latro_engine import ops

    calls = {"weighted": 0, "grad_plain": 0}
    weighted_op, plain_op = ops.linear_weighted_logprob_sum, ops.linear_token_logprobs

    def count_weighted(*args, **kwargs):
        calls["weighted"] += 1
        return weighted_op(*args, **kwargs)

    def count_plain(*args, **kwargs):
        calls["grad_plain"] += torch.is_grad_enabled()
        return plain_op(*args, **kwargs)

    monkeypatch.setattr(ops, "linear_weighted_logprob_sum", count_weighted)
    monkeypatch.setattr(ops, "linear_token_logprobs", count_plain)
    config = tiny.config(tmp_path, micro_batch_size=micro_batch_size, device="cpu")
    LatroTrainer(tiny.model(), tiny.tokenizer(), tiny.examples(16), config).train_step()
    micro_batches = -(-config.k * config.prompts_per_step // micro_batch_size)
    if weighted:
        assert calls == {"weighted": micro_batches, "grad_plain": 0}
    else:
        assert calls["weighted"] == 0 and calls["grad_plain"] == micro_batches


def test_backward_passes_run_under_the_scoring_attention(tmp_path, monkeypatch):
    """The LaTRO and SFT steps run their backward inside scoring_attention, so the recompute of
    activation checkpointing uses the kernels the scoring forwards chose (on CUDA: SDPA without
    cuDNN), not torch's default."""
    depth = {"now": 0}
    seen: list[bool] = []

    @contextlib.contextmanager
    def recorder(device):
        depth["now"] += 1
        try:
            yield
        finally:
            depth["now"] -= 1

    real_backward = torch.autograd.backward

    def spy(*args, **kwargs):
        seen.append(depth["now"] > 0)
        return real_backward(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "scoring_attention", recorder)
    monkeypatch.setattr(torch.autograd, "backward", spy)
    for cls in (LatroTrainer, SFTTrainer):
        seen.clear()
        config = tiny.config(tmp_path / cls.name, steps=1, micro_batch_size=3)
        cls(tiny.model(), tiny.tokenizer(), tiny.examples(8), config).train()
        assert seen and all(seen), (cls.name, seen)

"""Single-pass scoring against plain per-sequence full-logit computations."""

from __future__ import annotations

import copy
from contextlib import contextmanager

import pytest
import torch
import transformers

from latro_engine import scoring
from latro_engine.rollout import Rollout
from latro_engine.scoring import (
    length_batches,
    pack_sequences,
    reference_logprobs,
    score_reference,
    score_rollout,
    score_sequences,
)

PAD, VOCAB = 0, 29


pytestmark = pytest.mark.usefixtures("one_thread")


def _llama(seed: int = 0, **extra) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD, **extra,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def llama() -> transformers.LlamaForCausalLM:
    return _llama()


# prompts of different lengths, rationales including empty ones, answers of different lengths
PROMPTS = [[1, 5, 6, 7], [1, 9], [1, 3, 4, 8, 10, 12], [1, 14]]
RATIONALES = [[11, 12, 13], [], [15, 16, 17, 18, 19], [20]]
ANSWERS = [[21, 22, 2], [23, 2], [24, 25, 26, 2], [2]]


def _inputs(prompts=PROMPTS, rationales=RATIONALES):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    r_width = max(max(len(r) for r in rationales), 1)
    r_ids = torch.tensor([r + [PAD] * (r_width - len(r)) for r in rationales])
    r_len = torch.tensor([len(r) for r in rationales])
    return ids, mask, r_ids, r_len


def _plain_sum(model, context: list[int], target: list[int], dtype=torch.float64) -> torch.Tensor:
    """sum log p(target | context) from model(...) full logits on the unpadded sequence."""
    if not target:
        return torch.zeros((), dtype=dtype)
    seq = torch.tensor([context + target])
    logits = model(input_ids=seq).logits[0, len(context) - 1: -1].to(dtype)
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(target)[:, None]).sum()


def _oracle(model, dtype=torch.float64):
    z = torch.stack([_plain_sum(model, p, r, dtype) for p, r in zip(PROMPTS, RATIONALES)])
    y = torch.stack([_plain_sum(model, p + r, a, dtype) for p, r, a in zip(PROMPTS, RATIONALES, ANSWERS)])
    return z, y


def test_pack_sequences_right_pads_and_concatenates():
    """Every row starts at column 0 (so every query of the attention sees at least its row's
    first token: no row of the attention is fully masked) and pads go on the right."""
    ids, mask, r_ids, r_len = _inputs()
    a_ids = torch.tensor([a + [PAD] * (4 - len(a)) for a in ANSWERS])
    a_len = torch.tensor([len(a) for a in ANSWERS])
    packed, pmask, r_start, a_start = pack_sequences(ids, mask, r_ids, r_len, a_ids, a_len, PAD)
    width = packed.shape[1]
    assert width == max(len(p + r + a) for p, r, a in zip(PROMPTS, RATIONALES, ANSWERS))
    for row in range(len(PROMPTS)):
        want = PROMPTS[row] + RATIONALES[row] + ANSWERS[row]
        assert packed[row].tolist() == want + [PAD] * (width - len(want))
        assert pmask[row].tolist() == [1] * len(want) + [0] * (width - len(want))
        assert int(r_start[row]) == len(PROMPTS[row])
        assert int(a_start[row]) == int(r_start[row]) + len(RATIONALES[row])


@pytest.mark.parametrize("fast_path", [None, True, False])
def test_single_pass_matches_separate_sequences(llama, fast_path):
    ids, mask, r_ids, r_len = _inputs()
    with torch.no_grad():
        got = score_sequences(llama, ids, mask, r_ids, r_len, ANSWERS, fast_path=fast_path)
        want_z, want_y = _oracle(copy.deepcopy(llama).double())
    assert got.rationale_logp.dtype == torch.float32
    torch.testing.assert_close(got.rationale_logp.double(), want_z, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(got.answer_logp.double(), want_y, rtol=1e-5, atol=2e-5)
    assert got.rationale_logp[1] == 0  # empty rationale
    assert got.rationale_tokens.tolist() == [3, 0, 5, 1]
    assert got.answer_tokens.tolist() == [3, 2, 4, 1]


def test_gradients_match_plain_torch(llama):
    ids, mask, r_ids, r_len = _inputs()
    weights = torch.tensor([0.7, -1.3, 0.4, 2.0])  # advantage-like per-row weights
    llama.zero_grad()
    got = score_sequences(llama, ids, mask, r_ids, r_len, ANSWERS)
    (weights * got.rationale_logp + got.answer_logp).sum().backward()
    mine = {n: p.grad.clone() for n, p in llama.named_parameters()}
    llama.zero_grad()
    z, y = _oracle(llama, dtype=torch.float32)
    (weights * z + y).sum().backward()
    for name, param in llama.named_parameters():
        torch.testing.assert_close(mine[name], param.grad, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    assert any(g.abs().sum() > 0 for g in mine.values())
    llama.zero_grad()


@pytest.mark.parametrize("fast_path", [True, False])
@pytest.mark.parametrize("micro_batch_size", [None, 3])
def test_loss_weights_take_the_gradient_in_the_pass(llama, fast_path, micro_batch_size):
    """With loss_weights the pass returns sum_b rw_b z_b + aw_b y_b and its gradient (taken in
    the forward on the fast path): the same as autograd through the plain sums."""
    ids, mask, r_ids, r_len = _inputs()
    rationale_w, answer_w = torch.tensor([0.7, -1.3, 0.4, 2.0]), torch.tensor([-0.5, 1.5, 0.25, -1.0])
    kw = dict(fast_path=fast_path, micro_batch_size=micro_batch_size)
    llama.zero_grad()
    got = score_sequences(llama, ids, mask, r_ids, r_len, ANSWERS, loss_weights=(rationale_w, answer_w), **kw)
    assert not got.rationale_logp.requires_grad and not got.answer_logp.requires_grad
    got.loss.backward()
    mine = {n: p.grad.clone() for n, p in llama.named_parameters()}
    llama.zero_grad()
    plain = score_sequences(llama, ids, mask, r_ids, r_len, ANSWERS, **kw)
    expected = (rationale_w * plain.rationale_logp + answer_w * plain.answer_logp).sum()
    expected.backward()
    torch.testing.assert_close(got.loss, expected.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.rationale_logp, plain.rationale_logp.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.answer_logp, plain.answer_logp.detach(), rtol=1e-5, atol=1e-5)
    for name, param in llama.named_parameters():
        torch.testing.assert_close(mine[name], param.grad, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    llama.zero_grad()


def test_loss_weights_must_be_two_rows_long_tensors(llama):
    ids, mask, r_ids, r_len = _inputs()
    for bad in ((torch.ones(4),), (torch.ones(4), torch.ones(3)), (torch.ones(4), [1.0] * 4)):
        with pytest.raises(ValueError, match="loss_weights must be"):
            score_sequences(llama, ids, mask, r_ids, r_len, ANSWERS, loss_weights=bad)


def test_bad_inputs_raise_errors_naming_the_argument(llama):
    ids, mask, r_ids, r_len = _inputs()  # 4 rows, rationales 5 wide
    a_ids = torch.tensor([a + [PAD] * (4 - len(a)) for a in ANSWERS])
    a_len = torch.tensor([len(a) for a in ANSWERS])
    cases = [
        # lengths past the width would score pad columns; negative ones would index out of range
        (dict(rationale_lengths=torch.tensor([3, 0, 6, 1])), ValueError,
         r"rationale_lengths must be in \[0, 5\] \(the width of rationale_ids\), got 6 for row 2"),
        (dict(rationale_lengths=torch.tensor([-1, 0, 5, 1])), ValueError,
         r"rationale_lengths must be in \[0, 5\].*got -1 for row 0"),
        (dict(rationale_lengths=r_len[:1]), ValueError,  # would broadcast
         r"rationale_lengths must have shape \[4\], got \[1\]"),
        (dict(rationale_lengths=r_len.float()), TypeError, "rationale_lengths must be an integer tensor"),
        (dict(rationale_lengths=r_len.tolist()), TypeError, "rationale_lengths must be an integer tensor, got list"),
        (dict(rationale_ids=r_ids[:3]), ValueError, r"rationale_ids must be \[B, L\] with B = 4.*got \[3, 5\]"),
        (dict(rationale_ids=r_ids.float()), TypeError, "rationale_ids must be an integer tensor"),
        (dict(rationale_ids=r_ids.to("meta")), ValueError, "rationale_ids is on meta but prompt_ids is on cpu"),
        (dict(prompt_mask=mask[:, 1:]), ValueError, r"prompt_ids and prompt_mask must both be \[B, P\]"),
        (dict(prompt_mask=mask.to("meta")), ValueError, "prompt_mask is on meta"),
        (dict(prompt_mask=mask * 2), ValueError, "prompt_mask must hold only 0"),
        (dict(answer_ids=a_ids, answer_lengths=torch.tensor([3, 2, 5, 1])), ValueError,
         r"answer_lengths must be in \[0, 4\] \(the width of answer_ids\), got 5 for row 2"),
        (dict(answer_ids=a_ids, answer_lengths=torch.tensor([3, -2, 4, 1])), ValueError,
         r"answer_lengths must be in \[0, 4\].*got -2 for row 1"),
        (dict(answer_ids=a_ids, answer_lengths=a_len[:1]), ValueError, r"answer_lengths must have shape \[4\]"),
        (dict(answer_ids=a_ids, answer_lengths=a_len.float()), TypeError, "answer_lengths must be an integer"),
        (dict(answer_ids=a_ids.float()), TypeError, "answer_ids must be an integer tensor"),
        # token lists carry their own lengths: answer_lengths beside them was silently ignored
        (dict(answer_ids=ANSWERS, answer_lengths=a_len), ValueError,
         "answer_lengths is only for a right-padded answer_ids tensor, got answer_ids as token lists"),
        (dict(answer_lengths=a_len), ValueError, "answer_lengths is only for.*got answer_ids as None"),
        (dict(micro_batch_size=-1), ValueError, "micro_batch_size must be >= 1"),
        (dict(max_tokens=-5), ValueError, r"max_tokens must be >= 1 \(None or 0: no limit\), got -5"),
        (dict(answer_ids=ANSWERS[:2], group_size=0), ValueError, "group_size must be >= 1, got 0"),
    ]
    good = dict(prompt_ids=ids, prompt_mask=mask, rationale_ids=r_ids, rationale_lengths=r_len)
    for change, error, match in cases:
        with pytest.raises(error, match=match), torch.no_grad():
            score_sequences(llama, **{**good, **change})
    with torch.no_grad():  # any integer dtype; lengths at the widths; micro_batch_size 0: all rows
        want = score_sequences(llama, ids, mask, r_ids, r_len, a_ids, a_len)
        got = score_sequences(llama, ids, mask, r_ids.int(), r_len.int(), a_ids.int(), a_len.int(),
                              micro_batch_size=0)
    torch.testing.assert_close(got.rationale_logp, want.rationale_logp)
    torch.testing.assert_close(got.answer_logp, want.answer_logp)


def test_micro_batches_equal_one_batch(llama, monkeypatch):
    """By rows, by tokens and by both: the same sums in the input order as one forward, and
    every forward within its limits."""
    prompts, rationales = PROMPTS * 2, RATIONALES[::-1] * 2
    answers = ANSWERS * 2
    ids, mask, r_ids, r_len = _inputs(prompts, rationales)
    widths: list[tuple[int, int]] = []
    score_batch = scoring._score_batch

    def recorded(model, ids, mask, *args):
        widths.append((ids.shape[0], int(mask.sum(-1).max())))
        return score_batch(model, ids, mask, *args)

    with torch.no_grad():
        whole = score_sequences(llama, ids, mask, r_ids, r_len, answers)
        monkeypatch.setattr(scoring, "_score_batch", recorded)
        for size, tokens in ((1, None), (3, None), (5, None), (None, 40), (None, 1), (3, 45)):
            widths.clear()
            part = score_sequences(llama, ids, mask, r_ids, r_len, answers, micro_batch_size=size,
                                   max_tokens=tokens)
            torch.testing.assert_close(part.rationale_logp, whole.rationale_logp, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(part.answer_logp, whole.answer_logp, rtol=1e-5, atol=1e-5)
            assert sum(rows for rows, _ in widths) == len(prompts)
            assert len(widths) > 1, (size, tokens)
            for rows, longest in widths:
                assert rows <= (size or rows)
                if tokens:
                    assert rows == 1 or rows * longest <= tokens, (size, tokens)


@pytest.mark.parametrize(
    "lengths,max_rows,max_tokens,want",
    [
        ([5, 3, 9, 3], None, None, [[1, 3, 0, 2]]),  # by length, stable
        ([5, 3, 9, 3], 3, None, [[1, 3, 0], [2]]),
        ([5, 3, 9, 3], None, 10, [[1, 3], [0], [2]]),  # 3 x 5 > 10; 9 alone
        ([5, 3, 9, 3], 0, 0, [[1, 3, 0, 2]]),  # 0: no limit
        ([20, 2, 2, 2, 2], 3, 8, [[1, 2, 3], [4], [0]]),  # rows first, a row over the budget alone
        ([], 4, 100, []),
    ],
)
def test_length_batches(lengths, max_rows, max_tokens, want):
    assert length_batches(lengths, max_rows, max_tokens) == want


def test_length_batches_count_the_width_a_forward_runs_at():
    """On CUDA a forward over rows of 33 or 40 tokens runs 96 wide (whole steps of 32, never
    64 mod 128: scoring._attention_width): the budget counts that, not the tokens."""
    assert length_batches([33, 20, 40], None, 200) == [[1, 0, 2]]
    assert length_batches([33, 20, 40], None, 200, torch.device("cpu")) == [[1, 0, 2]]
    assert length_batches([33, 20, 40], None, 200, torch.device("cuda")) == [[1, 0], [2]]


def test_rollout_with_per_prompt_answers_and_no_answer(llama):
    ids, mask, r_ids, r_len = _inputs()
    k = 2
    rollout = Rollout(
        prompt_ids=ids.repeat_interleave(k, 0), prompt_mask=mask.repeat_interleave(k, 0),
        rationale_ids=r_ids.repeat_interleave(k, 0), rationale_lengths=r_len.repeat_interleave(k, 0),
        finished=torch.ones(len(PROMPTS) * k, dtype=torch.bool),
        sample_logprobs=torch.zeros(r_ids.repeat_interleave(k, 0).shape), group_size=k,
    )
    with torch.no_grad():
        per_row = score_sequences(llama, ids, mask, r_ids, r_len, ANSWERS)
        grouped = score_rollout(llama, rollout, ANSWERS)
        only_z = score_reference(llama, ids, mask, r_ids, r_len)
    torch.testing.assert_close(grouped.answer_logp, per_row.answer_logp.repeat_interleave(k))
    torch.testing.assert_close(only_z.rationale_logp, per_row.rationale_logp, rtol=1e-5, atol=1e-5)
    assert bool((only_z.answer_logp == 0).all()) and not only_z.rationale_logp.requires_grad
    # a right-padded answer tensor with lengths is accepted too
    a_ids = torch.tensor([a + [PAD] * (4 - len(a)) for a in ANSWERS])
    a_len = torch.tensor([len(a) for a in ANSWERS])
    with torch.no_grad():
        tensor_form = score_sequences(llama, ids, mask, r_ids, r_len, a_ids, a_len)
    torch.testing.assert_close(tensor_form.answer_logp, per_row.answer_logp)


class _CappedLlama(transformers.LlamaForCausalLM):
    """Transforms its logits in forward without saying so in the config: only the probe sees it."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = 3.0 * torch.tanh(out.logits / 3.0)
        return out


def test_transformed_logits_fall_back_to_full_logits():
    torch.manual_seed(1)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD,
    )
    model = _CappedLlama(config).eval()
    torch.nn.init.normal_(model.lm_head.weight, std=2.0)  # logits well beyond the cap
    ids, mask, r_ids, r_len = _inputs()
    with torch.no_grad():
        auto = score_sequences(model, ids, mask, r_ids, r_len, ANSWERS)
        fast = score_sequences(model, ids, mask, r_ids, r_len, ANSWERS, fast_path=True)
        want_z, want_y = _oracle(model)
    torch.testing.assert_close(auto.answer_logp.double(), want_y, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(auto.rationale_logp.double(), want_z, rtol=1e-5, atol=2e-5)
    assert not torch.allclose(fast.answer_logp.double(), want_y, atol=1e-2)


def test_softcapping_config_selects_full_logits():
    gemma = pytest.importorskip("transformers.models.gemma2")
    torch.manual_seed(2)
    config = gemma.Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=PAD,
        final_logit_softcapping=1.0,
    )
    model = gemma.Gemma2ForCausalLM(config).eval()
    ids, mask, r_ids, r_len = _inputs()
    with torch.no_grad():
        auto = score_sequences(model, ids, mask, r_ids, r_len, ANSWERS)
        want_z, want_y = _oracle(model)
    torch.testing.assert_close(auto.answer_logp.double(), want_y, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(auto.rationale_logp.double(), want_z, rtol=1e-5, atol=2e-5)


class _AdapterLlama(transformers.LlamaForCausalLM):
    """peft's interface without peft: ``disable_adapter()`` restores the base LM head."""

    def attach_adapter(self, delta: torch.Tensor) -> None:
        self.delta = delta
        with torch.no_grad():
            self.lm_head.weight += delta

    @contextmanager
    def disable_adapter(self):
        with torch.no_grad():
            self.lm_head.weight -= self.delta
        try:
            yield
        finally:
            with torch.no_grad():
                self.lm_head.weight += self.delta


def test_reference_logprobs_with_ref_model_or_disabled_adapter():
    base = _llama(seed=3)
    policy = _AdapterLlama(base.config).eval()
    policy.load_state_dict(base.state_dict())
    policy.attach_adapter(0.5 * torch.randn_like(policy.lm_head.weight))
    ids, mask, r_ids, r_len = _inputs()
    with torch.no_grad():
        want = score_sequences(base, ids, mask, r_ids, r_len).rationale_logp
        tuned = score_sequences(policy, ids, mask, r_ids, r_len).rationale_logp
    via_ref = reference_logprobs(policy, base, ids, mask, r_ids, r_len).rationale_logp
    via_adapter = reference_logprobs(policy, None, ids, mask, r_ids, r_len).rationale_logp
    torch.testing.assert_close(via_ref, want)
    torch.testing.assert_close(via_adapter, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(tuned, want, atol=1e-3)
    with torch.no_grad():  # adapter back on afterwards
        torch.testing.assert_close(score_sequences(policy, ids, mask, r_ids, r_len).rationale_logp, tuned)
    with pytest.raises(ValueError, match="reference"):
        reference_logprobs(base, None, ids, mask, r_ids, r_len)


def test_reference_logprobs_with_peft_lora():
    peft = pytest.importorskip("peft")
    base = _llama(seed=4)
    policy = peft.get_peft_model(_llama(seed=4), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for name, param in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    ids, mask, r_ids, r_len = _inputs()
    with torch.no_grad():
        want = score_sequences(base, ids, mask, r_ids, r_len, ANSWERS)
        tuned = score_sequences(policy, ids, mask, r_ids, r_len, ANSWERS)
    got = reference_logprobs(policy, None, ids, mask, r_ids, r_len, ANSWERS)
    torch.testing.assert_close(got.rationale_logp, want.rationale_logp, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(tuned.rationale_logp, want.rationale_logp, atol=1e-3)


def test_attention_widths_on_cuda_avoid_the_cudnn_nan_length():
    """On CUDA every scoring forward runs at a whole number of 32-token steps that is never 64
    mod 128 (pytorch/pytorch#196678: cuDNN's NaN query gradients), the least such width; the CPU
    keeps the rows' own width."""
    from latro_engine.scoring import ATTENTION_WIDTH_STEP, _attention_width

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    widths = [_attention_width(w, cuda) for w in range(1, 1200)]
    for w, got in zip(range(1, 1200), widths):
        assert got >= w and got % ATTENTION_WIDTH_STEP == 0 and got % 128 != 64, (w, got)
        assert not any(w <= less < got and less % 32 == 0 and less % 128 != 64
                       for less in range(w, got)), (w, got)  # the least such width
    assert widths == sorted(widths)  # a micro-batch's width never passes its batch's
    assert _attention_width(0, cuda) == 0
    assert [_attention_width(w, cpu) for w in (1, 64, 65, 192)] == [1, 64, 65, 192]


@pytest.mark.parametrize("micro_batch_size", [None, 3])
def test_extra_padding_of_the_cuda_widths_leaves_scores_and_gradients_alone(
    llama, micro_batch_size, monkeypatch
):
    """The columns _attention_width adds are padding: the same sums and the same gradient (run
    on the CPU with the CUDA rule forced)."""
    from latro_engine import scoring

    model = copy.deepcopy(llama).double()
    prompts, rationales = PROMPTS * 2, RATIONALES[::-1] * 2
    ids, mask, r_ids, r_len = _inputs(prompts, rationales)
    weights = (torch.linspace(-1, 1, len(prompts)), torch.ones(len(prompts)))

    def run():
        model.zero_grad(set_to_none=True)
        out = score_sequences(model, ids, mask, r_ids, r_len, ANSWERS * 2,
                              micro_batch_size=micro_batch_size, loss_weights=weights)
        out.loss.backward()
        return out, [p.grad.clone() for p in model.parameters()]

    plain, plain_grads = run()
    widths, rule = [], scoring._attention_width

    def cuda_rule(width, device):
        widths.append(width)
        return rule(width, torch.device("cuda"))

    with monkeypatch.context() as patch:
        patch.setattr(scoring, "_attention_width", cuda_rule)
        padded, padded_grads = run()
    assert widths and all(w < 32 for w in widths)  # every forward took columns of padding
    torch.testing.assert_close(padded.rationale_logp, plain.rationale_logp)
    torch.testing.assert_close(padded.answer_logp, plain.answer_logp)
    torch.testing.assert_close(padded.loss, plain.loss)
    for a, b in zip(padded_grads, plain_grads):
        torch.testing.assert_close(a, b)


def test_scoring_attention_leaves_out_cudnn_on_cuda_only(monkeypatch):
    """On CUDA the scoring forwards (and the trainer's backwards) run SDPA without its cuDNN
    backend, unless LATRO_SCORING_ATTENTION=default; on the CPU nothing changes. The flags are
    torch's global ones, restored after the block (they can be read without a GPU)."""
    from latro_engine.scoring import SCORING_ATTENTION_ENV, scoring_attention

    flags = torch.backends.cuda
    before = (flags.cudnn_sdp_enabled(), flags.flash_sdp_enabled(), flags.mem_efficient_sdp_enabled(),
              flags.math_sdp_enabled())
    assert before[0], "torch's default enables cuDNN attention"
    monkeypatch.delenv(SCORING_ATTENTION_ENV, raising=False)
    with scoring_attention(torch.device("cuda")):
        assert not flags.cudnn_sdp_enabled()
        assert flags.flash_sdp_enabled() and flags.mem_efficient_sdp_enabled() and flags.math_sdp_enabled()
    with scoring_attention(torch.device("cpu")):
        assert flags.cudnn_sdp_enabled()
    monkeypatch.setenv(SCORING_ATTENTION_ENV, "default")
    with scoring_attention(torch.device("cuda")):
        assert flags.cudnn_sdp_enabled()
    after = (flags.cudnn_sdp_enabled(), flags.flash_sdp_enabled(), flags.mem_efficient_sdp_enabled(),
             flags.math_sdp_enabled())
    assert after == before

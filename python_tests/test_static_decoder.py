"""The static-cache decoder gives the generic loop's rollouts (CPU here; CUDA graphs in
test_cuda_ops.py): model families, padding, stops, row buckets, LoRA, weight updates."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import transformers
from conftest import backends_for, requires_native

from latro_engine import static_decoder
from latro_engine.rollout import sample_rationales

PAD = 23


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(kind: str = "llama", seed: int = 0, **extra) -> torch.nn.Module:
    shape = dict(
        vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD, bos_token_id=1,
        eos_token_id=2, **extra,
    )
    config = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,  # q/k/v biases
        "phi3": transformers.Phi3Config,  # fused qkv_proj and gate_up_proj
        "qwen3": transformers.Qwen3Config,  # an RMSNorm per query / key head
    }[kind](**shape)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # biases start at zero and norm weights at one; make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
            elif name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    # float64: a flipped draw from rounding differences is practically impossible
    return model.double().eval()


PROMPTS = [[1, 5, 6, 7], [1, 9], [1, 3, 4, 8, 10, 12], [1, 14, 15]]
# Phi-3.5's rotary embeddings, scaled down: per-frequency short factors within the original
# context (the decoder's case), long ones beyond it, and an attention scaling from their ratio.
LONGROPE = {
    "max_position_embeddings": 512,
    "original_max_position_embeddings": 64,
    "rope_scaling": {
        "type": "longrope",
        "short_factor": [1.0, 1.3, 1.7, 2.9],
        "long_factor": [2.0, 3.0, 5.0, 9.0],
    },
}


def _prompts(prompts=PROMPTS):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def _both(model, prompts=PROMPTS, decoders=("hf", "static"), **kw):
    """The rollouts of the two decoders, run in the order given."""
    ids, mask = _prompts(prompts)
    kw = {"k": 5, "max_new_tokens": 30, "stop_sequences": [[2], [7, 8]], "pad_token_id": PAD,
          "seed": 123, **kw}
    return tuple(sample_rationales(model, ids, mask, decoder=d, **kw) for d in decoders)


def _assert_same(a, b):
    assert torch.equal(a.rationale_ids, b.rationale_ids)
    assert torch.equal(a.rationale_lengths, b.rationale_lengths)
    assert torch.equal(a.finished, b.finished)
    assert torch.equal(a.stop_index, b.stop_index)
    assert torch.allclose(a.sample_logprobs, b.sample_logprobs, atol=1e-5)
    assert torch.equal(a.prompt_ids, b.prompt_ids)


@pytest.mark.parametrize(
    "kind,extra",
    [("llama", {}), ("mistral", {}), ("qwen2", {}), ("llama", {"tie_word_embeddings": True}),
     ("llama", {"attention_bias": True, "mlp_bias": True, "head_dim": 16}), ("phi3", {}),
     ("phi3", LONGROPE), ("qwen3", {}), ("qwen3", {"head_dim": 16})],
)
def test_same_rollouts_as_the_generic_loop(kind, extra):
    model = _model(kind, **extra)
    assert static_decoder.static_decoder_unsupported(model) is None
    hf, static = _both(model)
    assert hf.finished.any() and not hf.finished.all()
    _assert_same(hf, static)


def test_rotary_frequencies_are_the_buffer_the_forward_uses():
    """Outside longrope the forward reads inv_freq; transformers 4.x kept original_inv_freq as
    an uncast copy, stale after model.to(bfloat16): the decoder must not read it."""
    model = _model()
    rotary = model.model.rotary_emb
    rotary.original_inv_freq = rotary.inv_freq * 1.5  # stale, as a 4.x copy can be
    _assert_same(*_both(model))


def test_longrope_uses_the_short_factors_within_the_original_context():
    """A forward past the original context leaves Hugging Face's inv_freq buffer on the long
    factors; rollouts within that context still use the short ones, as the model's own forward
    over them does. Past it the decoder declines (its forward would switch factors)."""
    model = _model("phi3", **LONGROPE)
    with torch.no_grad():
        model(torch.ones(1, 80, dtype=torch.long))  # 80 > 64: long factors
    rotary = model.model.rotary_emb
    assert not torch.equal(rotary.inv_freq, rotary.original_inv_freq)
    static, hf = _both(model, decoders=("static", "hf"))  # the static decoder is built first
    assert hf.finished.any() and not hf.finished.all()
    _assert_same(hf, static)
    assert static_decoder.static_decoder_unsupported(model, 64) is None
    assert "original context 64" in static_decoder.static_decoder_unsupported(model, 65)
    partial = _model("phi3", partial_rotary_factor=0.5)
    assert static_decoder.static_decoder_unsupported(partial) == "partial rotary embeddings"


# phi3: q, k, v are views of one matmul; qwen3: its head norms through ops.rms_norm
@pytest.mark.parametrize("kind", ["llama", "phi3", "qwen3"])
@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_float32_rollouts_through_the_attention_op(backend, kind, use_backend, monkeypatch):
    """In float32 the decode step's attention is ops.decode_attention on the chosen backend
    (the float64 tests above run its reference): the generic loop's rollouts still come out."""
    use_backend(backend)
    calls = []
    op = static_decoder.ops.decode_attention

    def spy(query, *args, **kw):
        calls.append(query.dtype)
        return op(query, *args, **kw)

    monkeypatch.setattr(static_decoder.ops, "decode_attention", spy)
    model = _model(kind).float()
    hf, static = _both(model)
    assert calls and set(calls) == {torch.float32}
    assert hf.finished.any() and not hf.finished.all()
    assert torch.equal(hf.rationale_ids, static.rationale_ids)
    assert torch.equal(hf.finished, static.finished)
    torch.testing.assert_close(hf.sample_logprobs, static.sample_logprobs, atol=1e-4, rtol=1e-4)


def test_reference_backend_rollouts(use_backend):
    """Under LATRO_BACKEND=torch the decode step's ops run their reference (top_k reaches it as
    an int): the same rollouts as the generic loop."""
    use_backend("torch")
    model = _model()
    _assert_same(*_both(model, top_k=5, top_p=0.8))


@pytest.mark.parametrize("compact_every", [0, 1, 3, None])
@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.0}, {"top_k": 5, "top_p": 0.8}])
def test_row_buckets_and_compaction_do_not_change_results(compact_every, sampling, monkeypatch):
    model = _model()
    buckets = []
    original = static_decoder.StaticDecoder._run_step

    def record(self, b):
        buckets.append(b)
        return original(self, b)

    monkeypatch.setattr(static_decoder.StaticDecoder, "_run_step", record)
    # 20 rows -> a bucket of 24; many single-token stops finish rows early
    hf, static = _both(model, stop_sequences=[[s] for s in range(2, 6)], compact_every=compact_every,
                       **sampling)
    _assert_same(hf, static)
    # The 20 rows start in a bucket of 24; checking after every step, the loop checks before its
    # first decode step too, and the rows whose first token stopped them (an empty rationale)
    # have left by then.
    first_live = int((~hf.finished | (hf.rationale_lengths > 0)).sum())
    first_bucket = static_decoder._round_up(first_live, 8) if compact_every == 1 else 24
    assert buckets and buckets[0] == first_bucket
    if compact_every and sampling.get("temperature", 1.0) > 0:
        assert min(buckets) < 24  # finished rows left the batch
    if compact_every == 0:
        assert set(buckets) == {24}


def test_prompt_and_limit_changes_reuse_or_rebuild_the_decoder():
    model = _model()
    _assert_same(*_both(model))
    [first] = static_decoder._DECODERS[model]
    _assert_same(*_both(model, prompts=PROMPTS[:2]))  # fewer rows, shorter prompts: reused
    assert static_decoder._DECODERS[model] == [first]
    _assert_same(*_both(model, max_new_tokens=7))  # another limit: a second decoder
    second = static_decoder._DECODERS[model][-1]
    assert static_decoder._DECODERS[model] == [first, second]
    _assert_same(*_both(model))  # the first again, now the most recent
    assert static_decoder._DECODERS[model] == [second, first]
    # More rows: the first is outgrown and replaced by one that serves its calls too (the
    # larger of each capacity), not kept beside it; the other settings' decoder stays.
    _assert_same(*_both(model, prompts=PROMPTS * 3, k=3))
    kept, grown = static_decoder._DECODERS[model]
    assert kept is second and grown.key.rows > first.key.rows
    longer_prompts = [PROMPTS[0] * 10, *PROMPTS[1:]] * 3  # as many rows, one prompt of 40
    _assert_same(*_both(model, prompts=longer_prompts, k=3))
    assert static_decoder._DECODERS[model][0] is second
    longer = static_decoder._DECODERS[model][1]
    assert longer.key.slots > grown.key.slots and longer.key.rows == grown.key.rows
    _assert_same(*_both(model))  # every earlier call of these settings: served, no rebuild
    assert static_decoder._DECODERS[model] == [second, longer]
    # Few rows with a much longer prompt: one cache of the larger of each capacity would hold
    # more than the two apart, so it gets its own decoder (the least recently used goes).
    _assert_same(*_both(model, prompts=[PROMPTS[0] * 40], k=1))
    few = static_decoder._DECODERS[model][-1]
    assert static_decoder._DECODERS[model] == [longer, few] and few.key.rows == 8
    static_decoder.release_static_decoder(model)
    assert model not in static_decoder._DECODERS


@pytest.mark.parametrize("kind", ["llama", "phi3"])  # phi3: views of rows of fused weights
def test_weight_updates_are_seen(kind):
    """In-place updates (an optimizer step) and replaced parameters both reach the decoder."""
    model = _model(kind)
    _assert_same(*_both(model))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    _assert_same(*_both(model))
    model.load_state_dict(_model(kind, seed=5).state_dict(), assign=True)
    _assert_same(*_both(model))


@pytest.mark.parametrize("kind", ["llama", "qwen3"])  # qwen3: its head norms' weights too
def test_autocast_uses_bfloat16_weight_copies(kind):
    model = _model(kind).float()
    ids, mask = _prompts()
    kw = {"k": 2, "max_new_tokens": 6, "stop_sequences": [], "pad_token_id": PAD, "seed": 1}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = sample_rationales(model, ids, mask, decoder="static", **kw)
        hf = sample_rationales(model, ids, mask, decoder="hf", **kw)
    decoder = static_decoder._DECODERS[model][-1]
    assert decoder.key.matmul_dtype == torch.bfloat16
    assert decoder.layers[0]["q"].weight.dtype == torch.bfloat16
    if kind == "qwen3":  # a copy in bf16, refreshed from the parameter before each rollout
        copy = decoder.layers[0]["k_norm"].weight
        param = model.model.layers[0].self_attn.k_norm.weight
        assert copy.dtype == torch.bfloat16
        with torch.no_grad():
            param.mul_(2)
        decoder.refresh_weights()
        assert torch.equal(copy, param.detach().bfloat16())
    assert decoder.embed.dtype == torch.float32  # residual stream in float32, as autocast does
    assert r.rationale_ids.shape == (8, 6) and bool((r.sample_logprobs <= 0).all())
    # bf16 rounding differs between the two forwards; the first draws nearly always agree
    assert (r.rationale_ids[:, 0] == hf.rationale_ids[:, 0]).float().mean() >= 0.75


def test_kept_decoders_share_their_weight_copies():
    """Float32 weights under bf16 autocast decode with bf16 copies: a second kept decoder (other
    sampling settings, e.g. evaluation's) reads the first one's copies instead of holding a
    second copy of the model, and both see weight updates."""
    model = _model().float()
    ids, mask = _prompts()
    kw = {"k": 2, "max_new_tokens": 6, "stop_sequences": [], "pad_token_id": PAD, "seed": 1}

    def both(**sampling):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return [sample_rationales(model, ids, mask, decoder=d, **kw, **sampling)
                    for d in ("static", "hf")]

    both(temperature=1.0)
    both(temperature=0.0)
    first, second = static_decoder._DECODERS[model]
    assert first.key.sampling != second.key.sampling
    for a, b in [(first.lm_head, second.lm_head), (first.layers[1]["down"], second.layers[1]["down"])]:
        assert a.weight.dtype == torch.bfloat16 and a.weight.data_ptr() == b.weight.data_ptr()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # more rows: the first one's replacement
        sample_rationales(model, ids, mask, decoder="static", **{**kw, "k": 5}, temperature=1.0)
    kept_other, grown = static_decoder._DECODERS[model]
    assert kept_other is second and grown.key.rows > first.key.rows
    assert grown.lm_head.weight.data_ptr() == second.lm_head.weight.data_ptr()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    kept, _ = both(temperature=1.0)  # the first one's replacement, after the update
    static_decoder.release_static_decoder(model)
    fresh, _ = both(temperature=1.0)  # a decoder built from the updated weights
    _assert_same(kept, fresh)


@pytest.mark.parametrize(
    "kind,targets",
    [("llama", ["q_proj", "v_proj", "down_proj"]), ("phi3", ["qkv_proj", "gate_up_proj"])],
)
def test_lora_adapters_are_merged(kind, targets):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        _model(kind), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model = model.double().eval()
    assert static_decoder.static_decoder_unsupported(model) is None
    _assert_same(*_both(model))
    with torch.no_grad():  # a training step moves the adapters
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.3)
    _assert_same(*_both(model))


def test_peft_adapters_other_than_plain_lora_fall_back_or_raise():
    """The decoder merges B @ A into the base weight, nothing else: prompt tuning (virtual
    tokens), AdaLoRA, DoRA and peft's other LoRA variants would decode another model."""
    peft = pytest.importorskip("peft")
    lora = dict(r=4, target_modules=["q_proj", "v_proj"])
    models = {
        "PROMPT_TUNING": peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
        "ADALORA": peft.AdaLoraConfig(total_step=10, **lora),
        "DoRA": peft.LoraConfig(use_dora=True, **lora),
    }
    ids, mask = _prompts()
    kw = {"k": 1, "max_new_tokens": 3, "stop_sequences": [], "pad_token_id": PAD, "seed": 0}
    for name, config in models.items():
        model = peft.get_peft_model(_model(), config).eval()
        reason = static_decoder.static_decoder_unsupported(model)
        assert reason and name in reason, (name, reason)
        with pytest.raises(ValueError, match="decoder='static' cannot decode"):
            sample_rationales(model, ids, mask, decoder="static", **kw)
    # a variant peft keeps per adapter (KaSA, aLoRA, ...), and LoRA factors that are not linear
    # layers, on an otherwise plain LoRA model
    model = peft.get_peft_model(_model(), peft.LoraConfig(**lora)).eval()
    assert static_decoder.static_decoder_unsupported(model) is None
    q_proj = model.get_base_model().model.layers[1].self_attn.q_proj
    q_proj.lora_variant = {"default": object()}
    assert "q_proj: LoRA variant object" in static_decoder.static_decoder_unsupported(model)
    q_proj.lora_variant = {}
    q_proj.lora_A = torch.nn.ParameterDict({"default": torch.nn.Parameter(torch.zeros(4, 32))})
    reason = static_decoder.static_decoder_unsupported(model)
    assert "q_proj: adapter 'default' is not a LoRA linear adapter" in reason


def test_fractional_top_k_is_refused_not_truncated():
    """The static decoder is kept per sampling settings with top_k as an int: 2.5 must raise,
    not run (and be cached) as top_k=2."""
    model = _model()
    for decoder in ("hf", "static"):
        with pytest.raises(TypeError, match="top_k must be an int"):
            _both(model, decoders=(decoder,), top_k=2.5)
    (as_int,) = _both(model, decoders=("static",), top_k=3)
    (as_numpy,) = _both(model, decoders=("static",), top_k=np.int64(3))
    _assert_same(as_int, as_numpy)


def test_unsupported_models_fall_back_or_raise():
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2)
    ).eval()
    reason = static_decoder.static_decoder_unsupported(gpt2)
    assert reason and "gpt2" in reason
    ids, mask = _prompts()
    kw = {"k": 1, "max_new_tokens": 3, "stop_sequences": [], "pad_token_id": PAD, "seed": 0}
    with pytest.raises(ValueError, match="decoder='static'.*gpt2"):
        sample_rationales(gpt2, ids, mask, decoder="static", **kw)
    assert sample_rationales(gpt2, ids, mask, decoder="auto", **kw).rationale_ids.shape == (4, 3)
    with pytest.raises(ValueError, match="decoder must be"):
        sample_rationales(gpt2, ids, mask, decoder="fast", **kw)
    phi3 = _model("phi3")  # a fused layer whose rows do not split as the config says
    phi3.model.layers[0].mlp.gate_up_proj = torch.nn.Linear(32, 100, bias=False).double()
    reason = static_decoder.static_decoder_unsupported(phi3)
    assert reason == "layers.0.mlp.gate_up_proj has 100 rows, its blocks 96"
    wide = _model(head_dim=258)
    assert "head_dim 258" in static_decoder.static_decoder_unsupported(wide)
    qwen3 = _model("qwen3")
    qwen3.model.layers[1].self_attn.k_norm.weight = torch.nn.Parameter(torch.ones(3).double())
    reason = static_decoder.static_decoder_unsupported(qwen3)
    assert reason == "layers.1.self_attn.k_norm is not an RMSNorm over the head dim"
    dropout = _model(attention_dropout=0.1)  # the model's own forward drops in train mode
    assert "train mode with dropout" in static_decoder.static_decoder_unsupported(dropout.train())
    assert static_decoder.static_decoder_unsupported(dropout.eval()) is None
    assert static_decoder.static_decoder_unsupported(_model().train()) is None  # no dropout
    windowed = _model("mistral", sliding_window=16)
    assert "sliding window" in static_decoder.static_decoder_unsupported(windowed, 40)
    assert static_decoder.static_decoder_unsupported(windowed, 16) is None


# --------------------------------------------------------------------------- CUDA graphs
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("kind", ["llama", "qwen2", "phi3", "qwen3"])
def test_cuda_graph_rollouts_match_the_generic_loop_and_cpu(kind):
    import latro_engine

    if not latro_engine.native_has_cuda():
        pytest.skip("the extension was built without CUDA kernels")
    model = _model(kind).cuda()
    ids, mask = _prompts()
    # 15-16 of the 20 rows stop, most of them early: row buckets shrink, some rows run to 40
    kw = {"k": 5, "max_new_tokens": 40, "stop_sequences": [[2], [3]], "pad_token_id": PAD,
          "seed": 7, "compact_every": 4}
    static = sample_rationales(model, ids.cuda(), mask.cuda(), decoder="static", **kw)
    again = sample_rationales(model, ids.cuda(), mask.cuda(), decoder="auto", **kw)  # replays
    hf = sample_rationales(model, ids.cuda(), mask.cuda(), decoder="hf", **kw)
    assert static_decoder._DECODERS[model][-1].graphs  # the steps ran as CUDA graphs
    cpu = sample_rationales(model.cpu(), ids, mask, decoder="static", **kw)
    assert static.finished.any() and not static.finished.all()
    for other in (again, hf):
        _assert_same(static, other)
    _assert_same(_on_cpu(static), cpu)


def _on_cpu(rollout):
    return dataclasses.replace(
        rollout,
        **{
            f.name: getattr(rollout, f.name).cpu()
            for f in dataclasses.fields(rollout)
            if isinstance(getattr(rollout, f.name), torch.Tensor)
        },
    )


@cuda
def test_cuda_reference_backend_decodes_eagerly(use_backend):
    """With the ops on their reference (which reads values back to the host) the static
    decoder runs its steps eagerly on CUDA instead of capturing them: same rollouts as the
    generic loop, no graphs."""
    use_backend("torch")
    model = _model().cuda()
    ids, mask = (t.cuda() for t in _prompts())
    kw = {"k": 3, "max_new_tokens": 20, "stop_sequences": [[2]], "pad_token_id": PAD, "seed": 4}
    static = sample_rationales(model, ids, mask, decoder="auto", **kw)
    hf = sample_rationales(model, ids, mask, decoder="hf", **kw)
    assert not static_decoder._DECODERS[model][-1].graphs
    _assert_same(static, hf)


@cuda
def test_cuda_graph_bfloat16_and_autocast():
    import latro_engine

    if not latro_engine.native_has_cuda():
        pytest.skip("the extension was built without CUDA kernels")
    ids, mask = (t.cuda() for t in _prompts())
    kw = {"k": 4, "max_new_tokens": 24, "stop_sequences": [[2]], "pad_token_id": PAD, "seed": 3}
    bf16 = _model().to("cuda", torch.bfloat16)
    a = sample_rationales(bf16, ids, mask, decoder="static", **kw)
    b = sample_rationales(bf16, ids, mask, decoder="hf", **kw)
    graphs = static_decoder._DECODERS[bf16][-1].graphs
    assert graphs and min(graphs) >= 8
    assert bool(torch.isfinite(a.sample_logprobs).all()) and bool((a.sample_logprobs <= 0).all())
    assert (a.rationale_ids[:, 0] == b.rationale_ids[:, 0]).float().mean() >= 0.75
    fp32 = _model().to("cuda", torch.float32)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        c = sample_rationales(fp32, ids, mask, decoder="static", **kw)
    assert static_decoder._DECODERS[fp32][-1].layers[0]["q"].weight.dtype == torch.bfloat16
    assert bool(torch.isfinite(c.sample_logprobs).all())


@requires_native
@pytest.mark.parametrize("kind", ["llama", "phi3"])
def test_decode_step_runs_the_fused_ops(kind, monkeypatch):
    """A decode step of an L-layer model calls decode_attention L times, rms_norm 2L + 1 times
    and silu_mul L times, and none of the element-wise ops they replace (on CUDA each call is
    one kernel; the rollout's speed rests on it); phi3's fused projections cost no copies."""
    from torch.profiler import ProfilerActivity, profile

    monkeypatch.setenv("LATRO_BACKEND", "native")
    model = _model(kind).float()
    layers = model.config.num_hidden_layers
    _both(model)  # builds the decoder
    decoder = static_decoder._DECODERS[model][-1]
    decoder.step.fill_(1)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        decoder._decode_forward(decoder.key.rows)
    names = [e.name for e in prof.events()]
    assert names.count("latro_engine::decode_attention") == layers
    assert names.count("latro_engine::rms_norm") == 2 * layers + 1
    assert names.count("latro_engine::silu_mul") == layers
    replaced = {"aten::softmax", "aten::_softmax", "aten::rsqrt", "aten::pow", "aten::silu",
                "aten::masked_fill", "aten::index_copy_", "aten::rms_norm", "aten::clone"}
    assert not replaced & set(names), replaced & set(names)

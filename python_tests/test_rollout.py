"""Rollouts: stop semantics, compaction, determinism, per-row independence, greedy == HF."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from transformers import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from latro_engine.rollout import (
    Rollout,
    _matched_stops,
    row_seeds,
    sample_rationales,
    stop_token_sequences,
)
from latro_engine.tokenizer import train_char_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


PAD, EOS, VOCAB = 23, 0, 24
# next token of the scripted model, by last token: a long cycle 1..11, a short cycle without
# the stop pair, and a chain that ends in EOS.
NEXT = {i: i + 1 for i in range(1, 11)} | {11: 1, 20: 21, 21: 22, 22: 20, 15: 16, 16: EOS, EOS: EOS}
STOP = [[5, 6], [EOS]]


class ScriptedLM(torch.nn.Module):
    """The Hugging Face causal-LM interface with designed logits: the next token is certain,
    NEXT[last token]. Checks the bookkeeping a KV-cached loop must get right (cache rows
    aligned with the inputs, attention-mask width, position ids) and records batch sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.full((VOCAB, VOCAB), -math.inf)
        for a, b in NEXT.items():
            self.table[a, b] = 0.0
        self.batch_sizes: list[int] = []

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None,
                use_cache=None, logits_to_keep=0):
        cache = DynamicCache() if cache is None else cache
        rows, new = input_ids.shape
        past = cache.get_seq_length()
        assert attention_mask.shape == (rows, past + new)
        expected_pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
        assert torch.equal(position_ids, expected_pos)
        kv = input_ids[:, None, :, None].float()
        keys, _ = cache.update(kv, kv, 0)  # the cache stores each row's token history
        assert torch.equal(keys[:, 0, -new:, 0].long(), input_ids)
        self.batch_sizes.append(rows)
        return CausalLMOutputWithPast(logits=self.table[input_ids], past_key_values=cache)


def _left_pad(prompts: list[list[int]], pad: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def _scripted(prompts, limit, **kw) -> tuple[Rollout, ScriptedLM]:
    model = ScriptedLM()
    ids, mask = _left_pad(prompts)
    kw = {"k": 1, "seed": 0, **kw}
    return sample_rationales(model, ids, mask, max_new_tokens=limit, stop_sequences=STOP,
                             pad_token_id=PAD, **kw), model


def test_rows_stop_at_stop_sequences_and_exclude_them():
    prompts = [[7, 3], [10], [20], [15], [8], [9]]
    r, _ = _scripted(prompts, 8)
    got = r.rationale_token_lists()
    assert got[0] == [4]                      # 4 5 6: stop [5, 6] excluded
    assert got[1] == [11, 1, 2, 3, 4]         # stops after 7 tokens
    assert got[2] == [21, 22, 20, 21, 22, 20, 21, 22]  # never stops: runs to the limit
    assert got[3] == [16]                     # EOS is one of the stops
    assert got[4] == [9, 10, 11, 1, 2, 3, 4, 5]  # the stop only half-emitted at the limit
    assert got[5] == [10, 11, 1, 2, 3, 4]     # completes the stop at the very last step
    assert r.finished.tolist() == [True, True, False, True, False, True]
    assert r.rationale_lengths.tolist() == [1, 5, 8, 1, 8, 6]
    assert r.stop_index.tolist() == [0, 0, -1, 1, -1, 0]  # which of STOP ended each row
    L = r.rationale_ids.shape[1]
    past = torch.arange(L)[None] >= r.rationale_lengths[:, None]
    assert bool((r.rationale_ids[past] == PAD).all())
    assert bool((r.sample_logprobs == 0).all())  # every draw was certain
    assert r.prompt_ids.shape == (6, 2) and r.group_size == 1


def test_the_stop_that_ended_a_row_is_the_shortest_one_starting_there():
    """A longer sequence that also starts at the stop position could only be completed by
    tokens after the row stopped (a loop that kept drawing them, or pads that happen to
    match): the shorter one ended the row, whatever the list order."""
    tokens = torch.tensor([[1, 5, 6, 7], [5, 6, 7, 9], [2, 2, 5, 6], [5, 9, 9, 9]])
    stop_pos = torch.tensor([1, 0, 2, 4])
    stops = [[5, 6, 7], [5, 6], [6], [5, 6]]
    assert _matched_stops(tokens, stop_pos, stops).tolist() == [1, 1, 1, -1]
    assert _matched_stops(tokens[:, :0], stop_pos * 0, stops).tolist() == [-1] * 4
    assert _matched_stops(tokens, stop_pos, []).tolist() == [-1] * 4


def test_matched_stops_agrees_with_one_sequence_at_a_time():
    """The batched search (one comparison per distinct length) against the plain rule checked
    sequence by sequence: random rows, stop positions anywhere (the end included), sequences
    of 1-4 tokens over a small alphabet (so many match, prefixes and repeats among them)."""
    g = torch.Generator().manual_seed(5)
    for _ in range(30):
        rows, limit = int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(1, 7, (1,), generator=g))
        tokens = torch.randint(0, 3, (rows, limit), generator=g)
        stop_pos = torch.randint(0, limit + 1, (rows,), generator=g)
        stops = [torch.randint(0, 3, (int(n),), generator=g).tolist()
                 for n in torch.randint(1, 5, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g)]
        expected = []
        for row, pos in zip(tokens.tolist(), stop_pos.tolist()):
            fits = [(len(s), i) for i, s in enumerate(stops) if row[pos : pos + len(s)] == s]
            expected.append(min(fits)[1] if fits else -1)
        assert _matched_stops(tokens, stop_pos, stops).tolist() == expected


def test_finished_rows_leave_the_batch_and_loop_ends_early():
    r, model = _scripted([[3], [3], [10], [15]], 50, compact_every=1)
    # step 0 all 4 rows; [15] stops at step 1 and the two [3] rows at step 2, the loop ends
    # when [10] completes its stop at step 6 (7 forwards in all)
    assert model.batch_sizes == [4, 4, 3, 1, 1, 1, 1]
    assert r.finished.all() and r.rationale_lengths.tolist() == [1, 1, 5, 1]
    _, never = _scripted([[3], [10], [15]], 50, compact_every=0)
    assert never.batch_sizes == [3] * 7


def test_compaction_does_not_change_results_scripted():
    prompts = [[7, 3], [10], [20], [15], [8], [9], [1, 2, 11]]
    base, _ = _scripted(prompts, 9, k=2, compact_every=0)
    for every in (1, 2, 3):
        other, _ = _scripted(prompts, 9, k=2, compact_every=every)
        assert torch.equal(base.rationale_ids, other.rationale_ids)
        assert torch.equal(base.rationale_lengths, other.rationale_lengths)
        assert torch.equal(base.finished, other.finished)


class LegacyCacheLM(ScriptedLM):
    """ScriptedLM returning the legacy cache, a tuple of per-layer (key, value) pairs, which
    cannot drop batch rows."""

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None,
                use_cache=None, logits_to_keep=0):
        kv = input_ids[:, None, :, None].float()
        if cache is not None:
            kv = torch.cat([cache[0][0], kv], 2)
        self.batch_sizes.append(input_ids.shape[0])
        return CausalLMOutputWithPast(logits=self.table[input_ids], past_key_values=((kv, kv),))


def test_a_cache_that_cannot_drop_rows_decodes_without_compaction(caplog):
    prompts = [[7, 3], [10], [20], [15]]
    base, _ = _scripted(prompts, 8, compact_every=0)
    model = LegacyCacheLM()
    ids, mask = _left_pad(prompts)
    with caplog.at_level("WARNING"):
        r = sample_rationales(model, ids, mask, k=1, max_new_tokens=8, stop_sequences=STOP,
                              pad_token_id=PAD, seed=0, compact_every=1)
    assert "cannot drop batch rows" in caplog.text
    assert set(model.batch_sizes) == {4}
    assert torch.equal(r.rationale_ids, base.rationale_ids)
    assert torch.equal(r.finished, base.finished)


def test_zero_limit_and_no_stops():
    r, _ = _scripted([[3]], 0)
    assert r.rationale_ids.shape == (1, 0) and r.rationale_lengths.tolist() == [0]
    assert not r.finished.any()
    model = ScriptedLM()
    ids, mask = _left_pad([[3]])
    r = sample_rationales(model, ids, mask, k=2, max_new_tokens=4, stop_sequences=[],
                          pad_token_id=PAD, seed=0)
    assert r.rationale_token_lists() == [[4, 5, 6, 7]] * 2 and not r.finished.any()


def test_prompt_masks_must_be_left_padded_zeros_then_ones():
    model = ScriptedLM()
    kw = dict(k=2, max_new_tokens=3, stop_sequences=STOP, pad_token_id=PAD, seed=0)
    ids = torch.tensor([[7, 3, 4], [10, 11, PAD]])
    for mask, match in [
        ([[1, 1, 1], [1, 1, 0]], r"left-padded.*row 1 has a 0 after a 1.*padding_side = \"left\""),
        ([[0, 1, 1], [1, 0, 1]], r"left-padded.*row 1 has a 0 after a 1"),  # a hole
        ([[1, 1, 1], [0, 2, 1]], "prompt_mask must hold only 0 .* and 1"),
        ([[1, 1, 1], [0, 0, 0]], "at least one real token"),
    ]:
        with pytest.raises(ValueError, match=match):
            sample_rationales(model, ids, torch.tensor(mask), **kw)
    assert model.batch_sizes == []  # refused before the first forward
    left = sample_rationales(model, torch.tensor([[7, 3, 4], [PAD, 10, 11]]),
                             torch.tensor([[1, 1, 1], [0, 1, 1]]), **kw)
    assert left.rationale_token_lists() == [[]] * 2 + [[1, 2, 3]] * 2


# --------------------------------------------------------------------------- tiny Llama
@pytest.fixture(scope="module")
def llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD, bos_token_id=1,
        eos_token_id=2,
    )
    # float64 makes a flipped argmax from batch-size-dependent rounding practically impossible
    return transformers.LlamaForCausalLM(config).double().eval()


PROMPTS = [[1, 5, 6, 7], [1, 9], [1, 3, 4, 8, 10, 12], [1, 14, 15]]


def _sample(model, prompts, **kw) -> Rollout:
    ids, mask = _left_pad(prompts)
    kw = {"k": 3, "max_new_tokens": 12, "stop_sequences": [[2], [7, 8]], "pad_token_id": PAD,
          "seed": 123, **kw}
    return sample_rationales(model, ids, mask, **kw)


def test_deterministic_and_seed_dependent(llama):
    a, b = _sample(llama, PROMPTS), _sample(llama, PROMPTS)
    assert torch.equal(a.rationale_ids, b.rationale_ids)
    assert torch.equal(a.sample_logprobs, b.sample_logprobs)
    c = _sample(llama, PROMPTS, seed=124)
    assert not torch.equal(a.rationale_ids, c.rationale_ids)
    # k samples of one prompt differ from each other (independent streams)
    assert len({tuple(t) for t in a.rationale_token_lists()[:3]}) > 1
    assert bool((a.sample_logprobs <= 0).all())


def test_per_row_independence(llama):
    """The same (seed, sample id, prompt) gives the same rationale in another batch."""
    full = _sample(llama, PROMPTS)
    alone = _sample(llama, PROMPTS[2:3], sample_ids=[6, 7, 8])
    assert torch.equal(full.rationale_ids[6:9], alone.rationale_ids)
    assert torch.equal(full.rationale_lengths[6:9], alone.rationale_lengths)
    assert torch.allclose(full.sample_logprobs[6:9], alone.sample_logprobs, atol=1e-5)
    swapped = _sample(llama, [PROMPTS[3], PROMPTS[0]], sample_ids=[9, 10, 11, 0, 1, 2])
    assert torch.equal(full.rationale_ids[9:12], swapped.rationale_ids[:3])
    assert torch.equal(full.rationale_ids[0:3], swapped.rationale_ids[3:])


def test_compaction_does_not_change_results_llama(llama):
    kw = {"stop_sequences": [[s] for s in range(2, 5)], "max_new_tokens": 10}
    base = _sample(llama, PROMPTS, compact_every=0, **kw)
    assert base.finished.any() and not base.finished.all()
    for every in (1, 4):
        other = _sample(llama, PROMPTS, compact_every=every, **kw)
        assert torch.equal(base.rationale_ids, other.rationale_ids)
        assert torch.equal(base.finished, other.finished)
        assert torch.allclose(base.sample_logprobs, other.sample_logprobs, atol=1e-5)


def test_greedy_matches_hf_generate(llama):
    ids, mask = _left_pad(PROMPTS)
    limit = 10
    kw = {"attention_mask": mask, "do_sample": False, "max_new_tokens": limit, "pad_token_id": PAD}
    free = llama.generate(ids, eos_token_id=None, **kw)[:, ids.shape[1]:]
    eos = int(free[0, 3])  # a token greedy decoding emits, so at least one row stops
    hf = llama.generate(ids, eos_token_id=eos, **kw)[:, ids.shape[1]:]
    r = sample_rationales(llama, ids, mask, k=1, max_new_tokens=limit, stop_sequences=[[eos]],
                          pad_token_id=PAD, seed=0, temperature=0.0)
    assert r.finished[0]
    for row, n, done in zip(range(len(PROMPTS)), r.rationale_lengths.tolist(), r.finished.tolist()):
        assert r.rationale_ids[row, :n].tolist() == hf[row, :n].tolist()
        if done:
            assert int(hf[row, n]) == eos
        else:
            assert n == limit and eos not in hf[row].tolist()


def test_row_seeds_stable_and_distinct():
    a = row_seeds(7, [0, 1, 2])
    assert torch.equal(a, row_seeds(7, torch.tensor([0, 1, 2])))
    assert len(set(a.tolist()) | set(row_seeds(8, [0, 1, 2]).tolist())) == 6
    assert a.dtype == torch.int64 and bool((a >= 0).all())


def test_stop_token_sequences_char_tokenizer():
    tok = train_char_tokenizer(["What is 3+4? Let's think. The answer is 7.\nAnswer: 7"])
    seqs = stop_token_sequences(tok, [" The answer is", "Answer:"])
    spaced = tok(" The answer is", add_special_tokens=False)["input_ids"]
    bare = tok("Answer:", add_special_tokens=False)["input_ids"]
    assert seqs[0] == spaced  # longest first: the cut keeps no trailing space
    assert bare in seqs and tok(" Answer:", add_special_tokens=False)["input_ids"] in seqs
    assert seqs[-1] == [tok.eos_token_id]
    assert len(seqs) == len({tuple(s) for s in seqs}) and all(seqs)
    assert [tok.eos_token_id] not in stop_token_sequences(tok, ["Answer:"], end_ids=[])
    assert stop_token_sequences(tok, ["Answer:"], end_ids=[7, 7])[-1] == [7]

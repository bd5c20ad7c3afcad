"""sample: same draws on every backend, only from the kept set, with the right frequencies."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FLOAT_DTYPES, LLAMA3_VOCAB, device_backend_pairs

from latro_engine import ops, reference

OPTIONS = [
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=1.0, min_p=0.2),
    dict(temperature=0.9, top_k=20, top_p=0.9, min_p=0.05),
]


def _logits(rows, vocab, dtype=torch.float32, device="cpu", seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=g) * scale).to(dtype).to(device)


def _sample_with(backend, use_backend, logits, **kw):
    use_backend(backend)
    return ops.sample(logits, **kw)


@pytest.mark.parametrize("device,backend", device_backend_pairs())
@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("rows,vocab", [(1, 1), (7, 7), (97, 97), (7, 1025)])
def test_backends_draw_the_same_ids(device, backend, options, dtype, rows, vocab, use_backend):
    logits = _logits(rows, vocab, dtype, device, seed=rows + vocab)
    ids, logp = _sample_with(backend, use_backend, logits, seed=1234, offset=5, **options)
    ref_ids, ref_logp = _sample_with("torch", use_backend, logits, seed=1234, offset=5, **options)
    assert ids.dtype == torch.int64 and logp.dtype == torch.float32
    # Ties aside (a near-tie between two Gumbel keys may round either way), the draws match.
    assert (ids == ref_ids).float().mean() >= 0.99
    same = ids == ref_ids
    torch.testing.assert_close(logp[same], ref_logp[same], atol=1e-5, rtol=1e-5)
    kept = reference.kept_mask(logits, **options)
    assert kept.gather(1, ids[:, None]).all(), "drew a token outside the kept set"
    assert torch.all(logp <= 0)


@pytest.mark.parametrize("device,backend", device_backend_pairs())
@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999, 0.99999994])
def test_top_p_crossings_within_bins_and_at_ties(device, backend, top_p, use_backend):
    """Rows built so that top-p's crossing falls inside one of the histogram's bins (width 1/32
    of a logit), among tied values, in a long tail, or in a 30,000-token nucleus: the kept set
    (seen through the log-prob, s - m - log(kept mass)) and the draws equal the reference's."""
    vocab = 4099
    g = torch.Generator().manual_seed(7)
    rows = [
        torch.zeros(vocab),  # every token tied
        torch.cat([torch.zeros(vocab // 2), torch.full((vocab - vocab // 2,), -0.01)]),  # one bin
        torch.linspace(0, -300, vocab),  # spread far past the last bin (d >= 64)
        (torch.rand(vocab, generator=g) * 0.1).round(decimals=2),  # few values, many ties
        torch.randn(vocab, generator=g) * 2,
        torch.randn(vocab, generator=g) * 8,
    ]
    logits = torch.stack(rows).to(device)
    for seed in range(4):
        ids, logp = _sample_with(backend, use_backend, logits, seed=seed, top_p=top_p)
        ref_ids, ref_logp = _sample_with("torch", use_backend, logits, seed=seed, top_p=top_p)
        assert torch.equal(ids, ref_ids)
        torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device,backend", device_backend_pairs())
def test_llama3_vocabulary_and_determinism(device, backend, use_backend):
    logits = _logits(5, LLAMA3_VOCAB, torch.bfloat16, device, seed=2, scale=4.0)
    for options in OPTIONS:
        a = _sample_with(backend, use_backend, logits, seed=7, offset=3, **options)
        b = _sample_with(backend, use_backend, logits, seed=7, offset=3, **options)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        ref = _sample_with("torch", use_backend, logits, seed=7, offset=3, **options)
        assert torch.equal(a[0], ref[0])


@pytest.mark.parametrize("device,backend", device_backend_pairs())
def test_per_row_seeds_follow_the_row(device, backend, use_backend):
    """With one seed per row, a row's draw depends only on its logits, seed and offset."""
    use_backend(backend)
    logits = _logits(9, 50, device=device, seed=3)
    seeds = torch.arange(100, 109, device=device)
    ids, _ = ops.sample(logits, seed=seeds, offset=torch.tensor(4, device=device))
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(0)).to(device)
    ids_perm, _ = ops.sample(logits[perm], seed=seeds[perm], offset=4)
    assert torch.equal(ids_perm, ids[perm])
    alone, _ = ops.sample(logits[2:3], seed=seeds[2:3], offset=4)
    assert alone.item() == ids[2].item()


@pytest.mark.parametrize("device,backend", device_backend_pairs())
def test_one_seed_rows_ignore_other_rows_content(device, backend, use_backend):
    use_backend(backend)
    logits = _logits(6, 40, device=device, seed=4)
    ids, _ = ops.sample(logits, seed=99, offset=0)
    changed = logits.clone()
    changed[[0, 1, 3, 5]] = _logits(4, 40, device=device, seed=5)
    ids2, _ = ops.sample(changed, seed=99, offset=0)
    assert ids[2] == ids2[2] and ids[4] == ids2[4]


@pytest.mark.parametrize("device,backend", device_backend_pairs())
def test_offset_and_seed_change_the_draws(device, backend, use_backend):
    use_backend(backend)
    logits = torch.zeros(64, 1000, device=device)
    base = ops.sample(logits, seed=1, offset=0)[0]
    assert (ops.sample(logits, seed=1, offset=1)[0] != base).float().mean() > 0.9
    assert (ops.sample(logits, seed=2, offset=0)[0] != base).float().mean() > 0.9
    assert (ops.sample(logits, seed=-5, offset=2**40)[0] != base).float().mean() > 0.9


@pytest.mark.parametrize("device,backend", device_backend_pairs())
def test_greedy(device, backend, use_backend):
    use_backend(backend)
    logits = _logits(7, 97, device=device, seed=6)
    logits[3, 10] = logits[3, 20] = 100.0  # tie: the lowest id wins
    ids, logp = ops.sample(logits, seed=0, temperature=0.0, top_k=3)
    assert torch.equal(ids, logits.argmax(-1))
    assert ids[3] == 10
    assert torch.all(logp == 0)


@pytest.mark.parametrize("device,backend", device_backend_pairs())
def test_never_draws_impossible_tokens(device, backend, use_backend):
    use_backend(backend)
    logits = torch.full((2000, 6), float("-inf"), device=device)
    logits[:, 2] = 0.0
    logits[:, 4] = 30.0  # probability ~1e-13 for token 2, exactly 0 for the -inf ones
    ids, _ = ops.sample(logits, seed=torch.arange(2000, device=device))
    assert set(ids.unique().tolist()) <= {2, 4}


def _chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """P(chi2 >= observed) for counts against probs (cells with probability 0 excluded)."""
    n = counts.sum()
    expected = probs * n
    cells = probs > 0
    stat = (((counts - expected) ** 2)[cells] / expected[cells]).sum()
    dof = int(cells.sum()) - 1
    if dof == 0:
        return 1.0
    return float(
        torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat.double() / 2)
    )


@pytest.mark.parametrize("device,backend", device_backend_pairs())
@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_frequencies_follow_the_filtered_distribution(device, backend, options, use_backend):
    """Chi-square over 40,000 seeds against the renormalized kept distribution."""
    use_backend(backend)
    row = _logits(1, 12, device=device, seed=11, scale=1.5)
    draws = 40_000
    logits = row.expand(draws, 12)
    ids, logp = ops.sample(logits, seed=torch.arange(draws, device=device), offset=0, **options)
    kept = reference.kept_mask(row, **options)[0]
    scaled = row[0].double() / options["temperature"]
    probs = torch.where(kept, torch.softmax(scaled.masked_fill(~kept, -math.inf), -1), 0.0).cpu()
    counts = torch.bincount(ids.cpu(), minlength=12).double()
    assert counts[~kept.cpu()].sum() == 0, "drew a filtered-out token"
    assert _chi_square_p_value(counts, probs) > 1e-4
    # The returned log-prob is the log of the kept, renormalized probability of the id.
    torch.testing.assert_close(logp.double().cpu(), probs.log()[ids.cpu()], atol=1e-5, rtol=1e-5)


def test_chi_square_detects_a_wrong_distribution():
    """The statistical check can fail: uniform draws against a skewed distribution."""
    probs = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    counts = torch.tensor([3400.0, 3300.0, 3300.0], dtype=torch.float64)
    assert _chi_square_p_value(counts, probs) < 1e-4


def test_philox_known_answers():
    """Philox4x32-10 test vectors from the Random123 distribution."""

    def run(counter, key):
        words = reference.philox4x32_10(
            [torch.tensor([c], dtype=torch.int64) for c in counter],
            [torch.tensor([k], dtype=torch.int64) for k in key],
        )
        return [int(w) for w in words]

    assert run([0, 0, 0, 0], [0, 0]) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    m = 0xFFFFFFFF
    assert run([m, m, m, m], [m, m]) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert run([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0]) == [
        0xD16CFE09,
        0x94FDCCEB,
        0x5001E420,
        0x24126EA1,
    ]

"""ops.decode_attention (one query token per row against a static KV cache) on both backends:
against a float64 oracle written with torch's scaled_dot_product_attention, grouped heads,
masks, the newest key and value written into the cache, slots beyond the length never read."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import (
    DECODE_ATTENTION_ATOL,
    DECODE_ATTENTION_SHAPES,
    FLOAT_DTYPES,
    ROTARY,
    backends_for,
    decode_attention_oracle,
    decode_attention_problem,
    put_non_finite,
    rotary_for,
    rotary_tables,
    rotate_as_stored,
)

from latro_engine import ops


@pytest.mark.parametrize("backend", backends_for("cpu"))
@pytest.mark.parametrize("rotary", [False, True], ids=["", "rotary"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_nan_and_infinity_come_out_as_in_torchs_attention(dtype, rotary, backend, use_backend):
    use_backend(backend)
    shape = (3, 6, 2, 37, 24, 37)
    query, cache_k, cache_v, new_k, new_v, mask = decode_attention_problem(*shape, dtype, seed=5)
    put_non_finite(query, new_k, new_v)
    tables = rotary_tables(shape[0], shape[4]) if rotary else None
    before_k, before_v = cache_k.clone(), cache_v.clone()
    out = ops.decode_attention(query, cache_k, cache_v, length=shape[-1], new_k=new_k,
                               new_v=new_v, slot_mask=mask, rotary=tables)
    oracle = decode_attention_oracle(query, before_k, before_v, new_k, new_v, mask, shape[-1],
                                     shape[4] ** -0.5, rotary=tables)
    assert bool(oracle.isnan().any()) and bool(oracle.isinf().any())
    tol = DECODE_ATTENTION_ATOL[dtype]
    torch.testing.assert_close(out.double(), oracle, atol=tol, rtol=tol, equal_nan=True)
    assert bool((out[1] == 0).all())  # no allowed slot: zeros, whatever the query holds


@pytest.mark.parametrize("backend", backends_for("cpu"))
@pytest.mark.parametrize("rotary", ROTARY)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", DECODE_ATTENTION_SHAPES, ids=str)
def test_matches_the_oracle_and_writes_the_newest_slot(shape, dtype, rotary, backend, use_backend):
    use_backend(backend)
    if rotary and shape[4] % 2:
        pytest.skip("a rotary embedding needs an even head dim")
    length = shape[-1]
    query, cache_k, cache_v, new_k, new_v, mask = decode_attention_problem(*shape, dtype)
    tables = rotary_for(rotary, shape[0], shape[4], dtype)
    before_k, before_v = cache_k.clone(), cache_v.clone()
    scale = 0.7 / math.sqrt(shape[4])
    out = ops.decode_attention(
        query,
        cache_k,
        cache_v,
        length=torch.tensor(length),
        new_k=new_k,
        new_v=new_v,
        slot_mask=mask,
        rotary=tables,
        scale=scale,
    )
    assert out.dtype == dtype and out.shape == query.shape
    oracle = decode_attention_oracle(
        query, before_k, before_v, new_k, new_v, mask, length, scale, rotary=tables
    )
    tol = DECODE_ATTENTION_ATOL[dtype]
    torch.testing.assert_close(out.double(), oracle, atol=tol, rtol=tol)
    if shape[0] > 1:
        assert bool((out[1] == 0).all())
    # The newest slot now holds new_k (rotated: to within the last bit of the float64 oracle's
    # rotation) and new_v; every other element is untouched (NaN included).
    newest_k = cache_k[:, :, length - 1].clone()
    torch.testing.assert_close(newest_k, rotate_as_stored(new_k, tables))
    want_k, want_v = before_k.clone(), before_v.clone()
    want_k[:, :, length - 1], want_v[:, :, length - 1] = newest_k, new_v
    torch.testing.assert_close(cache_k, want_k, equal_nan=True, atol=0, rtol=0)
    torch.testing.assert_close(cache_v, want_v, equal_nan=True, atol=0, rtol=0)


@pytest.mark.parametrize(
    "dtype,table_dtype",
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),  # a bf16 model: its tables, each product rounded
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.float32),  # float32 weights under bf16 autocast
    ],
    ids=str,
)
def test_rotary_is_the_models_rotary_embedding(dtype, table_dtype, use_backend):
    """The fused rotation equals Llama's own apply_rotary_pos_emb (on q and k of the op's dtype
    and tables of the model's) followed by the op, bit for bit: the same roundings, no fused
    multiply-add."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    query, cache_k, cache_v, new_k, new_v, mask = decode_attention_problem(
        3, 8, 2, 40, 32, 33, dtype, seed=5
    )
    cos, sin = (t.to(table_dtype) for t in rotary_tables(3, 32))
    for backend in backends_for("cpu"):
        use_backend(backend)
        k1, v1, k2, v2 = cache_k.clone(), cache_v.clone(), cache_k.clone(), cache_v.clone()
        fused = ops.decode_attention(
            query, k1, v1, length=33, new_k=new_k, new_v=new_v, slot_mask=mask, rotary=(cos, sin)
        )
        q_rot, k_rot = (
            t[:, :, 0].to(dtype)  # float32 tables promote: rounded once, as attention reads it
            for t in apply_rotary_pos_emb(
                query[:, :, None], new_k[:, :, None], cos[:, None], sin[:, None]
            )
        )
        plain = ops.decode_attention(
            q_rot, k2, v2, length=33, new_k=k_rot, new_v=new_v, slot_mask=mask
        )
        assert torch.equal(fused, plain), backend
        torch.testing.assert_close(k1, k2, equal_nan=True, atol=0, rtol=0)


@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_without_new_token_or_mask_and_with_an_int_length(backend, use_backend):
    use_backend(backend)
    query, cache_k, cache_v, _, _, _ = decode_attention_problem(
        2, 6, 3, 20, 16, 14, torch.float32, masked=False
    )
    cache_k[:, :, 13], cache_v[:, :, 13] = 1.0, 2.0  # the cache holds the newest slot already
    before = cache_k.clone()
    out = ops.decode_attention(
        query.transpose(0, 1).contiguous().transpose(0, 1), cache_k, cache_v, length=14
    )
    full = torch.ones(2, 20, dtype=torch.bool)
    oracle = decode_attention_oracle(
        query, cache_k, cache_v, cache_k[:, :, 13], cache_v[:, :, 13], full, 14, 16**-0.5
    )
    torch.testing.assert_close(out.double(), oracle, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(cache_k, before, equal_nan=True, atol=0, rtol=0)


def test_native_and_reference_agree_on_the_cpu(use_backend):
    """The two backends on the same bfloat16 inputs (the reference in float32 here)."""
    results = {}
    for backend in backends_for("cpu"):
        use_backend(backend)
        query, cache_k, cache_v, new_k, new_v, mask = decode_attention_problem(
            4, 8, 2, 33, 32, 30, torch.bfloat16, seed=3
        )
        results[backend] = (
            ops.decode_attention(
                query, cache_k, cache_v, length=30, new_k=new_k, new_v=new_v, slot_mask=mask
            ),
            cache_k,
        )
    if len(results) == 2:
        (a, ka), (b, kb) = results.values()
        torch.testing.assert_close(a.float(), b.float(), atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(ka, kb, equal_nan=True, atol=0, rtol=0)

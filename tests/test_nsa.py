"""nsa: each branch against full_attention under its explicit mask; the selection against a per-query loop
written from fla's naive_nsa_topk; the gated sum; the optional fla comparison (needs triton: skipped on CPU)."""

from __future__ import annotations

import numpy
import pytest

import reflex
from reflex import random
from tests.helpers import max_abs, qkv_host


def pooled(x, block):
    blocks = -(-x.shape[-2] // block)
    return numpy.stack([x[..., c * block:(c + 1) * block, :].mean(-2) for c in range(blocks)], axis=-2)


def softmax_rows(s):
    m = s.max(-1, keepdims=True)
    e = numpy.exp(s - numpy.where(numpy.isfinite(m), m, 0.0))
    total = e.sum(-1, keepdims=True)
    return e / numpy.where(total == 0, 1.0, total)


def topk_by_hand(q, k, block, count, scale):
    """fla naive_nsa_topk, one query and one kv head at a time (ties: lower block first)."""
    *batch, heads, length, dim = q.shape
    groups, key_length = k.shape[-3], k.shape[-2]
    offset = key_length - length
    k_cmp = pooled(k, block)
    blocks = k_cmp.shape[-2]
    out = numpy.full((*batch, groups, length, count), -1, dtype=numpy.int64)
    for b in numpy.ndindex(*batch):
        for g in range(groups):
            for i in range(length):
                t = i + offset
                visible = numpy.array([(c + 1) * block - 1 <= t for c in range(blocks)])
                probs = []
                for h in range(g * heads // groups, (g + 1) * heads // groups):
                    s = numpy.where(visible, k_cmp[b][g] @ q[b][h, i] * scale, -numpy.inf)
                    probs.append(softmax_rows(s[None])[0])
                score = numpy.mean(probs, axis=0)
                forced = numpy.array([c in (0, t // block, t // block - 1) for c in range(blocks)])
                score = numpy.where(forced, 1.0, score)
                ranked = sorted((c for c in range(blocks) if visible[c] or forced[c]), key=lambda c: (-score[c], c))
                chosen = ranked[:count]
                out[b][g, i, :len(chosen)] = chosen
    return out


def selection_mask(block_indices, heads, length, key_length, block):
    """(B, H, L, S) multiplicities: tokens of each query's blocks, token-causal (t = i + S − L)."""
    batch, groups = block_indices.shape[0], block_indices.shape[1]
    counts = numpy.zeros((batch, heads, length, key_length))
    for b, h, i in numpy.ndindex(batch, heads, length):
        for c in block_indices[b, h // (heads // groups), i]:
            if c >= 0:
                for j in range(c * block, min((c + 1) * block, key_length)):
                    if j <= i + key_length - length:
                        counts[b, h, i, j] += 1
    return counts


def gates(seed, heads, length, batch=2):
    return {name: random.uniform((batch, heads, length), seed=(seed, i)) for i, name in enumerate(("g_cmp", "g_slc", "g_swa"))}


@pytest.mark.parametrize("heads, kv_heads, length, key_length, block", [(4, 1, 16, 16, 4), (4, 2, 5, 13, 3), (2, 2, 9, 9, 5)])
def test_compressed_branch_is_full_attention_over_pooled_blocks(backend, heads, kv_heads, length, key_length, block):
    q, k, v = qkv_host(1, heads=heads, kv_heads=kv_heads, length=length, key_length=key_length)
    g = gates(2, heads, length)
    got = reflex.nsa_attention(*(backend.asarray(a) for a in (q, k, v)), g_cmp=backend.asarray(g["g_cmp"]),
                               block_size=block)
    k_cmp, v_cmp = pooled(k, block), pooled(v, block)
    rows = numpy.arange(length)[:, None] + key_length - length
    visible = (numpy.arange(k_cmp.shape[-2])[None, :] + 1) * block - 1 <= rows
    ref = reflex.full_attention(q, k_cmp, v_cmp, mask=visible) * g["g_cmp"][..., None]
    assert max_abs(backend.to_numpy(got), ref) < 1e-13
    assert numpy.all(backend.to_numpy(got)[..., rows[:, 0] < block - 1, :] == 0)  # no whole block yet: 0


@pytest.mark.parametrize("heads, kv_heads, length, key_length, block, count",
                         [(4, 1, 16, 16, 4, 3), (8, 2, 7, 19, 3, 4), (2, 1, 12, 12, 5, 1), (4, 4, 10, 10, 2, 8)])
def test_selection_matches_the_per_query_loop(backend, heads, kv_heads, length, key_length, block, count):
    q, k, _ = qkv_host(3, heads=heads, kv_heads=kv_heads, length=length, key_length=key_length)
    got = reflex.nsa_block_indices(backend.asarray(q), backend.asarray(k), block_size=block, block_counts=count)
    assert numpy.array_equal(backend.to_numpy(got), topk_by_hand(q, k, block, count, q.shape[-1] ** -0.5))


@pytest.mark.parametrize("heads, kv_heads, length, key_length, block", [(4, 1, 16, 16, 4), (4, 2, 6, 14, 3)])
def test_selected_branch_is_full_attention_under_the_token_mask(backend, heads, kv_heads, length, key_length, block):
    q, k, v = qkv_host(4, heads=heads, kv_heads=kv_heads, length=length, key_length=key_length)
    blocks = -(-key_length // block)
    indices = random.integers((2, kv_heads, length, 3), seed=5, low=-1, high=blocks)
    indices[0, 0, 0] = [1, 1, -1]  # a block listed twice counts twice (fla's gather)
    g = gates(6, heads, length)
    got = reflex.nsa_attention(*(backend.asarray(a) for a in (q, k, v)), g_slc=backend.asarray(g["g_slc"]),
                               block_indices=backend.asarray(indices), block_size=block)
    counts = selection_mask(indices, heads, length, key_length, block)
    with numpy.errstate(divide="ignore"):
        ref = reflex.full_attention(q, k, v, bias=numpy.log(counts)) * g["g_slc"][..., None]
    assert max_abs(backend.to_numpy(got), ref) < 1e-13


@pytest.mark.parametrize("window", [1, 3, 40])
def test_sliding_branch_is_a_causal_band(backend, window):
    q, k, v = qkv_host(7, heads=4, kv_heads=2, length=6, key_length=11)
    g = gates(8, 4, 6)
    got = reflex.nsa_attention(*(backend.asarray(a) for a in (q, k, v)), g_swa=backend.asarray(g["g_swa"]),
                               window=window, window_scale=0.3)
    t = numpy.arange(6)[:, None] + 5
    j = numpy.arange(11)[None, :]
    ref = reflex.full_attention(q, k, v, mask=(j <= t) & (j > t - window), scale=0.3) * g["g_swa"][..., None]
    assert max_abs(backend.to_numpy(got), ref) < 1e-13


def test_gated_sum_of_the_branches():
    q, k, v = qkv_host(9, heads=4, kv_heads=1, length=12, key_length=12)
    g = gates(10, 4, 12)
    options = dict(block_size=3, block_counts=2, scale=0.4)
    total, chosen = reflex.nsa_attention(q, k, v, **g, window=4, return_block_indices=True, **options)
    parts = (reflex.nsa_attention(q, k, v, g_cmp=g["g_cmp"], **options)
             + reflex.nsa_attention(q, k, v, g_slc=g["g_slc"], **options)
             + reflex.nsa_attention(q, k, v, g_swa=g["g_swa"], window=4, **options))
    assert max_abs(total, parts) < 1e-14
    assert numpy.array_equal(chosen, reflex.nsa_block_indices(q, k, block_size=3, block_counts=2, scale=0.4))
    given = reflex.nsa_attention(q, k, v, **g, window=4, block_indices=chosen, **options)
    assert numpy.array_equal(given, total)


def test_selecting_every_block_is_causal_attention():
    q, k, v = qkv_host(11, heads=2, kv_heads=1, length=10, key_length=10)
    ones = numpy.ones((2, 2, 10))
    got = reflex.nsa_attention(q, k, v, g_slc=ones, block_size=3, block_counts=4)  # 4 blocks cover 10 tokens
    assert max_abs(got, reflex.full_attention(q, k, v, causal=True)) < 1e-14


@pytest.mark.parametrize("length, key_length", [(1, 1), (1, 9), (3, 3)])
def test_edges(length, key_length):
    q, k, v = qkv_host(12, heads=2, kv_heads=1, length=length, key_length=key_length)
    g = gates(13, 2, length)
    got = reflex.nsa_attention(q, k, v, **g, block_size=4, block_counts=2, window=2)
    assert got.shape == (2, 2, length, 3) and numpy.all(numpy.isfinite(got))
    t = numpy.arange(length)[:, None] + key_length - length
    j = numpy.arange(key_length)[None, :]
    band = reflex.full_attention(q, k, v, mask=(j <= t) & (j > t - 2)) * g["g_swa"][..., None]
    rest = reflex.nsa_attention(q, k, v, g_cmp=g["g_cmp"], g_slc=g["g_slc"], block_size=4, block_counts=2)
    assert max_abs(got, band + rest) < 1e-14


def test_bad_inputs():
    q, k, v = qkv_host(14, heads=4, kv_heads=2, length=8, key_length=8)
    g = gates(15, 4, 8)
    with pytest.raises(ValueError, match="at least one gate"):
        reflex.nsa_attention(q, k, v, block_size=4)
    with pytest.raises(ValueError, match=r"g_cmp must have shape \(..., H, L\)"):
        reflex.nsa_attention(q, k, v, g_cmp=g["g_cmp"][:, :2], block_size=4)
    with pytest.raises(ValueError, match="window is 0"):
        reflex.nsa_attention(q, k, v, g_swa=g["g_swa"], block_size=4)
    with pytest.raises(ValueError, match="block_indices must lie in"):
        reflex.nsa_attention(q, k, v, g_slc=g["g_slc"], block_size=4, block_indices=numpy.full((2, 2, 8, 2), 2))
    with pytest.raises(ValueError, match=r"block_indices must have shape \(..., G, L, n\)"):
        reflex.nsa_attention(q, k, v, g_slc=g["g_slc"], block_size=4, block_indices=numpy.zeros((2, 4, 8, 2), dtype=int))
    with pytest.raises(TypeError, match="block_indices must be an integer"):
        reflex.nsa_attention(q, k, v, g_slc=g["g_slc"], block_size=4, block_indices=numpy.zeros((2, 2, 8, 2)))
    with pytest.raises((TypeError, ValueError), match="block_size must be"):
        reflex.nsa_attention(q, k, v, g_slc=g["g_slc"], block_size=0)
    with pytest.raises((TypeError, ValueError), match="window must be"):
        reflex.nsa_attention(q, k, v, g_swa=g["g_swa"], window=-1)


def test_matches_fla_naive_nsa():
    """fla-core's naive NSA (fla/ops/nsa/naive.py) imports Triton at module level (mean pooling kernel),
    and its sliding branch calls flash_attn: it does not import on a CPU-only machine, so this is skipped
    there. Where it imports, compression, top-n and selection are compared at fla's float32 round-off."""
    torch = pytest.importorskip("torch")
    naive = pytest.importorskip("fla.ops.nsa.naive")
    q, k, v = qkv_host(16, heads=16, kv_heads=1, length=32, key_length=32, dim=8, value_dim=8)
    g = gates(17, 16, 32)
    to_fla = lambda x: torch.from_numpy(numpy.ascontiguousarray(numpy.swapaxes(x, 1, 2)))  # (B, H, T, ·) → (B, T, H, ·)
    got, chosen = reflex.nsa_attention(q, k, v, g_cmp=g["g_cmp"], g_slc=g["g_slc"], block_size=4, block_counts=3,
                                       return_block_indices=True)
    out = naive.naive_nsa(to_fla(q), to_fla(k), to_fla(v), g_cmp=to_fla(g["g_cmp"][..., None])[..., 0],
                          g_slc=to_fla(g["g_slc"][..., None])[..., 0], block_indices=to_fla(chosen), block_counts=3,
                          block_size=4)
    assert max_abs(numpy.swapaxes(out.double().numpy(), 1, 2), got) < 1e-5


@pytest.mark.parametrize("heads, kv_heads, length, key_length, block, given", [(4, 1, 10, 10, 3, False),
                                                                              (4, 2, 4, 9, 2, True)])
def test_vjp_matches_finite_differences(heads, kv_heads, length, key_length, block, given):
    """Selection held constant: with block_indices given, or at inputs whose top-n has no near-tie."""
    from tests.helpers import assert_vjp_matches_finite_differences

    q, k, v = qkv_host(20, heads=heads, kv_heads=kv_heads, length=length, key_length=key_length, batch=(1,))
    g = gates(21, heads, length, batch=1)
    inputs = {"q": q, "k": k, "v": v, **g}
    if given:
        inputs["block_indices"] = random.integers((1, kv_heads, length, 2), seed=22, low=-1,
                                                  high=-(-key_length // block))
    d_out = random.normal((1, heads, length, 3), seed=23)
    grads = assert_vjp_matches_finite_differences("nsa", inputs, d_out, params={"block_size": block, "block_counts": 2,
                                                                                "window": 3}, max_entries=40)
    assert set(grads) == {"q", "k", "v", "g_cmp", "g_slc", "g_swa"}


def test_vjp_on_every_backend(backend):
    q, k, v = qkv_host(24, heads=4, kv_heads=2, length=6, key_length=6)
    g = gates(25, 4, 6)
    d_out = random.normal((2, 4, 6, 3), seed=26)
    params = dict(block_size=2, block_counts=2, window=2)
    host = reflex.vjp("nsa", {"q": q, "k": k, "v": v, **g}, d_out, **params)
    got = reflex.vjp("nsa", {n: backend.asarray(x) for n, x in {"q": q, "k": k, "v": v, **g}.items()},
                     backend.asarray(d_out), **params)
    for name, value in host.items():
        assert max_abs(backend.to_numpy(got[name]), value) < 1e-13

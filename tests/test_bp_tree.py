"""bp_tree_attention: equals full_attention over [tokens; span means] with a host-built BP-Transformer mask."""

from __future__ import annotations

import numpy
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reflex
from tests.helpers import max_abs, qkv_host


def levels(n):
    """Node counts per level: tokens, then ⌈n/2⌉, …, down to the root (1)."""
    sizes = [n]
    while sizes[-1] > 1:
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


def spans(n):
    """(start, stop) of every extended key in order: tokens, level-1 spans, …, the root."""
    return [(t << lvl, min((t + 1) << lvl, n)) for lvl, size in enumerate(levels(n)) for t in range(size)]


def extended(x):
    """Host loops: [x; mean of x over each span] along axis −2."""
    return numpy.stack([x[..., a:b, :].mean(axis=-2) for a, b in spans(x.shape[-2])], axis=-2)


def bp_nodes(a, n, k, causal=False, include_self=True):
    """(level, t) attended by token position a: frontiers stepped level by level (paper §3)."""
    nodes = [(0, a)] if include_self else []
    nodes += [(0, a - r) for r in range(1, k + 1) if a - r >= 0]
    nodes += [] if causal else [(0, a + r) for r in range(1, k + 1) if a + r < n]
    lo, hi, level = max(a - k, 0), a + k + 1, 1
    while 1 << (level - 1) < n:
        size, half = 1 << level, 1 << (level - 1)
        taken = 0
        if lo % size and k:  # the covered interval ends inside a span: its uncovered child stands in
            nodes.append((level - 1, lo // half - 1))
            lo, taken = lo - half, 1
        while taken < k and lo > 0:
            nodes.append((level, lo // size - 1))
            lo, taken = lo - size, taken + 1
        if not causal:
            taken = 0
            if hi % size and k:
                nodes += [(level - 1, hi // half)] if hi < n else []
                hi, taken = hi + half, 1
            while taken < k:
                nodes += [(level, hi // size)] if hi < n else []
                hi, taken = hi + size, taken + 1
        level += 1
    return nodes


def bp_mask(length, n, k, causal=False, include_self=True, offset=0):
    start = numpy.cumsum([0] + levels(n))
    mask = numpy.zeros((length, int(start[-1]) if n else 0), dtype=bool)
    for i in range(length):
        if 0 <= i + offset < n:
            for lvl, t in bp_nodes(i + offset, n, k, causal, include_self):
                assert not mask[i, start[lvl] + t], "a node listed twice"
                mask[i, start[lvl] + t] = True
    return mask


def official_token_sources(n, step, triu):
    """Transcription of BinaryPartition.build_graph (yzh119/BPT graph_builder/builder.pyx): for each
    token i, the node ids it attends (edges with dst = i). Valid for n a power of two."""
    sizes, shift = levels(n), numpy.cumsum([0] + levels(n))
    out = [[] for _ in range(n)]
    for i in range(n):
        lp, rp, lo, ro = i - 1, i + 1, False, False
        for j in range(len(sizes)):
            for _ in range(step):
                if not triu and rp < sizes[j]:
                    out[i].append(shift[j - 1] + 2 * rp + 1 if ro else shift[j] + rp)
                    ro = False
                rp += 1
                if lp >= 0:
                    out[i].append(shift[j - 1] + 2 * lp if lo else shift[j] + lp)
                    lo = False
                lp -= 1
            lo, ro = lo or lp % 2 == 0, ro or rp % 2 == 1
            rp, lp = rp >> 1, lp >> 1
        out[i].append(i)  # the self-loop (j = 0 bottom-up edge)
    return out


def reflex_backend():
    from tests.conftest import make_backend

    return make_backend("numpy")


def check(backend, q, k, v, implementation, **params):
    out, lse = reflex.bp_tree_attention(*map(backend.asarray, (q, k, v)), **params, implementation=implementation,
                                        return_lse=True)
    n = k.shape[-2]
    offset = n - q.shape[-2] if params.get("alignment") == "bottom_right" else 0
    mask = bp_mask(q.shape[-2], n, params["neighbours"], params.get("causal", False),
                   params.get("include_self", True), offset)
    ref = reflex.full_attention(q, extended(k), extended(v), mask=mask, return_lse=True, implementation="dense")
    assert max_abs(backend.to_numpy(out), ref[0]) <= 1e-13 and max_abs(backend.to_numpy(lse), ref[1]) <= 1e-13


@pytest.mark.parametrize("implementation", ["auto", "dense", "tiled", "gather"])
@pytest.mark.parametrize("params", [dict(neighbours=1), dict(neighbours=2, causal=True),
                                    dict(neighbours=1, include_self=False), dict(neighbours=3, alignment="bottom_right")])
def test_equals_full_over_extended_keys(backend, implementation, params):
    q, k, v = qkv_host(1, length=11, key_length=13)  # 13: not a power of two; GQA 4 / 2 heads
    check(backend, q, k, v, implementation, **params)


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 32])
@pytest.mark.parametrize("step", [1, 2, 3])
@pytest.mark.parametrize("triu", [False, True])
def test_matches_official_graph_builder(n, step, triu):
    q, k, v = qkv_host(2, length=n, key_length=n, batch=(), heads=1, kv_heads=1)
    pattern = reflex.get("bp_tree").pattern(q, k, v, neighbours=step, causal=triu)[0]
    official = official_token_sources(n, step, triu)
    for i in range(n):
        assert sorted(official[i]) == list(numpy.flatnonzero(pattern[i])), (i, official[i])


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 8, 13, 16, 21])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("causal", [False, True])
def test_partition_covers_every_position_once(n, k, causal):
    q, k_, v = qkv_host(3, length=n, key_length=n, batch=(), heads=1, kv_heads=1)
    pattern = numpy.asarray(reflex.get("bp_tree").pattern(q, k_, v, neighbours=k, causal=causal)[0])
    for i in range(n):
        cover = numpy.zeros(n, dtype=int)
        for c in numpy.flatnonzero(pattern[i]):
            a, b = spans(n)[c]
            cover[a:b] += 1
        expected = (numpy.arange(n) <= i).astype(int) if causal else numpy.ones(n, dtype=int)
        numpy.testing.assert_array_equal(cover, expected)
    assert pattern[:, n:].sum(axis=1).max(initial=0) <= 2 * k * max(1, n.bit_length())  # O(k log n) spans


def test_gather_lists_match_mask():
    from reflex.backends import numpy_namespace
    from reflex.mechanisms.bp_tree import bp_tree_indices

    xp = numpy_namespace()
    for n, k, causal in [(13, 1, False), (16, 2, True), (7, 3, False), (1, 2, False)]:
        idx = numpy.asarray(bp_tree_indices(xp, "cpu", n, n, k, causal, True, 0))
        mask = bp_mask(n, n, k, causal)
        for i in range(n):
            listed = sorted(int(c) for c in idx[i] if c >= 0)
            assert listed == list(numpy.flatnonzero(mask[i]))  # no key listed twice


def test_tiny_and_degenerate():
    q, k, v = qkv_host(4, length=1, key_length=1)
    assert max_abs(reflex.bp_tree_attention(q, k, v, neighbours=1), numpy.repeat(v, 2, axis=-3)) <= 1e-15  # L = S = 1
    q, k, v = qkv_host(5, length=1, key_length=6)
    check(reflex_backend(), q, k, v, "gather", neighbours=1, alignment="bottom_right")  # L = 1, last position
    q, k, v = qkv_host(6, length=9, key_length=9)
    for n_k in (8, 9, 20):  # neighbours >= L - 1: every token, no span node
        assert max_abs(reflex.bp_tree_attention(q, k, v, neighbours=n_k), reflex.full_attention(q, k, v)) <= 1e-13
        causal = reflex.bp_tree_attention(q, k, v, neighbours=n_k, causal=True, implementation="gather")
        assert max_abs(causal, reflex.full_attention(q, k, v, causal=True)) <= 1e-13
    assert max_abs(reflex.bp_tree_attention(q, k, v, neighbours=0), numpy.repeat(v, 2, axis=-3)) <= 1e-15  # self only
    out, lse = reflex.bp_tree_attention(q, k, v, neighbours=0, include_self=False, return_lse=True)
    assert not out.any() and numpy.all(lse == -numpy.inf)  # nothing to attend
    q, k, v = qkv_host(7, length=5, key_length=3)  # top_left, L > S: rows 3, 4 have no position
    out, lse = reflex.bp_tree_attention(q, k, v, neighbours=1, return_lse=True, implementation="gather")
    assert not out[..., 3:, :].any() and numpy.all(lse[..., 3:] == -numpy.inf)
    check(reflex_backend(), q, k, v, "dense", neighbours=1)


@given(n=st.integers(1, 40), length=st.integers(1, 12), k=st.integers(0, 5), causal=st.booleans(),
       include_self=st.booleans(), alignment=st.sampled_from(["top_left", "bottom_right"]))
def test_hypothesis(n, length, k, causal, include_self, alignment):
    q, k_, v = qkv_host(8, length=length, key_length=n)
    for implementation in ("dense", "gather"):
        check(reflex_backend(), q, k_, v, implementation, neighbours=k, causal=causal, include_self=include_self,
              alignment=alignment)


def test_errors():
    q, k, v = qkv_host(9, length=4, key_length=4)
    with pytest.raises(ValueError, match="neighbours"):
        reflex.bp_tree_attention(q, k, v, neighbours=-1)
    with pytest.raises(ValueError, match="neighbours"):
        reflex.bp_tree_attention(q, k, v, neighbours=1.5)
    with pytest.raises(ValueError, match="causal"):
        reflex.bp_tree_attention(q, k, v, neighbours=1, causal="yes")
    with pytest.raises(ValueError, match="include_self"):
        reflex.bp_tree_attention(q, k, v, neighbours=1, include_self=1)
    with pytest.raises(ValueError, match="implementation"):
        reflex.bp_tree_attention(q, k, v, neighbours=1, implementation="numba")


@pytest.mark.parametrize("causal", [False, True])
def test_tile_filter_with_small_tiles(causal):
    from reflex.backends import numpy_namespace
    from reflex.mechanisms import _kernels
    from reflex.mechanisms.bp_tree import bp_tree_pattern, node_means

    xp = numpy_namespace()
    q, k, v = qkv_host(10, length=12, key_length=19)
    p = _kernels.prepare(q, node_means(xp, "cpu", k, 19), node_means(xp, "cpu", v, 19))
    pattern = bp_tree_pattern(xp, "cpu", 19, 2, causal, True, 19 - 12)
    out, lse = _kernels.tiled(p, scale=0.5, mask=pattern.allowed, tile_active=pattern.tile_active, block_q=2, block_k=3)
    ref = reflex.full_attention(q, extended(k), extended(v), mask=bp_mask(12, 19, 2, causal, True, 7), scale=0.5,
                                return_lse=True)
    assert max_abs(out, ref[0]) <= 1e-13 and max_abs(lse, ref[1]) <= 1e-13

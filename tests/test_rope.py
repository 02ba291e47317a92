"""rope: apply_rope conventions, positions, partial rotary, the relative-position property, attention."""

from __future__ import annotations

import numpy
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reflex
from reflex import random
from tests.helpers import max_abs, qkv_host


def rope_by_hand(x, positions, base, rotary, convention):
    """Textbook rotation of each (a, b) feature pair by p·θ_t, one pair at a time."""
    out = numpy.array(x, dtype=numpy.float64, copy=True)
    half = rotary // 2
    for t in range(half):
        theta = 1.0 / base ** (2 * t / rotary)  # as Hugging Face inv_freq, in float64
        a, b = (t, t + half) if convention == "half" else (2 * t, 2 * t + 1)
        angle = numpy.asarray(positions, dtype=numpy.float64) * theta
        c, s = numpy.cos(angle), numpy.sin(angle)
        out[..., a] = x[..., a] * c - x[..., b] * s
        out[..., b] = x[..., a] * s + x[..., b] * c
    return out


@pytest.mark.parametrize("convention", ["half", "interleaved"])
@pytest.mark.parametrize("rotary_dim", [None, 4, 0])
def test_apply_rope_matches_the_rotation(backend, convention, rotary_dim):
    x = random.normal((2, 3, 5, 8), seed=1)
    positions = random.integers((2, 1, 5), seed=2, low=-50, high=5000)
    got = reflex.apply_rope(backend.asarray(x), positions=backend.asarray(positions), convention=convention,
                            rotary_dim=rotary_dim, base=1000.0)
    ref = rope_by_hand(x, positions, 1000.0, 8 if rotary_dim is None else rotary_dim, convention)
    assert max_abs(backend.to_numpy(got), ref) < 1e-15
    if rotary_dim is not None:
        assert numpy.array_equal(backend.to_numpy(got)[..., rotary_dim:], x[..., rotary_dim:])


def test_conventions_are_a_feature_permutation():
    x = random.normal((3, 7, 10), seed=3)
    to_half = numpy.r_[0:10:2, 1:10:2]  # interleaved pairs (2t, 2t+1) -> halves (t, t + 5)
    half = reflex.apply_rope(x[..., to_half], convention="half")
    inter = reflex.apply_rope(x, convention="interleaved")
    assert max_abs(inter[..., to_half], half) == 0.0


def test_position_zero_is_identity_and_norms_are_kept():
    x = random.normal((4, 6, 8), seed=4)
    assert numpy.array_equal(reflex.apply_rope(x, positions=numpy.zeros(6, dtype=numpy.int64)), x)
    y = reflex.apply_rope(x, positions=numpy.arange(6) * 1000)
    assert max_abs(numpy.linalg.norm(y, axis=-1), numpy.linalg.norm(x, axis=-1)) < 1e-14


@given(m=st.integers(-2000, 2000), n=st.integers(-2000, 2000), shift=st.integers(-5000, 5000),
       convention=st.sampled_from(["half", "interleaved"]), rotary=st.sampled_from([2, 6, 8]),
       seed=st.integers(0, 2 ** 16))
def test_scores_depend_only_on_relative_position(m, n, shift, convention, rotary, seed):
    q, k = random.normal((1, 8), seed=(seed, 0)), random.normal((1, 8), seed=(seed, 1))
    options = dict(convention=convention, rotary_dim=rotary)

    def score(a, b):
        rq = reflex.apply_rope(q, positions=numpy.array([a]), **options)
        rk = reflex.apply_rope(k, positions=numpy.array([b]), **options)
        return float(rq[0] @ rk[0])

    # angles p·θ carry ~|p|·1e-16 of rounding, so the bound scales with the largest position
    bound = 1e-15 * (1 + abs(m) + abs(n) + 2 * abs(shift)) * numpy.linalg.norm(q) * numpy.linalg.norm(k)
    assert abs(score(m + shift, n + shift) - score(m, n)) <= bound


@pytest.mark.parametrize("causal", [False, "bottom_right"])
@pytest.mark.parametrize("implementation", ["dense", "tiled"])
def test_attention_equals_full_on_rotated_inputs(backend, causal, implementation):
    q, k, v = qkv_host(5, length=4, key_length=9)
    out = reflex.rope_attention(*(backend.asarray(a) for a in (q, k, v)), causal=causal, rotary_dim=4,
                                implementation=implementation)
    rq = reflex.apply_rope(q, positions=numpy.arange(5, 9), rotary_dim=4)
    rk = reflex.apply_rope(k, rotary_dim=4)
    assert max_abs(backend.to_numpy(out), reflex.full_attention(rq, rk, v, causal=causal)) < 1e-14


def test_cache_positions_give_the_last_rows(backend):
    q, k, v = qkv_host(6, length=9, key_length=9, dim=6)
    whole = reflex.rope_attention(q, k, v, causal=True)
    tail = reflex.rope_attention(*(backend.asarray(a) for a in (q[..., 6:, :], k, v)), causal="bottom_right")
    assert max_abs(backend.to_numpy(tail), whole[..., 6:, :]) < 1e-14
    explicit = reflex.rope_attention(*(backend.asarray(a) for a in (q[..., 6:, :], k, v)),
                                     positions=backend.asarray(numpy.arange(6, 9)), causal="bottom_right")
    assert max_abs(backend.to_numpy(explicit), backend.to_numpy(tail)) == 0.0
    # one query, one key: RoPE cancels (same position), the output is v
    one = reflex.rope_attention(*(backend.asarray(a) for a in (q[..., :1, :], k[..., :1, :], v[..., :1, :])))
    assert max_abs(backend.to_numpy(one), numpy.repeat(v[..., :1, :], 2, axis=-3)) < 1e-15


def test_shifting_every_position_leaves_attention_unchanged():
    q, k, v = qkv_host(7, length=5, key_length=7, dim=6)
    base = reflex.rope_attention(q, k, v, positions=numpy.arange(2, 7), key_positions=numpy.arange(7))
    shifted = reflex.rope_attention(q, k, v, positions=numpy.arange(2, 7) + 300, key_positions=numpy.arange(7) + 300)
    assert max_abs(base, shifted) < 1e-12


def test_errors():
    x = random.normal((2, 5, 8), seed=8)
    with pytest.raises(ValueError, match="rotary_dim must be an even int"):
        reflex.apply_rope(x, rotary_dim=3)
    with pytest.raises(ValueError, match="convention must be one of"):
        reflex.apply_rope(x, convention="neox")
    with pytest.raises(ValueError, match="positions of shape"):
        reflex.apply_rope(x, positions=numpy.arange(4))
    with pytest.raises(TypeError, match="integer array"):
        reflex.apply_rope(x, positions=numpy.arange(5.0))

"""strided_attention: both Sparse Transformer variants equal full_attention with the paper's index sets."""

from __future__ import annotations

import numpy
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reflex
from tests.helpers import max_abs, qkv_host


def paper_mask(length, key_length, stride, variant, summary=1, causal=True, offset=0):
    """A⁽¹⁾ ∪ A⁽²⁾ written from Child et al. 2019 §4.2 with explicit index sets."""
    mask = numpy.zeros((length, key_length), dtype=bool)
    for i in range(length):
        a = i + offset
        if variant == "strided":
            first = set(range(max(0, a - stride), a + 1)) if causal else set(range(a - stride + 1, a + stride))
            second = {j for j in range(key_length) if (a - j) % stride == 0}
        else:
            first = {j for j in range(key_length) if j // stride == a // stride}
            second = {j for j in range(key_length) if j % stride in range(stride - summary, stride)}
        for j in first | second:
            if 0 <= j < key_length and (not causal or j <= a):
                mask[i, j] = True
    return mask


def check(backend, q, k, v, implementation, **params):
    args = [backend.asarray(a) for a in (q, k, v)]
    out, lse = reflex.strided_attention(*args, **params, implementation=implementation, return_lse=True)
    offset = k.shape[-2] - q.shape[-2] if params.get("alignment") == "bottom_right" else 0
    mask = paper_mask(q.shape[-2], k.shape[-2], params["stride"], params.get("variant", "strided"),
                      params.get("summary", 1), params.get("causal", True), offset)
    ref = reflex.full_attention(q, k, v, mask=mask, return_lse=True, implementation="dense")
    assert max_abs(backend.to_numpy(out), ref[0]) <= 1e-13
    assert max_abs(backend.to_numpy(lse), ref[1]) <= 1e-13


@pytest.mark.parametrize("implementation", ["dense", "tiled"])
@pytest.mark.parametrize("params", [dict(stride=3), dict(stride=4, variant="fixed", summary=2),
                                    dict(stride=3, causal=False), dict(stride=3, variant="fixed", causal=False),
                                    dict(stride=2, alignment="bottom_right")])
def test_equals_full_with_paper_sets(backend, implementation, params):
    q, k, v = qkv_host(1, length=10, key_length=13)
    check(backend, q, k, v, implementation, **params)


def test_limits():
    q, k, v = qkv_host(2, length=7, key_length=7)
    # stride 1: every earlier key (causal full attention)
    assert max_abs(reflex.strided_attention(q, k, v, stride=1), reflex.full_attention(q, k, v, causal=True)) <= 1e-13
    # fixed with c = l: every key is a summary
    full = reflex.strided_attention(q, k, v, stride=3, variant="fixed", summary=3, causal=False)
    assert max_abs(full, reflex.full_attention(q, k, v)) <= 1e-13
    pattern = reflex.get("strided").pattern(q, k, v, stride=3, variant="fixed")
    numpy.testing.assert_array_equal(pattern[0, 0], paper_mask(7, 7, 3, "fixed"))


@given(length=st.integers(1, 18), key_length=st.integers(1, 18), stride=st.integers(1, 6), data=st.data(),
       variant=st.sampled_from(["strided", "fixed"]), causal=st.booleans(),
       alignment=st.sampled_from(["top_left", "bottom_right"]))
def test_hypothesis(length, key_length, stride, data, variant, causal, alignment):
    from tests.conftest import make_backend

    summary = data.draw(st.integers(1, stride))
    q, k, v = qkv_host(3, length=length, key_length=key_length)
    check(make_backend("numpy"), q, k, v, "tiled", stride=stride, variant=variant, summary=summary, causal=causal,
          alignment=alignment)


def test_errors():
    q, k, v = qkv_host(4)
    with pytest.raises(ValueError, match="variant"):
        reflex.strided_attention(q, k, v, stride=2, variant="axial")
    with pytest.raises(ValueError, match="summary"):
        reflex.strided_attention(q, k, v, stride=2, variant="fixed", summary=3)
    with pytest.raises(ValueError, match="stride"):
        reflex.strided_attention(q, k, v, stride=0)

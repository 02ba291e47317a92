"""reflex.testing: per-dtype tolerances, assert_close on any array library, the FlashAttention rule."""

from __future__ import annotations

import math

import array_api_strict
import numpy
import pytest

import reflex
from reflex import fixtures
from reflex.testing import (
    EPS, TOLERANCES, OracleComparison, Tolerance, assert_close, assert_matches_oracle, dtype_name, tolerance,
)
from tests.helpers import qkv_host


def _sdpa_numpy(q, k, v, dtype, *, scale=None):
    """An independent attention in ``dtype`` inputs with float32 scores (as a fused kernel would)."""
    q, k, v = (numpy.asarray(a, dtype=dtype) for a in (q, k, v))
    group = q.shape[-3] // k.shape[-3]
    k, v = numpy.repeat(k, group, axis=-3), numpy.repeat(v, group, axis=-3)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = numpy.einsum("...ld,...sd->...ls", q.astype(numpy.float32), k.astype(numpy.float32)) * numpy.float32(scale)
    weights = numpy.exp(scores - scores.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    return numpy.einsum("...ls,...se->...le", weights, v.astype(numpy.float32)).astype(dtype)


def test_tolerance_per_dtype_and_dtype_spellings():
    assert tolerance("float64") == Tolerance(1e-12, 1e-12)
    assert tolerance(numpy.float32) == tolerance(numpy.dtype("float32")) == tolerance(array_api_strict.float32)
    assert tolerance("float16").atol < tolerance("bfloat16").atol
    for name in TOLERANCES:  # every tolerance allows at least a few ulps of the dtype
        assert tolerance(name).rtol >= 4 * EPS[name]
    assert dtype_name(array_api_strict.float64) == "float64"
    with pytest.raises(ValueError, match="dtype must be one of .*got 'int32'"):
        tolerance("int32")


def test_tolerance_accepts_torch_dtypes():
    torch = pytest.importorskip("torch")
    assert tolerance(torch.bfloat16) == TOLERANCES["bfloat16"]
    assert tolerance(torch.float16) == TOLERANCES["float16"]


def test_assert_close_passes_and_fails_naming_the_worst_element():
    expected = numpy.linspace(-1.0, 1.0, 12).reshape(3, 4)
    assert_close(expected + 1e-13, expected)
    assert_close((expected + 1e-6).astype(numpy.float32), expected)  # float32 default tolerance
    with pytest.raises(AssertionError, match=r"1 of 12 elements .*worst at \(2, 1\)"):
        bad = expected.copy()
        bad[2, 1] += 1e-6
        assert_close(bad, expected)  # float64 tolerance
    assert_close(expected + 1e-3, expected, atol=2e-3, rtol=0)
    with pytest.raises(AssertionError, match="float16"):
        assert_close(expected + 0.1, expected, dtype="float16")


def test_assert_close_shapes_infinities_and_nan():
    with pytest.raises(AssertionError, match=r"shape \(3,\); expected \(1, 3\)"):
        assert_close(numpy.zeros(3), numpy.zeros((1, 3)))
    lse = numpy.array([-numpy.inf, 0.5])
    assert_close(lse.copy(), lse)
    with pytest.raises(AssertionError, match="worst at"):
        assert_close(numpy.array([numpy.nan, 0.5]), lse)
    assert_close(numpy.zeros((0, 2)), numpy.zeros((0, 2)))


def test_assert_close_accepts_other_array_libraries():
    host = numpy.arange(6.0).reshape(2, 3) / 7
    strict = array_api_strict.asarray(host, device=array_api_strict.Device("device1"))
    assert_close(strict, host)
    torch = pytest.importorskip("torch")
    assert_close(torch.from_numpy(host).to(torch.bfloat16), host)  # bfloat16: default tolerance from its dtype
    assert_close(torch.from_numpy(host).float().requires_grad_(), host)
    with pytest.raises(AssertionError, match="bfloat16"):
        assert_close(torch.from_numpy(host + 0.2).to(torch.bfloat16), host)


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float16])
def test_flash_rule_passes_an_independent_low_precision_implementation(dtype):
    q, k, v = qkv_host(0, length=16, key_length=24, dim=8, value_dim=8)
    q, k, v = (a.astype(dtype) for a in (q, k, v))  # the inputs the implementation receives
    actual = _sdpa_numpy(q, k, v, dtype)
    result = assert_matches_oracle(actual, "full", {"q": q, "k": k, "v": v}, dtype=dtype)
    assert isinstance(result, OracleComparison) and result.dtype == numpy.dtype(dtype).name
    assert 0 < result.error <= result.bound and result.naive_error > 0
    assert result.bound == pytest.approx(2 * result.naive_error + result.floor)
    # positional inputs work too
    assert assert_matches_oracle(actual, "full", (q, k, v), dtype=dtype).error == result.error


def test_flash_rule_fails_a_wrong_implementation_with_a_clear_message():
    q, k, v = qkv_host(1, length=16, key_length=24, dim=8, value_dim=8)
    q, k, v = (a.astype(numpy.float16) for a in (q, k, v))
    wrong = _sdpa_numpy(q, k, v, numpy.float16, scale=1.02 / math.sqrt(8))  # a 2 % scale bug
    with pytest.raises(AssertionError) as info:
        assert_matches_oracle(wrong, "full", {"q": q, "k": k, "v": v}, dtype="float16")
    message = str(info.value)
    assert message.startswith("full(): float16 implementation fails the FlashAttention rule")
    assert "at element (" in message and "naive float16 error" in message and "ratio actual/naive" in message


def test_flash_rule_fails_nan_even_when_the_naive_baseline_overflows():
    """Logits ~1e5 overflow float16 (naive error +inf); a NaN output must still fail, a finite exact one pass."""
    q, k, v = qkv_host(4, heads=2, kv_heads=2, length=4, key_length=4, dim=8, value_dim=8)
    q, k = q * 300, k * 300
    inputs = {"q": q, "k": k, "v": v}
    with numpy.errstate(all="ignore"):
        with pytest.raises(AssertionError, match="fails the FlashAttention rule"):
            assert_matches_oracle(numpy.full((2, 2, 4, 8), numpy.nan), "full", inputs, dtype="float16")
        result = assert_matches_oracle(reflex.full_attention(q, k, v), "full", inputs, dtype="float16")
    assert result.naive_error == math.inf and result.error == 0.0


def test_flash_rule_params_reach_the_oracle_and_the_baseline():
    q, k, v = qkv_host(2, length=8, key_length=8, dim=8, value_dim=8)
    q, k, v = (a.astype(numpy.float32) for a in (q, k, v))
    causal = reflex.full_attention(q, k, v, causal="top_left", compute_dtype="float32")
    assert_matches_oracle(causal, "full", {"q": q, "k": k, "v": v}, params={"causal": "top_left"}, dtype="float32")
    with pytest.raises(AssertionError, match=r"^full\(causal='bottom_right', scale=0.5\): "):
        assert_matches_oracle(causal, "full", {"q": q, "k": k, "v": v}, params={"causal": "bottom_right",
                                                                                 "scale": 0.5}, dtype="float32")


def test_flash_rule_floor_when_the_naive_error_is_zero():
    # One key: the softmax weight is exactly 1 in any precision, so the naive error is 0 and only
    # the floor (4 ulps of the output) leaves room.
    q, k, v = qkv_host(3, heads=1, kv_heads=1, length=3, key_length=1, dim=4, value_dim=4)
    v = numpy.full_like(v, 0.75)
    q, k, v = (a.astype(numpy.float16) for a in (q, k, v))
    ulp = float(numpy.spacing(numpy.float16(0.75)))
    near = v.repeat(3, axis=-2) + numpy.float16(ulp)
    result = assert_matches_oracle(near, "full", {"q": q, "k": k, "v": v}, dtype="float16")
    assert result.naive_error == 0 and result.floor == pytest.approx(4 * EPS["float16"] * 0.75)
    with pytest.raises(AssertionError, match="ratio actual/naive = inf"):
        assert_matches_oracle(v.repeat(3, axis=-2) + numpy.float16(8 * ulp), "full", (q, k, v), dtype="float16")


def test_flash_rule_on_torch_bfloat16():
    torch = pytest.importorskip("torch")
    q, k, v = (torch.from_numpy(a).to(torch.bfloat16) for a in qkv_host(4, length=16, key_length=16, dim=8, value_dim=8))
    actual = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    result = assert_matches_oracle(actual, "full", {"q": q, "k": k, "v": v}, dtype=torch.bfloat16)
    assert result.dtype == "bfloat16" and result.error <= result.bound


def test_flash_rule_takes_a_fixture_case(tmp_path):
    fixtures.generate(tmp_path, ["full"], ["tiny"])
    case = fixtures.load(tmp_path)["full-causal_bottom_right-0"]
    inputs32 = {name: a.astype(numpy.float32) for name, a in case.inputs.items()}
    actual = reflex.full_attention(inputs32["q"], inputs32["k"], inputs32["v"], causal="bottom_right",
                                   compute_dtype="float32", implementation="tiled")
    # the case supplies the params (causal) and its id labels any failure
    stored = fixtures.FixtureCase(**{**case.__dict__, "inputs": inputs32})
    assert assert_matches_oracle(actual, "full", stored, dtype="float32").case == "full-causal_bottom_right-0"
    with pytest.raises(AssertionError, match="^full-causal_bottom_right-0: "):
        assert_matches_oracle(actual * 1.01, "full", stored, dtype="float32")


def test_flash_rule_rejects_bad_arguments():
    q, k, v = qkv_host(5)
    with pytest.raises(ValueError, match="dtype must be one of"):
        assert_matches_oracle(q, "full", (q, k, v), dtype="int8")
    with pytest.raises(KeyError, match="did you mean full"):
        assert_matches_oracle(q, "fulll", (q, k, v), dtype="float32")
    with pytest.raises(ValueError, match="lack v"):
        assert_matches_oracle(q, "full", {"q": q, "k": k}, dtype="float32")
    with pytest.raises(AssertionError, match="shape"):
        assert_matches_oracle(q, "full", (q, k, v), dtype="float32")

"""reflex.certify: float64 against higher precision (longdouble, mpmath), bounds, mutants, refusals."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy
import pytest

import reflex
from reflex import random, registry
from reflex.certify import (Certificate, CertificationError, OutputError, case_record, certify, certify_case,
                            longdouble_extends_float64)
from reflex.certify_cli import certify_registry, format_results

mpmath = pytest.importorskip("mpmath")
needs_longdouble = pytest.mark.skipif(not longdouble_extends_float64(), reason="numpy.longdouble is float64 here")


def _case(*, heads=4, kv_heads=2, length=5, key_length=7, dim=8, value_dim=6, seed=3, batch=(2,)):
    return {
        "q": random.normal((*batch, heads, length, dim), seed=(seed, 0)),
        "k": random.normal((*batch, kv_heads, key_length, dim), seed=(seed, 1)),
        "v": random.normal((*batch, kv_heads, key_length, value_dim), seed=(seed, 2)),
    }


def _mpmath_attention(q, k, v, *, bias, mask, scale, softcap, delta):
    """Dense attention in mpmath (dps 50), loop by loop: independent of reflex.certify's formula."""
    batch, heads, length, dim = q.shape
    kv_heads, key_length = k.shape[1:3]
    out = numpy.empty((batch, heads, length, v.shape[-1]), dtype=object)
    with mpmath.workdps(50):
        for b in range(batch):
            for h in range(heads):
                g = h // (heads // kv_heads)
                for i in range(length):
                    logits = []
                    for j in range(key_length):
                        if not mask[b, h, i, j] or j > i + delta:
                            continue
                        dot = mpmath.fsum(mpmath.mpf(float(q[b, h, i, d])) * mpmath.mpf(float(k[b, g, j, d])) for d in range(dim))
                        x = dot * mpmath.mpf(scale)
                        x = mpmath.mpf(softcap) * mpmath.tanh(x / mpmath.mpf(softcap))
                        logits.append((j, x + mpmath.mpf(float(bias[b, h, i, j]))))
                    total = mpmath.fsum(mpmath.exp(x) for _, x in logits)
                    for e in range(v.shape[-1]):
                        if not logits:
                            out[b, h, i, e] = mpmath.mpf(0)
                            continue
                        out[b, h, i, e] = mpmath.fsum(mpmath.exp(x) * mpmath.mpf(float(v[b, g, j, e])) for j, x in logits) / total
    return out


def test_independent_mpmath_case_agrees_to_two_digits():
    inputs = _case()
    mask = random.uniform((2, 4, 5, 7), seed=(3, 5)) < 0.75
    mask[0, 1, 2, :] = False  # a fully masked row: output 0 in both
    bias = random.normal((2, 4, 5, 7), seed=(3, 6))
    params = dict(causal="bottom_right", softcap=3.0, scale=0.7)
    out = reflex.full_attention(inputs["q"], inputs["k"], inputs["v"], mask=mask, bias=bias, **params)
    reference = _mpmath_attention(inputs["q"], inputs["k"], inputs["v"], bias=bias, mask=mask, scale=0.7, softcap=3.0, delta=7 - 5)
    with mpmath.workdps(50):
        errors = [abs(mpmath.mpf(float(a)) - r) for a, r in zip(out.ravel(), reference.ravel())]
        expected = float(max(errors))
        expected_rel = expected / float(max(abs(r) for r in reference.ravel()))
    assert 0 < expected < 1e-14
    cert = certify("full", {**inputs, "mask": mask, "bias": bias}, method="mpmath", dps=50, **params)
    assert cert.method == "mpmath" and cert.precision == "mpmath dps 50"
    got = cert.outputs[0]
    assert got.name == "out"
    assert f"{got.max_abs:.1e}" == f"{expected:.1e}" and math.isclose(got.max_abs, expected, rel_tol=0.01)
    assert math.isclose(got.max_rel, expected_rel, rel_tol=0.01)
    assert got.within_bound and got.max_abs < got.bound
    assert [e.name for e in cert.outputs] == ["out", "lse"]
    assert cert.condition > 0 and cert.softmax_bound > 0 and cert.logit_term > 0 and cert.lse_bound > 0
    if longdouble_extends_float64():  # the longdouble reference is 2^-63-accurate: the same two digits
        wide = certify("full", {**inputs, "mask": mask, "bias": bias}, method="longdouble", **params)
        assert math.isclose(wide.outputs[0].max_abs, expected, rel_tol=0.01)
        assert wide.honoured is True and cert.cross_check < 1e-17


def _mutant_full(monkeypatch, softmax):
    """Replace the registry's ``full`` by a dense attention whose softmax is ``softmax(scores, dtype)``."""
    def attention(q, k, v, /, *, mask=None, bias=None, causal=False, scale=None, softcap=None, return_lse=False,
                  compute_dtype=None, implementation="auto"):
        dtype = numpy.float64 if compute_dtype is None else compute_dtype
        q, k, v = (numpy.asarray(x, dtype=dtype) for x in (q, k, v))
        group = q.shape[-3] // k.shape[-3]
        k, v = numpy.repeat(k, group, axis=-3), numpy.repeat(v, group, axis=-3)
        scores = (q * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)) @ numpy.swapaxes(k, -1, -2)
        if bias is not None:
            scores = scores + numpy.asarray(bias, dtype=dtype)
        weights = softmax(scores, dtype)
        out = weights @ v
        with numpy.errstate(over="ignore"):
            return (out, numpy.log(numpy.sum(numpy.exp(scores), axis=-1))) if return_lse else out

    record = registry.get("full")
    monkeypatch.setitem(registry._REGISTRY, "full", dataclasses.replace(record, function=attention))


def test_float32_softmax_mutant_is_flagged(monkeypatch):
    def softmax(s, dtype):
        w = numpy.exp(s - s.max(axis=-1, keepdims=True))
        return (w / w.sum(axis=-1, keepdims=True)).astype(numpy.float32).astype(dtype)  # the defect

    _mutant_full(monkeypatch, softmax)
    cert = certify("full", _case(), method="mpmath")
    out = cert.outputs[0]
    assert out.within_bound is False and cert.flagged
    assert out.max_abs > 1e3 * out.bound and out.max_rel > 1e-9


@pytest.mark.parametrize("method", ["mpmath", pytest.param("longdouble", marks=needs_longdouble)])
def test_unshifted_softmax_at_large_logits_is_flagged(monkeypatch, method):
    def softmax(s, dtype):
        with numpy.errstate(over="ignore", invalid="ignore"):
            w = numpy.exp(s)  # the defect: no max shift
            return w / w.sum(axis=-1, keepdims=True)

    _mutant_full(monkeypatch, softmax)
    inputs = _case()
    bias = numpy.full((2, 4, 5, 7), 720.0)  # softmax is shift-invariant: the true output is moderate
    cert = certify("full", {**inputs, "bias": bias}, method=method)
    out = cert.outputs[0]
    assert out.max_abs == math.inf and out.within_bound is False and cert.flagged
    assert out.bound < 1e-10 and 0 < out.scale < 10
    # at moderate logits the unshifted softmax is accurate (BHH Thm 3.3): within the bound, as it should be
    modest = certify("full", inputs, method=method)
    assert modest.outputs[0].within_bound and modest.outputs[0].max_rel < 1e-14


def _register(monkeypatch, key, function, **extra):
    record = registry.Mechanism(key=key, function=function, family="Z. test", paper="-", params={},
                                cases=lambda size, seed: [], **extra)
    registry.get("full")  # load the registry before adding to it
    monkeypatch.setitem(registry._REGISTRY, key, record)


@needs_longdouble
def test_silently_float64_mechanism_is_detected(monkeypatch):
    def ignores(q, k, v, /, *, compute_dtype=None):  # computes float64, labels it compute_dtype
        out = reflex.full_attention(q, k, v)
        return out.astype(compute_dtype or numpy.float64)

    def narrows(q, k, v, /, *, compute_dtype=None):  # computes and returns float64 whatever it is asked
        return reflex.full_attention(q, k, v)

    _register(monkeypatch, "test_ignores", ignores)
    _register(monkeypatch, "test_narrows", narrows)
    cert = certify("test_ignores", _case(), method="longdouble")
    assert cert.honoured is None and cert.max_rel == 0 and "bitwise equal" in cert.notes[0]
    cert = certify("test_narrows", _case(), method="longdouble")
    assert cert.honoured is False and cert.flagged and "not honoured" in cert.notes[0]
    honest = certify("full", _case(), method="longdouble")
    assert honest.honoured is True and not honest.flagged and honest.notes == ()


@needs_longdouble
def test_gradients_through_the_vjp(monkeypatch):
    def product(q, k, v, /, *, compute_dtype=None):
        dtype = compute_dtype or numpy.float64
        q, k, v = (numpy.asarray(x, dtype=dtype) for x in (q, k, v))
        return (q @ numpy.swapaxes(k, -1, -2)) @ v

    def product_vjp(inputs, d_out, *, d_lse=None, compute_dtype=None):
        dtype = compute_dtype or numpy.float64
        q, k, v, d = (numpy.asarray(x, dtype=dtype) for x in (inputs["q"], inputs["k"], inputs["v"], d_out))
        kt = numpy.swapaxes(k, -1, -2)
        d_s = d @ numpy.swapaxes(v, -1, -2)
        return {"q": d_s @ k, "k": numpy.swapaxes(d_s, -1, -2) @ q, "v": numpy.swapaxes(q @ kt, -1, -2) @ d}

    _register(monkeypatch, "test_product", product, vjp=product_vjp)
    cert = certify("test_product", _case(kv_heads=4, heads=4))
    assert [g.name for g in cert.gradients] == ["d_k", "d_q", "d_v"]
    assert all(0 < g.max_rel < 1e-14 for g in cert.gradients)


@needs_longdouble
def test_longdouble_refuses_where_it_is_float64(monkeypatch):
    import sys

    module = sys.modules["reflex.certify"]  # the module (reflex.certify may name the function)
    monkeypatch.setattr(module, "longdouble_extends_float64", lambda: False)
    with pytest.raises(CertificationError, match="no finer than float64.*method='mpmath'"):
        certify("full", _case(), method="longdouble")
    assert certify("full", _case()).method == "mpmath"  # auto falls back to mpmath
    with pytest.raises(CertificationError, match="no finer than float64"):
        certify("sliding_window", _case(), window=2)


@pytest.mark.parametrize("key, params", [("linear", {}), ("linear", {"feature_map": "relu", "causal": "bottom_right"}),
                                         ("performer", {"projection": None}), ("performer", {"projection": None, "kernel": "relu"}),
                                         ("performer", {"projection": None, "kernel": "softmax_trig", "causal": True}),
                                         ("full", {"causal": True})])
def test_mpmath_and_longdouble_agree(key, params):
    inputs = _case()
    if "projection" in params:  # Performer: an explicit projection (m, D)
        params = {name: value for name, value in params.items() if name != "projection"}
        inputs["projection"] = random.orthogonal((32, 8), seed=(3, 7))
    cert = certify(key, inputs, method="mpmath", **params)
    assert cert.method == "mpmath" and 0 < cert.max_rel < 1e-14
    if longdouble_extends_float64():
        wide = certify(key, inputs, method="longdouble", **params)
        assert math.isclose(wide.outputs[0].max_abs, cert.outputs[0].max_abs, rel_tol=1e-2)
        assert cert.cross_check < 1e-17  # longdouble honoured end to end on this mechanism


def test_inputs_from_any_backend(xp, backend):
    host = _case()
    expected = certify("full", host, method="mpmath")
    cert = certify("full", {name: backend.asarray(x) for name, x in host.items()}, method="mpmath")
    assert cert.outputs == expected.outputs


def test_edges():
    for shapes in (dict(length=1, key_length=1), dict(heads=2, kv_heads=1, length=3, key_length=1)):
        cert = certify("full", _case(**shapes), method="mpmath", causal="bottom_right")
        assert cert.max_rel < 1e-15
    empty = certify("full", _case(length=0), method="mpmath")
    assert empty.outputs[0].max_abs == 0 and empty.outputs[0].scale == 0 and empty.max_rel == 0


def test_argument_errors():
    inputs = _case()
    with pytest.raises(ValueError, match="method must be one of"):
        certify("full", inputs, method="quad")
    with pytest.raises(ValueError, match="dps must be an int >= 30"):
        certify("full", inputs, dps=20)
    with pytest.raises(ValueError, match="compute_dtype"):
        certify("full", inputs, compute_dtype="float32")
    with pytest.raises(ValueError, match="lacks v"):
        certify("full", {"q": inputs["q"], "k": inputs["k"]})
    with pytest.raises(ValueError, match="does not take"):
        certify("full", {**inputs, "gate": inputs["q"]})
    with pytest.raises(CertificationError, match="no mpmath formula for 'sliding_window'"):
        certify("sliding_window", inputs, method="mpmath", window=2)
    with pytest.raises(CertificationError, match="does not take feature_map"):
        certify("full", inputs, method="mpmath", feature_map="relu")
    with pytest.raises(CertificationError, match="does not take num_features, seed"):
        certify("performer", inputs, method="mpmath", num_features=16, seed=1)
    with pytest.raises(KeyError, match="did you mean"):
        certify("fulll", inputs)
    if longdouble_extends_float64():
        with pytest.raises(ValueError, match="exactly representable in float64"):
            certify("full", {**inputs, "q": inputs["q"].astype(numpy.longdouble)})


def test_record_is_strict_json():
    mechanism = registry.get("full")
    case = mechanism.cases("tiny", 0)[4]  # the masked case: a fully masked row, lse -inf
    record = case_record(mechanism, case)
    text = json.dumps(record, allow_nan=False)
    assert json.loads(text)["method"] == "mpmath" and record["max_rel"] < 1e-14
    assert {e["name"] for e in record["outputs"]} == {"out", "lse"}
    flagged = Certificate("x", "mpmath", "mpmath dps 40", (OutputError("out", math.inf, math.inf, 1.0),))
    assert json.loads(json.dumps(flagged.to_dict(), allow_nan=False))["max_rel"] == "inf"


def test_every_mechanism_tiny_within_1e_14():
    """The goal: float64 within 1e-14 of the output scale on every registry tiny case."""
    results = certify_registry(None, ("tiny",))
    assert len({r.key for r in results}) == len(reflex.list_mechanisms())
    table = format_results(results)
    for r in results:
        if r.certificate is None:  # only where numpy.linalg has no long double (docs/precision.md)
            assert r.key == "nystrom" and "unsupported in linalg" in r.error, (r.key, r.variant, r.error)
            continue
        assert r.certificate.max_rel <= 1e-14, (r.key, r.variant, r.certificate.summary())
        assert not r.certificate.flagged, (r.key, r.variant, r.certificate.summary())
    certified = [r for r in results if r.certificate is not None]
    assert len(certified) > 0.8 * len(results), table
    assert {r.certificate.method for r in certified if r.key in ("full", "linear", "performer")} == {"mpmath"}


def test_certify_case_matches_certify():
    mechanism = registry.get("linear")
    case = mechanism.cases("tiny", 0)[2]
    assert certify_case(mechanism, case).outputs == certify("linear", dict(case.inputs), **dict(case.params)).outputs


def test_cli_certify(capsys):
    from reflex.cli import main

    assert main(["certify", "full", "linear", "--sizes", "tiny"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["mechanism", "size", "case", "method"]
    assert sum(line.startswith("full ") for line in lines) == len(registry.get("full").cases("tiny", 0))
    count = sum(len(registry.get(key).cases("tiny", 0)) for key in ("full", "linear"))
    assert "mpmath" in out and lines[-1].startswith(f"certified {count} of {count} cases of 2 mechanism(s)")
    assert "0 flagged, 0 failed" in lines[-1]
    assert main(["certify", "fulll"]) == 2
    assert "did you mean full" in capsys.readouterr().err
    assert main(["certify", "full", "--sizes", "huge"]) == 2
    assert main(["certify", "full", "--dps", "12"]) == 2
    assert main(["certify", "sliding_window", "--method", "mpmath"]) == 0  # nothing certifiable: listed, not failed
    assert "no mpmath formula" in capsys.readouterr().out


def test_cli_certify_flags_a_mutant(monkeypatch, capsys):
    from reflex.cli import main

    def softmax(s, dtype):
        w = numpy.exp(s - s.max(axis=-1, keepdims=True))
        return (w / w.sum(axis=-1, keepdims=True)).astype(numpy.float16).astype(dtype)

    _mutant_full(monkeypatch, softmax)
    assert main(["certify", "full", "--method", "mpmath"]) == 1
    assert "EXCEEDED" in capsys.readouterr().out


@needs_longdouble
def test_exactly_zero_gradient_is_measured_against_the_gradient_scale():
    mechanism = registry.get("sliding_window")
    if mechanism.vjp is None:
        pytest.skip("sliding_window has no VJP yet")
    case = next(c for c in mechanism.cases("tiny", 0) if c.variant == "self_only")  # each query sees only itself
    cert = certify_case(mechanism, case)
    named = {g.name: g for g in cert.gradients}
    assert named["d_q"].scale == 0 and math.isfinite(named["d_q"].max_rel) and named["d_q"].max_rel < 1e-14
    assert any("zero up to round-off in the reference" in note for note in cert.notes)


def test_fixtures_generate_certify(tmp_path):
    from reflex import fixtures
    from reflex.cli import main

    manifest = fixtures.generate(tmp_path / "set", ["full", "nystrom"], ["tiny"], certify=True)
    records = {case["id"]: case["certificate"] for case in manifest["cases"]}
    assert records["full-mha-0"]["method"] == "mpmath" and records["full-mha-0"]["max_rel"] < 1e-14
    assert records["full-mha-0"]["outputs"][0]["within_bound"] is True
    assert records["nystrom-exact-0"]["method"] is None and "linalg" in records["nystrom-exact-0"]["error"]
    if longdouble_extends_float64():
        assert records["nystrom-iterative-0"]["method"] == "longdouble"
    fixtures.verify(tmp_path / "set")  # the optional field is accepted; loading and verification pass
    from reflex.fixture_schema import FixtureError, validate

    broken = json.loads(json.dumps(manifest))
    broken["cases"][0]["certificate"] = 3
    with pytest.raises(FixtureError, match="certificate: expected an object"):
        validate(broken)
    plain = fixtures.generate(tmp_path / "plain", ["full"], ["tiny"])
    assert all("certificate" not in case for case in plain["cases"])
    assert main(["fixtures", "generate", "--out", str(tmp_path / "cli"), "--mechanisms", "linear", "--sizes", "tiny",
                 "--certify", "--quiet"]) == 0
    again = json.loads((tmp_path / "cli" / "manifest.json").read_text())
    assert {case["certificate"]["method"] for case in again["cases"]} == {"mpmath"}


@needs_longdouble
def test_restricted_softmax_bounds_through_the_pattern(monkeypatch):
    mechanism = registry.get("sliding_window")
    case = mechanism.cases("tiny", 0)[0]
    cert = certify_case(mechanism, case, method="longdouble")
    assert cert.within_bound is True and cert.condition > 0 and cert.softmax_bound > 0
    assert any("through the mechanism's pattern" in note for note in cert.notes)

    def window(q, k, v, /, *, compute_dtype=None):  # a fast path that loses precision in float64 only
        out = reflex.full_attention(q, k, v, mask=_band(q, k), compute_dtype=compute_dtype)
        return out.astype(numpy.float32).astype(numpy.float64) if compute_dtype is None else out

    def _band(q, k):
        return numpy.abs(numpy.arange(q.shape[-2])[:, None] - numpy.arange(k.shape[-2])[None, :]) <= 1

    _register(monkeypatch, "test_window", window, pattern=lambda q, k, v, /: _band(q, k))
    flagged = certify("test_window", _case(), method="longdouble")
    assert flagged.honoured is True and flagged.within_bound is False and flagged.flagged
    assert flagged.outputs[0].max_abs > 1e3 * flagged.outputs[0].bound

    def unrelated(q, k, v, /, *, compute_dtype=None):  # attends more than its declared pattern says
        return reflex.full_attention(q, k, v, compute_dtype=compute_dtype)

    _register(monkeypatch, "test_unrelated", unrelated, pattern=lambda q, k, v, /: _band(q, k))
    loose = certify("test_unrelated", _case(), method="longdouble")
    assert loose.within_bound is None and any("does more than attend its pattern" in note for note in loose.notes)

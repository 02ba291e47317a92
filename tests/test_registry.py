"""Every registered mechanism: record complete, cases run on every backend, agree with the reference."""

from __future__ import annotations

import inspect

import numpy
import pytest

import reflex
from reflex import registry
from reflex.registry import Case, Mechanism, register
from tests.helpers import max_abs

MECHANISMS = [m.key for m in reflex.list_mechanisms()]


def _first(result):
    return result[0] if isinstance(result, tuple) else result


@pytest.mark.parametrize("key", MECHANISMS)
def test_record_is_complete(key):
    m = reflex.get(key)
    assert m.key == key and m.paper and m.family and m.params
    doc = inspect.getdoc(m.function) or ""
    assert m.summary and len(doc.splitlines()) > 3, f"{key}: docstring needs the equation and the paper"
    assert getattr(reflex, m.function.__name__) is m.function, f"{key}: reflex.{m.function.__name__} is not exported"
    cases = m.cases("tiny", 0)
    assert cases and len({c.variant for c in cases}) == len(cases), f"{key}: case variants must be unique and named"
    again = m.cases("tiny", 0)
    for a, b in zip(cases, again):
        assert a.params == b.params
        for name in a.inputs:
            numpy.testing.assert_array_equal(a.inputs[name], b.inputs[name])


@pytest.mark.parametrize("key", MECHANISMS)
def test_cases_run_on_every_backend(key, backend):
    m = reflex.get(key)
    for case in m.cases("tiny", 0):
        host = case.call(m)
        originals = {name: numpy.array(a, copy=True) for name, a in case.inputs.items() if isinstance(a, numpy.ndarray)}
        result = _first(case.call(m, lambda a: backend.asarray(a) if isinstance(a, numpy.ndarray) else a))
        got = backend.to_numpy(result)
        assert max_abs(got, _first(host)) < 1e-13, f"{key}/{case.variant} on {backend.name}"
        for name, a in originals.items():
            numpy.testing.assert_array_equal(case.inputs[name], a, err_msg=f"{key}/{case.variant} mutated {name}")
        if m.reference is not None:
            ref = _first(case.call(Mechanism(**{**m.__dict__, "function": m.reference})))
            assert max_abs(_first(host), ref) < 1e-13, f"{key}/{case.variant}: differs from its reference"


def test_duplicate_key_raises():
    m = reflex.get("full")
    with pytest.raises(ValueError, match="already registered"):
        register(m)


def test_unknown_key_suggests():
    with pytest.raises(KeyError, match="did you mean full"):
        reflex.get("fulll")


def test_case_call_overrides():
    case = Case("x", {"q": numpy.ones((1, 1, 2)), "k": numpy.ones((1, 1, 2)), "v": numpy.ones((1, 1, 2))}, {})
    assert case.call(reflex.get("full"), implementation="tiled").shape == (1, 1, 2)
    with pytest.raises(ValueError, match="size must be one of"):
        registry.size_scale("huge")

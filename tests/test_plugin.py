"""The pytest plugin (reflex/pytest_plugin.py): oracle, reflex_cases, reflex_fixture_set, run with pytester."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

import numpy
import pytest

import reflex
from reflex.pytest_plugin import Oracle, OracleCase, reflex_cases

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent


def _installed_entry_point() -> bool:
    return any(ep.value == "reflex.pytest_plugin" for ep in importlib.metadata.entry_points(group="pytest11"))


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """Run pytest in pytester's folder with the plugin: through its entry point when reflex is
    installed (the user's way), else named with -p. In a subprocess, so Numba and the registry
    start as a user's session would."""
    plugin = () if _installed_entry_point() else ("-p", "reflex.pytest_plugin")
    return pytester.runpytest_subprocess(*plugin, "-p", "no:randomly", "-p", "no:cacheprovider", *args)


def test_entry_point_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["entry-points"]["pytest11"] == {"reflex": "reflex.pytest_plugin"}


def test_reflex_cases_are_the_registry_cases():
    params = reflex_cases("full", sizes=("tiny", "small"))
    cases = [p.values[0] for p in params]
    registered = [c.variant for c in reflex.get("full").cases("tiny", 0)]
    count = len(registered)
    assert [c.variant for c in cases] == registered * 2 and [c.size for c in cases] == ["tiny"] * count + ["small"] * count
    assert [p.id for p in params][:2] == ["full-mha-0", "full-gqa-0"] and all(p.id == c.id for p, c in zip(params, cases))
    assert all(isinstance(c, OracleCase) and c.key == "full" for c in cases)
    only = reflex_cases("full", sizes="tiny", variants=("gqa",))
    assert [p.id for p in only] == ["full-gqa-0"]
    case = only[0].values[0]
    numpy.testing.assert_array_equal(case.expected(), reflex.full_attention(*case.args(), **case.kwargs()))


@pytest.mark.parametrize("call, message", [
    (lambda: reflex_cases("fulll"), "did you mean full"),
    (lambda: reflex_cases("full", sizes=("huge",)), "size must be one of tiny, small, medium, large; got 'huge'"),
    (lambda: reflex_cases("full", variants=("nope",)), "full has no variant 'nope'; its variants: bias,"),
])
def test_reflex_cases_errors(call, message):
    with pytest.raises((KeyError, ValueError), match=message):
        call()


def test_oracle_reads_any_library():
    torch = pytest.importorskip("torch")
    rng = numpy.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 5, 4)) for _ in range(3))
    expected = reflex.full_attention(q, k, v, causal=True)
    got = Oracle()("full", [torch.from_numpy(q).float(), torch.from_numpy(k).float(), torch.from_numpy(v).float()],
                   causal=True)
    assert isinstance(got, numpy.ndarray) and got.dtype == numpy.float64
    # the float32 inputs, upcast exactly: the oracle answers for the values the kernel saw
    numpy.testing.assert_array_equal(got, reflex.full_attention(*(a.astype(numpy.float32).astype(numpy.float64)
                                                                   for a in (q, k, v)), causal=True))
    assert numpy.max(numpy.abs(got - expected)) > 0


PASSING = '''
import numpy as np
import pytest
import reflex
from reflex.pytest_plugin import reflex_cases


@pytest.mark.parametrize("case", reflex_cases("sliding_window", sizes="tiny"))
def test_cases(case, oracle):
    out = reflex.get("sliding_window").function(*case.args(), **case.kwargs())
    oracle.assert_close(out.astype(np.float32), "sliding_window", case, dtype="float32")


def test_set_once(reflex_fixture_set, tmp_path_factory):
    assert reflex_fixture_set.manifest["mechanisms"] == ["full"]
    assert {case.size for case in reflex_fixture_set} == {"tiny"}
    assert str(reflex_fixture_set.path).startswith(str(tmp_path_factory.getbasetemp()))


def test_set_same_object(reflex_fixture_set, request):
    assert reflex_fixture_set is request.getfixturevalue("reflex_fixture_set")
'''

FAILING = '''
import numpy as np
from reflex.pytest_plugin import reflex_cases
import pytest


@pytest.mark.parametrize("case", reflex_cases("full", sizes="tiny", variants=("mha",)))
def test_wrong_kernel(case, oracle):
    q, k, v = case.args()
    out = np.zeros(q.shape[:-1] + (v.shape[-1],))
    oracle.assert_close(out, "full", case, dtype="float32")
'''


def test_plugin_in_a_user_session(pytester):
    pytester.makepyfile(test_user=PASSING)
    result = _run(pytester, "-q")
    result.assert_outcomes(passed=len(reflex.get("sliding_window").cases("tiny", 0)) + 2)


def test_plugin_reports_a_wrong_kernel(pytester):
    pytester.makepyfile(test_user=FAILING)
    result = _run(pytester, "-q")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*full output differs from expected in * elements (tolerance float32*"])


def test_plugin_loads_a_given_fixture_set(pytester, tmp_path):
    from reflex import fixtures

    fixtures.generate(tmp_path / "set", ["dilated"], ["tiny"])
    pytester.makepyfile(test_user='''
def test_loaded(reflex_fixture_set):
    assert reflex_fixture_set.manifest["mechanisms"] == ["dilated"]
''')
    _run(pytester, "-q", "--reflex-fixtures", str(tmp_path / "set")).assert_outcomes(passed=1)


def test_plugin_ini_options(pytester):
    pytester.makeini("[pytest]\nreflex_fixture_mechanisms = dilated, strided\nreflex_fixture_sizes = tiny\n")
    pytester.makepyfile(test_user='''
def test_generated(reflex_fixture_set):
    assert reflex_fixture_set.manifest["mechanisms"] == ["dilated", "strided"]
''')
    _run(pytester, "-q").assert_outcomes(passed=1)


def test_documented_example_passes(pytester):
    """examples/test_with_reflex_plugin.py, the complete example the docs point to, passes as written."""
    pytester.makepyfile(test_example=(ROOT / "examples" / "test_with_reflex_plugin.py").read_text())
    result = _run(pytester, "-q")
    outcomes = result.parseoutcomes()
    assert result.ret == 0 and outcomes.get("passed", 0) >= 18 and "failed" not in outcomes, result.stdout.str()

"""CuPy on a CUDA device: every registered case equals its NumPy result (``pytest -m gpu``).

Deselected by default (``addopts = -m 'not gpu'``); skipped where CuPy or a device is missing. On a
machine with a GPU, run ``pip install -e '.[test,cuda]' && pytest -m gpu``.
"""

from __future__ import annotations

import numpy
import pytest

import reflex
from tests.helpers import max_abs

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cupy():
    cp = pytest.importorskip("cupy")
    try:
        cp.cuda.runtime.getDeviceCount()
    except Exception as err:  # no driver / no device
        pytest.skip(f"no CUDA device: {err}")
    return cp


@pytest.mark.parametrize("key", [m.key for m in reflex.list_mechanisms()])
def test_cases_match_numpy_on_cupy(cupy, key):
    m = reflex.get(key)
    for case in m.cases("small", 0):
        host = case.call(m)
        got = case.call(m, lambda a: cupy.asarray(a) if isinstance(a, numpy.ndarray) else a)
        host, got = (r[0] if isinstance(r, tuple) else r for r in (host, got))
        assert isinstance(got, cupy.ndarray), f"{key}/{case.variant}: result left the GPU"
        assert max_abs(cupy.asnumpy(got), host) < 1e-12, f"{key}/{case.variant}"

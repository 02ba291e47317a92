"""reflex.backends: namespaces, dispatch predicate, host transfer, DLPack."""

from __future__ import annotations

import numpy
import pytest

from reflex import backends


def test_namespace_mixed_libraries_is_a_type_error():
    strict = pytest.importorskip("array_api_strict")
    with pytest.raises(TypeError, match="different array libraries: array_api_strict, numpy"):
        backends.namespace(numpy.ones(2), strict.ones(2))


def test_namespace_rejects_non_arrays_and_ignores_none():
    with pytest.raises(TypeError, match="expected an array"):
        backends.namespace([1.0, 2.0])
    with pytest.raises(TypeError, match="at least one array"):
        backends.namespace(None)
    assert backends.namespace(numpy.ones(2), None) is backends.numpy_namespace()


def test_is_plain_numpy():
    assert backends.is_plain_numpy(numpy.ones(3))
    assert backends.is_plain_numpy(numpy.ones(3, dtype=numpy.float32))
    assert not backends.is_plain_numpy(numpy.ones(3, dtype=numpy.int64))
    assert not backends.is_plain_numpy(numpy.ma.masked_array(numpy.ones(3)))
    assert not backends.is_plain_numpy(numpy.float64(1.0))
    assert not backends.is_plain_numpy(1.0)


def test_round_trip_every_backend(backend):
    host = numpy.arange(6.0).reshape(2, 3)
    x = backend.asarray(host)
    assert backends.device(x) == backend.device or backend.name.startswith("numpy")
    numpy.testing.assert_array_equal(backend.to_numpy(x), host)
    back = backends.to_numpy(x)
    back[0, 0] = 99.0  # to_numpy copies: the backend array is untouched
    assert backend.to_numpy(x)[0, 0] == 0.0


def test_from_dlpack_to_numpy():
    torch = pytest.importorskip("torch")
    t = torch.arange(4, dtype=torch.float64)
    numpy.testing.assert_array_equal(backends.from_dlpack(t), numpy.arange(4.0))


def test_backend_namespace_names():
    xp, device = backends.backend_namespace("numpy")
    assert xp is backends.numpy_namespace() and device == "cpu"
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.backend_namespace("jax")

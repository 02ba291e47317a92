"""The backend matrix: every test taking ``xp`` runs on each backend reflex supports on a CPU.

- ``numpy``: plain NumPy (the Numba paths, where a mechanism has one);
- ``strict``: array-api-strict on its CPU device — only standard functions exist;
- ``strict-device1``: array-api-strict on its emulated second device — a creation call without
  ``device=`` lands on the wrong device and the next operation fails (the commonest CuPy bug);
- ``torch``: PyTorch CPU through array-api-compat (skipped when torch is absent);
- ``numpy-readonly``: NumPy inputs with the write flag off — any in-place write to an input fails.

Tests build inputs on the host (``reflex.random``) and call ``backend.asarray`` to move them.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import numpy
import pytest
from hypothesis import settings

from reflex.backends import from_numpy, numpy_namespace, to_numpy
from reflex.mechanisms import _kernels

settings.register_profile("reflex", deadline=None, max_examples=25, derandomize=True)
settings.load_profile("reflex")

BACKEND_NAMES = ["numpy", "strict", "strict-device1", "torch", "numpy-readonly"]


@dataclass(frozen=True)
class Backend:
    """A backend of the test matrix: its name, namespace and device."""

    name: str
    xp: Any
    device: Any

    def asarray(self, host: Any) -> Any:
        """Move a host array (or anything NumPy accepts) to this backend."""
        host = numpy.asarray(host)
        if self.name == "numpy-readonly":
            out = numpy.array(host, copy=True)
            out.setflags(write=False)
            return out
        return from_numpy(host, self.xp, self.device)

    def to_numpy(self, x: Any) -> numpy.ndarray:
        """Back to host NumPy, checking the result's device first."""
        if self.name.startswith("strict"):
            assert x.device == self.device, f"result is on {x.device}; inputs were on {self.device}"
        return to_numpy(x)


def make_backend(name: str) -> Backend:
    if name in ("numpy", "numpy-readonly"):
        return Backend(name, numpy_namespace(), "cpu")
    if name.startswith("strict"):
        import array_api_strict

        device = array_api_strict.Device("device1" if name == "strict-device1" else "CPU_DEVICE")
        return Backend(name, array_api_strict, device)
    if name == "torch":
        if importlib.util.find_spec("torch") is None:
            pytest.skip("torch is not installed")
        import array_api_compat.torch
        import torch

        return Backend(name, array_api_compat.torch, torch.device("cpu"))
    raise ValueError(name)


@pytest.fixture(params=BACKEND_NAMES)
def backend(request: pytest.FixtureRequest) -> Backend:
    """Each backend of the matrix in turn."""
    return make_backend(request.param)


@pytest.fixture
def xp(backend: Backend) -> Any:
    """The namespace of the current backend."""
    return backend.xp


@pytest.fixture
def small_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the tiled kernel use 3 × 4 tiles, so index-grid terms are evaluated tile by tile and
    tile filters are exercised on sizes the tiles do not divide."""
    monkeypatch.setitem(_kernels.tiled.__kwdefaults__, "block_q", 3)
    monkeypatch.setitem(_kernels.tiled.__kwdefaults__, "block_k", 4)

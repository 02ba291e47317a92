"""The one layer that touches array libraries directly.

Everything else in reflex receives arrays, asks :func:`namespace` for their array-API namespace
``xp`` and calls ``xp.<function>(...)`` with ``device=`` on every creation call. This module is the
only place that imports NumPy, CuPy or ``array_api_compat``; Numba lives in
:mod:`reflex.backends.numba_kernels` and is imported lazily, only when a plain NumPy input takes a
Numba path.

Dispatch rule: an input that is *exactly* ``numpy.ndarray`` with a
floating dtype may take a Numba kernel; everything else (CuPy, torch, array-api-strict, NumPy
subclasses such as masked arrays) takes the vectorised array-API path.
"""

from __future__ import annotations

import importlib
import os
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any, Callable, Sequence

import array_api_compat
import numpy
import threadpoolctl

__all__ = [
    "namespace",
    "device",
    "is_plain_numpy",
    "is_array",
    "is_real_floating_dtype",
    "to_numpy",
    "from_numpy",
    "from_dlpack",
    "numpy_namespace",
    "backend_namespace",
    "library_name",
    "numba_kernels",
    "parallel_map",
]

# Public names of the backends that `reflex run --backend` and the tests know about.
BACKENDS = ("numpy", "array_api_strict", "torch", "cupy")


def is_array(x: Any) -> bool:
    """Whether ``x`` is an array of a library that array-api-compat supports."""
    return (array_api_compat.is_array_api_obj(x) and not isinstance(x, (bool, int, float, complex, type))
            and not isinstance(x, numpy.generic))


def is_real_floating_dtype(dtype: Any) -> bool:
    """Whether ``dtype`` (a NumPy/CuPy dtype or scalar type, a torch dtype, an array-API dtype, or a
    name) is a real floating dtype. ``numpy.longdouble`` is; integer, bool and complex types are not."""
    if isinstance(dtype, numpy.dtype) or (isinstance(dtype, type) and issubclass(dtype, numpy.generic)):
        return numpy.dtype(dtype).kind == "f"
    if type(dtype).__module__ == "torch":
        return bool(dtype.is_floating_point) and not bool(dtype.is_complex)
    if isinstance(dtype, type):
        return False
    name = str(dtype).rsplit(".", 1)[-1].lower()
    return name.startswith(("float", "bfloat")) and "complex" not in name


def namespace(*arrays: Any) -> ModuleType:
    """The array-API namespace shared by ``arrays`` (``None`` entries are ignored).

    Raises ``TypeError`` naming the libraries when the arrays come from different array libraries
    (reflex never converts between libraries silently), or when an argument is not an array.
    """
    present = [a for a in arrays if a is not None]
    if not present:
        raise TypeError("namespace() needs at least one array")
    for a in present:
        if not is_array(a):
            raise TypeError(f"expected an array (NumPy, CuPy, torch, array-api-strict, ...); got {type(a).__name__}")
    libraries = sorted({library_name(a) for a in present})
    if len(libraries) > 1:
        raise TypeError(f"arrays come from different array libraries: {', '.join(libraries)}; pass all inputs from one library")
    return array_api_compat.array_namespace(*present)


def library_name(x: Any) -> str:
    """Short name of the array library ``x`` belongs to: 'numpy', 'cupy', 'torch', 'array_api_strict', ..."""
    return type(x).__module__.split(".")[0]


def device(x: Any) -> Any:
    """The device ``x`` lives on (array-API ``device``), e.g. ``'cpu'`` or ``Device('device1')``."""
    return array_api_compat.device(x)


def is_plain_numpy(x: Any) -> bool:
    """Exactly ``numpy.ndarray`` with a real floating dtype: the inputs that may take a Numba kernel.

    Masked arrays, matrices and other subclasses, NumPy scalars and non-float arrays are not.
    """
    return type(x) is numpy.ndarray and x.dtype.kind == "f"


def to_numpy(x: Any) -> numpy.ndarray:
    """A host NumPy copy of any supported array (for tests, fixtures and printing)."""
    if isinstance(x, numpy.ndarray):
        return numpy.array(x, copy=True)
    lib = library_name(x)
    if lib == "torch":
        return x.detach().cpu().numpy().copy()
    if lib == "cupy":
        return x.get()
    return numpy.from_dlpack(x).copy()


def from_numpy(host: numpy.ndarray, xp: ModuleType, device: Any = None) -> Any:
    """Move a host NumPy array into namespace ``xp`` on ``device`` (a copy; dtype kept)."""
    host = numpy.ascontiguousarray(host)
    if xp is numpy_namespace():
        return numpy.array(host, copy=True)
    if xp.__name__.endswith("torch"):
        import torch  # only for the torch backend; torch is optional

        return torch.from_numpy(host.copy()).to(device if device is not None else "cpu")
    return xp.asarray(host, device=device, copy=True)


def from_dlpack(x: Any, xp: ModuleType | None = None) -> Any:
    """Import an array through DLPack into ``xp`` (NumPy by default), zero-copy where possible."""
    xp = numpy_namespace() if xp is None else xp
    return xp.from_dlpack(x)


def numpy_namespace() -> ModuleType:
    """The array-API-compatible NumPy namespace."""
    return array_api_compat.array_namespace(numpy.empty(0))


def backend_namespace(name: str) -> tuple[ModuleType, Any]:
    """``(xp, device)`` for a backend named by the CLI: numpy, array_api_strict, torch, cupy."""
    if name == "numpy":
        return numpy_namespace(), "cpu"
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    try:
        module = importlib.import_module(name)
    except ImportError as err:
        raise ValueError(f"backend {name!r} is not installed ({err})") from err
    if name == "array_api_strict":
        return module, module.Device("CPU_DEVICE")
    if name == "torch":
        return importlib.import_module("array_api_compat.torch"), "cpu"
    return importlib.import_module("array_api_compat.cupy"), None


def parallel_map(fn: Callable[[Any], Any], items: Sequence[Any], *, like: Any) -> list[Any]:
    """``[fn(item) for item in items]``, on one thread per core when ``like`` is a NumPy array.

    NumPy's elementwise functions run on one core and release the GIL, so independent blocks of
    work (query blocks) gain from a thread per core. BLAS is limited to one thread meanwhile, or
    its own threads would oversubscribe the cores. Each item's arithmetic is the same whichever
    thread runs it, so results are bitwise reproducible. Other libraries (torch, CuPy: parallel or
    asynchronous themselves; array-api-strict) run the items in order.
    """
    workers = min(os.cpu_count() or 1, len(items))
    if type(like) is not numpy.ndarray or workers < 2:
        return [fn(item) for item in items]
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, items))


def numba_kernels() -> ModuleType:
    """The Numba kernel package, imported on first use (compiling is costly; CuPy users never pay)."""
    return importlib.import_module("reflex.backends.numba_kernels")

"""Assertions for users' test suites: compare any array library's output with the float64 oracle.

Two rules, both comparing on the host in float64:

1. **Per-dtype tolerances** (:func:`tolerance`, :func:`assert_close`): element-wise
   ``|actual − expected| ≤ atol + rtol·|expected|``, with ``atol = rtol`` chosen per tested dtype.

   ========  =======  ===================================================================
   dtype     tol      why
   ========  =======  ===================================================================
   float64   1e-12    ~4500 ulps: room for any summation order at L, S ≈ 10⁵; a float32
                      leak (≥ 1e-8) fails.
   float32   1e-5     ~80 ulps: float32 SDPA reaches ≤ 4e-7·(1 + |o|) on reflex's cases.
   float16   5e-3     ~5 ulps: input rounding dominates; fp16 SDPA reaches ≤ 1e-3.
   bfloat16  4e-2     ~5 ulps: bf16 SDPA reaches ≤ 8e-3.
   ========  =======  ===================================================================

   (Measured against reflex's ``full`` cases, tiny to large, with torch 2.13 CPU SDPA computing
   from the float64 inputs rounded to the tested dtype.)

2. **The FlashAttention rule** (:func:`assert_matches_oracle`; Dao et al. 2022, §4 and the
   flash-attn test suite): a low-precision implementation's max error against the float64 oracle
   may be at most ``factor`` times the max error of a naive evaluation in the same precision
   (reflex itself run with ``compute_dtype=dtype``), plus a floor of a few ulps of the output:

   .. math::

       \\max|O_\\text{impl} - O_{64}| \\le k\\,\\max|O_\\text{naive}(\\text{dtype}) - O_{64}|
           + u\\,\\varepsilon_\\text{dtype} \\max|O_{64}|

   Both errors are measured on the same inputs (the ones the implementation received, upcast
   exactly to float64), so input rounding cancels and what remains is arithmetic error.

Inputs may be NumPy, CuPy, torch (any dtype, bfloat16 included, on any device), array-api-strict
or anything ``numpy.asarray`` accepts; nothing here imports an array library other than NumPy.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple, Sequence

import numpy

from reflex import registry
from reflex.backends import backend_namespace, from_numpy, is_array, library_name, to_numpy

__all__ = ["Tolerance", "tolerance", "assert_close", "assert_matches_oracle", "OracleComparison", "dtype_name",
           "TOLERANCES", "EPS"]


class Tolerance(NamedTuple):
    """Element-wise rule ``|actual − expected| ≤ atol + rtol·|expected|``."""

    atol: float
    rtol: float


TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(1e-12, 1e-12),
    "float32": Tolerance(1e-5, 1e-5),
    "float16": Tolerance(5e-3, 5e-3),
    "bfloat16": Tolerance(4e-2, 4e-2),
}

# Machine epsilon (spacing at 1.0) of each tested dtype.
EPS: dict[str, float] = {"float64": 2.0 ** -52, "float32": 2.0 ** -23, "float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}


def dtype_name(dtype: Any) -> str:
    """``"float32"`` for ``"float32"``, ``numpy.float32``, ``torch.float32``, ``xp.float32``, ..."""
    if isinstance(dtype, str):
        name = dtype
    else:
        try:
            name = numpy.dtype(dtype).name
        except TypeError:
            name = str(dtype)
    return name.rsplit(".", 1)[-1]


def tolerance(dtype: Any) -> Tolerance:
    """The recommended ``(atol, rtol)`` for outputs computed in ``dtype`` (see the module table)."""
    name = dtype_name(dtype)
    if name not in TOLERANCES:
        raise ValueError(f"dtype must be one of {', '.join(TOLERANCES)}; got {name!r}")
    return TOLERANCES[name]


def _host(x: Any) -> numpy.ndarray:
    """A host NumPy copy of ``x``; floating arrays become float64 (exact for every tested dtype)."""
    if is_array(x) and not isinstance(x, numpy.ndarray) and library_name(x) == "torch":
        x = x.detach()
        if x.is_floating_point():
            x = x.double()  # bfloat16 has no NumPy counterpart; the upcast is exact
    try:
        host = to_numpy(x) if is_array(x) else numpy.asarray(x)
    except (TypeError, RuntimeError, BufferError):  # e.g. an exotic dtype DLPack cannot carry
        host = numpy.asarray(x)
    if host.dtype.kind == "f" or host.dtype.name == "bfloat16":
        host = host.astype(numpy.float64)
    return host


def _describe(index: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(i) for i in index) + ")" if index else "()"


def _abs_error(actual: numpy.ndarray, expected: numpy.ndarray) -> numpy.ndarray:
    """|actual − expected| in float64: equal values (infinities included) give 0; NaN or a
    mismatched infinity gives +∞."""
    a, e = actual.astype(numpy.float64), expected.astype(numpy.float64)
    with numpy.errstate(invalid="ignore", over="ignore"):
        error = numpy.where(a == e, 0.0, numpy.abs(a - e))
    return numpy.where(numpy.isnan(error) | ~numpy.isfinite(e) & (a != e), numpy.inf, error)


def _outside(actual: numpy.ndarray, expected: numpy.ndarray, atol: float, rtol: float
             ) -> tuple[numpy.ndarray, numpy.ndarray]:
    """(|actual − expected|, where it exceeds ``atol + rtol·|expected|``); a non-finite expected
    value must be matched exactly."""
    error = _abs_error(actual, expected)
    with numpy.errstate(invalid="ignore", over="ignore"):
        allowed = atol + rtol * numpy.abs(expected.astype(numpy.float64))
    return error, ~(error <= numpy.where(numpy.isfinite(allowed), allowed, 0.0))


def assert_close(actual: Any, expected: Any, *, dtype: Any = None, atol: float | None = None,
                 rtol: float | None = None, name: str = "actual") -> None:
    """Assert ``|actual − expected| ≤ atol + rtol·|expected|`` element-wise, on the host in float64.

    ``dtype`` picks the default tolerances (:func:`tolerance`); by default it is ``actual``'s dtype
    (float64 when that is not floating). Shapes must match exactly (no broadcasting). Equal
    infinities match; a NaN matches nothing. The failure message names the worst element.
    """
    if dtype is None:
        dtype = getattr(actual, "dtype", "float64")
        if dtype_name(dtype) not in TOLERANCES:
            dtype = "float64"
    tol = tolerance(dtype)
    atol = tol.atol if atol is None else float(atol)
    rtol = tol.rtol if rtol is None else float(rtol)
    a, e = _host(actual), _host(expected)
    if a.shape != e.shape:
        raise AssertionError(f"{name} has shape {a.shape}; expected {e.shape}")
    if a.size == 0:
        return
    a64, e64 = a.astype(numpy.float64), e.astype(numpy.float64)
    error, bad = _outside(a64, e64, atol, rtol)
    if not numpy.any(bad):
        return
    worst = _worst(error, bad, e64, atol, rtol)
    raise AssertionError(
        f"{name} differs from expected in {int(numpy.sum(bad))} of {a.size} elements "
        f"(tolerance {dtype_name(dtype)}: atol {atol:.1e}, rtol {rtol:.1e}); worst at {_describe(worst)}: "
        f"actual {float(a64[worst]):.9g}, expected {float(e64[worst]):.9g}, |diff| {error[worst]:.3e}, "
        f"max |diff| {float(numpy.max(error)):.3e}"
    )


def _worst(error: numpy.ndarray, bad: numpy.ndarray, expected: numpy.ndarray, atol: float, rtol: float
           ) -> tuple[int, ...]:
    """Index of the element furthest outside its tolerance (by error / allowed)."""
    with numpy.errstate(invalid="ignore", divide="ignore", over="ignore"):
        excess = numpy.where(bad, error / (atol + rtol * numpy.abs(expected)), 0.0)
    excess = numpy.where(bad & ~(excess > 0), numpy.inf, excess)  # NaN or 0/0 where bad: worst of all
    return tuple(int(i) for i in numpy.unravel_index(int(numpy.argmax(excess)), error.shape))


@dataclass(frozen=True)
class OracleComparison:
    """What :func:`assert_matches_oracle` measured (returned when the rule holds)."""

    case: str
    dtype: str
    error: float          # max |actual − oracle|
    naive_error: float    # max |naive(dtype) − oracle|
    floor: float          # ulps · eps(dtype) · max |oracle|
    bound: float          # factor · naive_error + floor
    ratio: float          # error / naive_error (inf when the naive error is 0 and error > 0)
    index: tuple[int, ...]  # where error is attained


def _positional_names(function: Any) -> list[str]:
    """Names of ``function``'s leading positional-only parameters (its arrays, by reflex style)."""
    names = []
    for param in inspect.signature(function).parameters.values():
        if param.kind is not inspect.Parameter.POSITIONAL_ONLY:
            break
        names.append(param.name)
    return names


def _split_inputs(mechanism: registry.Mechanism, inputs: Any, params: Mapping[str, Any] | None
                  ) -> tuple[list[Any], dict[str, Any], dict[str, Any], str | None]:
    """(positional arrays, keyword arrays, params, case id) from a mapping, a sequence or a fixture case."""
    case_id = getattr(inputs, "id", None)
    if hasattr(inputs, "inputs") and hasattr(inputs, "params"):  # a fixture case or a registry Case
        params = {**inputs.params, **(params or {})}
        positional_order = list(getattr(inputs, "positional", ()) or _positional_names(mechanism.function))
        inputs = inputs.inputs
    else:
        positional_order = _positional_names(mechanism.function)
        params = dict(params or {})
    if isinstance(inputs, Mapping):
        missing = [n for n in positional_order if n not in inputs]
        if missing:
            raise ValueError(f"inputs for {mechanism.key} lack {', '.join(missing)}; expected {', '.join(positional_order)}")
        args = [inputs[n] for n in positional_order]
        kwargs = {n: a for n, a in inputs.items() if n not in positional_order}
    elif isinstance(inputs, Sequence):
        args, kwargs = list(inputs), {}
    else:
        raise TypeError(f"inputs must be a mapping name → array, a sequence of arrays or a fixture case; got {type(inputs).__name__}")
    return args, kwargs, params, case_id


def _first(result: Any) -> Any:
    return result[0] if isinstance(result, tuple) else result


def _naive(mechanism: registry.Mechanism, args: list[Any], kwargs: dict[str, Any], params: dict[str, Any],
           dtype: str) -> numpy.ndarray:
    """The mechanism run by reflex with ``compute_dtype=dtype`` (on NumPy, or torch for bfloat16)."""
    if dtype == "bfloat16":
        try:
            xp, device = backend_namespace("torch")
        except ValueError as err:
            raise ValueError(f"the bfloat16 baseline needs torch (NumPy has no bfloat16): {err}") from None

        def convert(a: Any) -> Any:
            return from_numpy(a, xp, device) if isinstance(a, numpy.ndarray) else a
    else:
        def convert(a: Any) -> Any:
            return a
    result = mechanism.function(*(convert(a) for a in args), **{n: convert(a) for n, a in kwargs.items()},
                                **params, compute_dtype=dtype)
    return _host(_first(result))


def assert_matches_oracle(actual: Any, key: str, inputs: Any, *, params: Mapping[str, Any] | None = None,
                          dtype: Any, factor: float = 2.0, ulps: float = 4.0) -> OracleComparison:
    """Assert the FlashAttention rule for ``actual``, an implementation's output of mechanism ``key``.

    ``inputs`` are the arrays the implementation received (any library and dtype): a mapping
    name → array (positional ones by the mechanism's signature, the rest as keywords), a sequence
    of the positional arrays, or a case from :func:`reflex.fixtures.load` (its params are used).
    ``params`` are the mechanism's keyword options. ``dtype`` is the implementation's precision.

    The oracle is the mechanism in float64 on these inputs; the naive baseline is the same code with
    ``compute_dtype=dtype``. The rule: ``max|actual − oracle| ≤ factor·max|naive − oracle| + floor``
    with ``floor = ulps·eps(dtype)·max|oracle|``, so a baseline that happens to be exact cannot
    make the rule impossible. Returns the measurements; raises ``AssertionError`` naming the case,
    the worst element, both errors and their ratio.
    """
    name = dtype_name(dtype)
    if name not in TOLERANCES:
        raise ValueError(f"dtype must be one of {', '.join(TOLERANCES)}; got {name!r}")
    mechanism = registry.get(key)
    if "compute_dtype" not in inspect.signature(mechanism.function).parameters:
        raise TypeError(f"{key} does not accept compute_dtype, so it has no same-precision baseline")
    args, kwargs, params, case_id = _split_inputs(mechanism, inputs, params)
    args = [_host(a) if is_array(a) else a for a in args]
    kwargs = {n: _host(a) if is_array(a) else a for n, a in kwargs.items()}
    label = case_id or f"{key}({', '.join(f'{n}={v!r}' for n, v in sorted(params.items()))})"

    oracle = _host(_first(mechanism.function(*args, **kwargs, **params)))
    naive = _naive(mechanism, args, kwargs, params, name)
    got = _host(actual)
    if got.shape != oracle.shape:
        raise AssertionError(f"{label}: actual has shape {got.shape}; the oracle's output has {oracle.shape}")
    error_map = _abs_error(got, oracle)
    naive_map = _abs_error(naive, oracle)
    error = float(numpy.max(error_map)) if error_map.size else 0.0
    naive_error = float(numpy.max(naive_map)) if naive_map.size else 0.0
    finite = oracle[numpy.isfinite(oracle)]
    floor = ulps * EPS[name] * (float(numpy.max(numpy.abs(finite))) if finite.size else 0.0)
    bound = factor * naive_error + floor
    index = tuple(int(i) for i in numpy.unravel_index(int(numpy.argmax(error_map)), got.shape)) if got.size else ()
    ratio = error / naive_error if naive_error > 0 else (0.0 if error == 0 else float("inf"))
    result = OracleComparison(label, name, error, naive_error, floor, bound, ratio, index)
    # A NaN or a mismatched infinity in actual always fails: when the naive baseline itself overflows
    # (error and bound both +∞), ``error <= bound`` would otherwise accept any output.
    if not (math.isfinite(error) and error <= bound):
        raise AssertionError(
            f"{label}: {name} implementation fails the FlashAttention rule: max |actual − oracle| = {error:.3e} "
            f"at element {_describe(index)} (actual {float(got[index]):.9g}, oracle {float(oracle[index]):.9g}) exceeds "
            f"{factor:g} × naive {name} error {naive_error:.3e} + floor {floor:.3e} = {bound:.3e}; "
            f"ratio actual/naive = {ratio:.3g}"
        )
    return result

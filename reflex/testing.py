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
   tf32      5e-3     as float16 (10 mantissa bits): a TF32-matmul kernel reaches ≤ 1.2e-3.
   float8_   0.25     2 ulps at 1: an FP8 kernel (QKᵀ and PV in float8, float32
   e4m3fn             accumulation) reaches ≤ 0.14.
   float8_   0.5      2 ulps at 1: the same kernel in e5m2 reaches ≤ 0.28.
   e5m2
   ========  =======  ===================================================================

   (Measured against reflex's ``full`` cases, tiny to large, with torch 2.13 CPU SDPA computing
   from the float64 inputs rounded to the tested dtype. torch has no TF32 or float8 attention on
   the CPU, so ``scripts/measure_tolerances.py`` builds those kernels from torch ops: TF32 rounds
   the operands of both matmuls (q, k; P, v) to 10 mantissa bits and accumulates in float32; FP8
   casts q, k, v and P to the format and multiplies with ``torch._scaled_mm`` (float32
   accumulation), as FlashAttention-3's FP8 forward. Maxima over the ``full`` cases and D = 64,
   128 at L = 128, 1,024; the worst rows are causal first rows, one value row rounded.)

2. **The FlashAttention rule** (:func:`assert_matches_oracle`, :func:`assert_gradients_match_oracle`;
   Dao et al. 2022, §4, and the flash-attn FA3/FA4 test suites): a low-precision implementation's max
   error against the float64 oracle may be at most ``factor`` times the max error of a naive
   evaluation in the same precision (reflex itself run with ``compute_dtype=dtype``), plus a floor
   that is about one rounding of ``dtype`` at magnitude 1:

   .. math::

       \\max|X_\\text{impl} - X_{64}| \\le k\\,\\max|X_\\text{naive}(\\text{dtype}) - X_{64}| + f,
       \\qquad f = 2\\max\\big|\\mathrm{fl}(\\mathrm{fl}(\\bar X + 0.3) - 0.3) - \\bar X\\big|,

   where X is the output or any gradient, k = 2 (3 with a softcap, whose tanh adds rounding), and
   :math:`\\bar X` is the oracle rounded to ``dtype`` with fl the rounding of ``dtype`` (FA3's
   ``2·(ref + 0.3 − 0.3 − ref).abs().max()``, about an ulp at magnitude 1). Gradients use the same
   rule: the oracle is :func:`reflex.vjp` in float64, the naive baseline is :func:`reflex.vjp` with
   ``compute_dtype=dtype``. Both errors are measured on the same inputs (the ones the implementation
   received, upcast exactly to float64), so input rounding cancels and what remains is arithmetic
   error. A 3 % softmax-scale bug (scale 1/√(D+2) for 1/√D) fails this rule at float32, float16
   and bfloat16 on reflex's test cases; the former floor of 4 ulps of max|O| let it pass at
   bfloat16.

   The naive baseline of the emulated formats (outputs only) is reflex in float32 on inputs rounded
   to the format: ``tf32`` rounds the positional arrays (q, k, v: the matmul operands; biases and
   other options stay) to 10 mantissa bits (float32 output); ``float8_e4m3fn`` / ``float8_e5m2`` also round the output to the
   format, standing in for the rounding of P to float8 before PV (the same order: a relative
   rounding of each weight averages over the keys to about one rounding of the output). FP8 and
   TF32 kernels built as above stay within 2.7× and 1.7× of this baseline (before the floor).
   The float8 formats need ``ml_dtypes`` (the ``float8`` extra).

Inputs may be NumPy, CuPy, torch (any dtype, bfloat16 included, on any device), array-api-strict
or anything ``numpy.asarray`` accepts; nothing here imports an array library other than NumPy.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, NamedTuple, Sequence

import numpy

from reflex import registry
from reflex.backends import backend_namespace, from_numpy, is_array, library_name, to_numpy
from reflex.backends.rounding import round_to

__all__ = ["Tolerance", "tolerance", "assert_close", "assert_matches_oracle", "assert_gradients_match_oracle",
           "OracleComparison", "rounding_floor", "dtype_name", "TOLERANCES", "EPS"]


class Tolerance(NamedTuple):
    """Element-wise rule ``|actual − expected| ≤ atol + rtol·|expected|``."""

    atol: float
    rtol: float


TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(1e-12, 1e-12),
    "float32": Tolerance(1e-5, 1e-5),
    "float16": Tolerance(5e-3, 5e-3),
    "bfloat16": Tolerance(4e-2, 4e-2),
    "tf32": Tolerance(5e-3, 5e-3),
    "float8_e4m3fn": Tolerance(0.25, 0.25),
    "float8_e5m2": Tolerance(0.5, 0.5),
}

# Formats NumPy cannot compute in: the naive baseline is float32 arithmetic on values rounded to them.
EMULATED = ("tf32", "float8_e4m3fn", "float8_e5m2")

# Machine epsilon (spacing at 1.0) of each tested dtype.
EPS: dict[str, float] = {"float64": 2.0 ** -52, "float32": 2.0 ** -23, "float16": 2.0 ** -10, "bfloat16": 2.0 ** -7,
                         "tf32": 2.0 ** -10, "float8_e4m3fn": 2.0 ** -3, "float8_e5m2": 2.0 ** -2}


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
    if host.dtype.kind == "f" or host.dtype.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
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
    """What the FlashAttention rule measured for one quantity (returned when the rule holds)."""

    case: str
    dtype: str
    error: float          # max |actual − oracle|
    naive_error: float    # max |naive(dtype) − oracle|
    floor: float          # 2·max|fl(fl(oracle + 0.3) − 0.3) − oracle| in dtype (FA3's atol)
    bound: float          # factor · naive_error + floor
    ratio: float          # error / naive_error (inf when the naive error is 0 and error > 0)
    index: tuple[int, ...]  # where error is attained
    quantity: str = "out"   # "out", or "d_<input>" for a gradient
    gradients: Mapping[str, "OracleComparison"] = field(default_factory=dict)  # per input, when grads= was given


def _positional_names(function: Any) -> list[str]:
    """Names of ``function``'s leading positional-only parameters (its arrays, by reflex style)."""
    names = []
    for param in inspect.signature(function).parameters.values():
        if param.kind is not inspect.Parameter.POSITIONAL_ONLY:
            break
        names.append(param.name)
    return names


def _split_inputs(mechanism: registry.Mechanism, inputs: Any, params: Mapping[str, Any] | None
                  ) -> tuple[list[str], list[Any], dict[str, Any], dict[str, Any], str | None]:
    """(positional names, positional arrays, keyword arrays, params, case id) from a mapping, a
    sequence or a fixture case."""
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
        if len(args) > len(positional_order):
            raise ValueError(f"{mechanism.key} takes {len(positional_order)} positional arrays "
                             f"({', '.join(positional_order)}); got {len(args)}")
    else:
        raise TypeError(f"inputs must be a mapping name → array, a sequence of arrays or a fixture case; got {type(inputs).__name__}")
    return positional_order[:len(args)], args, kwargs, params, case_id


def _first(result: Any) -> Any:
    return result[0] if isinstance(result, tuple) else result


def rounding_floor(reference: Any, dtype: Any) -> float:
    """FA3's absolute floor: ``2·max|fl(fl(r + 0.3) − 0.3) − r|`` for ``r`` = ``reference`` rounded
    to ``dtype`` and ``fl`` the rounding of ``dtype`` — about one ulp of ``dtype`` at the
    reference's magnitude (flash-attn ``hopper/test_flash_attn.py``: ``2 * (out_ref + 0.3 - 0.3 -
    out_ref).abs().max()``).

    Values whose +0.3 crosses into a coarser binade set it, so it is about an ulp at magnitude 1
    whatever the reference's magnitude, and it can be 0 (all entries 0.75 in float16). The
    correctly rounded oracle still always passes the rule with factor ≥ 2: the naive baseline is
    itself in ``dtype``, so its error is at least the oracle's rounding error. Non-finite entries
    are ignored; an empty or all-non-finite reference gives 0."""
    name = dtype_name(dtype)
    if name not in EPS:
        raise ValueError(f"dtype must be one of {', '.join(EPS)}; got {name!r}")
    ref = _host(reference).astype(numpy.float64)
    ref = ref[numpy.isfinite(ref)]
    if not ref.size:
        return 0.0
    r = round_to(ref, name)
    moved = round_to(round_to(r + 0.3, name) - 0.3, name)
    with numpy.errstate(invalid="ignore"):
        wobble = numpy.abs(moved - r)
    wobble = wobble[numpy.isfinite(wobble)]  # an entry near the dtype's max may overflow: no floor from it
    return 2.0 * float(numpy.max(wobble)) if wobble.size else 0.0


def _torch_converter() -> Any:
    """Host NumPy arrays → torch CPU arrays (for the bfloat16 baseline, which NumPy cannot run)."""
    try:
        xp, device = backend_namespace("torch")
    except ValueError as err:
        raise ValueError(f"the bfloat16 baseline needs torch (NumPy has no bfloat16): {err}") from None

    def convert(a: Any) -> Any:
        return from_numpy(a, xp, device) if isinstance(a, numpy.ndarray) else a

    return convert


def _naive(mechanism: registry.Mechanism, args: list[Any], kwargs: dict[str, Any], params: dict[str, Any],
           dtype: str) -> numpy.ndarray | None:
    """The mechanism run by reflex with ``compute_dtype=dtype`` (on NumPy, or torch for bfloat16);
    ``None`` when it overflowed ``dtype`` (reflex refuses a non-finite result from finite inputs)."""
    if dtype in EMULATED:  # float32 arithmetic on the matmul operands (positional arrays) rounded to the format
        def operand(a: Any) -> Any:
            return round_to(a, dtype) if isinstance(a, numpy.ndarray) and a.dtype.kind == "f" else a

        def convert(a: Any) -> Any:
            return a
    else:
        convert = operand = _torch_converter() if dtype == "bfloat16" else (lambda a: a)
    try:
        result = mechanism.function(*(operand(a) for a in args), **{n: convert(a) for n, a in kwargs.items()},
                                    **params, compute_dtype="float32" if dtype in EMULATED else dtype)
    except FloatingPointError:
        return None
    out = _host(_first(result))
    return round_to(out, dtype) if dtype.startswith("float8_") else out


def _default_factor(params: Mapping[str, Any]) -> float:
    """2, or 3 when a softcap is on (FA3/FA4: its tanh adds a rounding per score)."""
    softcap = params.get("softcap")
    return 3.0 if softcap is not None and softcap != 0 else 2.0


def _compare(label: str, quantity: str, name: str, got: numpy.ndarray, oracle: numpy.ndarray,
             naive: numpy.ndarray | None, factor: float) -> OracleComparison:
    """Apply the rule to one quantity (``naive`` None: the baseline overflowed, its error is +∞);
    raise AssertionError naming it, or return the measurements."""
    if got.shape != oracle.shape:
        what = "the oracle's output" if quantity == "out" else f"the oracle's {quantity}"
        raise AssertionError(f"{label}: {quantity} has shape {got.shape}; {what} has {oracle.shape}")
    error_map = _abs_error(got, oracle)
    naive_map = numpy.full(oracle.shape, numpy.inf) if naive is None else _abs_error(naive, oracle)
    error = float(numpy.max(error_map)) if error_map.size else 0.0
    naive_error = float(numpy.max(naive_map)) if naive_map.size else 0.0
    floor = rounding_floor(oracle, name)
    bound = factor * naive_error + floor
    index = tuple(int(i) for i in numpy.unravel_index(int(numpy.argmax(error_map)), got.shape)) if got.size else ()
    ratio = error / naive_error if naive_error > 0 else (0.0 if error == 0 else float("inf"))
    # A NaN or a mismatched infinity in actual always fails: when the naive baseline itself overflows
    # (error and bound both +∞), ``error <= bound`` would otherwise accept any output.
    if not (math.isfinite(error) and error <= bound):
        what = "" if quantity == "out" else f" for {quantity}"
        raise AssertionError(
            f"{label}: {name} implementation fails the FlashAttention rule{what}: max |actual − oracle| = {error:.3e} "
            f"at element {_describe(index)} (actual {float(got[index]):.9g}, oracle {float(oracle[index]):.9g}) exceeds "
            f"{factor:g} × naive {name} error {naive_error:.3e} + floor {floor:.3e} = {bound:.3e}; "
            f"ratio actual/naive = {ratio:.3g}"
        )
    return OracleComparison(label, name, error, naive_error, floor, bound, ratio, index, quantity)


def _prepare(key: str, inputs: Any, params: Mapping[str, Any] | None, dtype: Any
             ) -> tuple[registry.Mechanism, str, list[str], list[Any], dict[str, Any], dict[str, Any], str]:
    name = dtype_name(dtype)
    if name not in TOLERANCES:
        raise ValueError(f"dtype must be one of {', '.join(TOLERANCES)}; got {name!r}")
    mechanism = registry.get(key)
    if "compute_dtype" not in inspect.signature(mechanism.function).parameters:
        raise TypeError(f"{key} does not accept compute_dtype, so it has no same-precision baseline")
    names, args, kwargs, params, case_id = _split_inputs(mechanism, inputs, params)
    args = [_host(a) if is_array(a) else a for a in args]
    kwargs = {n: _host(a) if is_array(a) else a for n, a in kwargs.items()}
    label = case_id or f"{key}({', '.join(f'{n}={v!r}' for n, v in sorted(params.items()))})"
    return mechanism, name, names, args, kwargs, params, label


def _check_gradients(mechanism: registry.Mechanism, name: str, names: list[str], args: list[Any],
                     kwargs: dict[str, Any], params: dict[str, Any], label: str, grads: Mapping[str, Any],
                     d_out: Any, d_lse: Any, factor: float) -> dict[str, OracleComparison]:
    from reflex.gradients import vjp

    if not isinstance(grads, Mapping) or not grads:
        raise TypeError(f"grads must be a non-empty mapping input name → gradient; got {type(grads).__name__}")
    if d_out is None:
        raise ValueError("grads was given without d_out, the output cotangent the gradients were computed from")
    if not mechanism.has_vjp:
        raise NotImplementedError(f"mechanism {mechanism.key!r} has no VJP, so its gradients have no oracle")
    arrays = {**dict(zip(names, args)), **{n: a for n, a in kwargs.items() if isinstance(a, numpy.ndarray)}}
    unknown = [n for n in grads if n not in arrays]
    if unknown:
        raise ValueError(f"grads names {', '.join(map(repr, unknown))}, which are not among the inputs "
                         f"({', '.join(arrays)})")
    d_out, d_lse = _host(d_out), None if d_lse is None else _host(d_lse)
    oracle = vjp(mechanism.key, arrays, d_out, d_lse=d_lse, **params)
    not_floating = [n for n in grads if n not in oracle]
    if not_floating:
        raise ValueError(f"grads names {', '.join(map(repr, not_floating))}, which have no gradient (not floating)")
    convert = _torch_converter() if name == "bfloat16" else (lambda a: a)
    try:
        naive = vjp(mechanism.key, {n: convert(a) for n, a in arrays.items()}, convert(d_out),
                    d_lse=None if d_lse is None else convert(d_lse), **params, compute_dtype=name)
    except FloatingPointError:  # the baseline overflowed dtype: its error is +∞
        naive = {}
    return {n: _compare(label, f"d_{n}", name, _host(g), _host(oracle[n]),
                        _host(naive[n]) if n in naive else None, factor)
            for n, g in grads.items()}


def assert_matches_oracle(actual: Any, key: str, inputs: Any, *, params: Mapping[str, Any] | None = None,
                          dtype: Any, factor: float | None = None, grads: Mapping[str, Any] | None = None,
                          d_out: Any = None, d_lse: Any = None) -> OracleComparison:
    """Assert the FlashAttention rule for ``actual``, an implementation's output of mechanism ``key``,
    and, with ``grads``, for its gradients.

    ``inputs`` are the arrays the implementation received (any library and dtype): a mapping
    name → array (positional ones by the mechanism's signature, the rest as keywords), a sequence
    of the positional arrays, or a case from :func:`reflex.fixtures.load` (its params are used).
    ``params`` are the mechanism's keyword options. ``dtype`` is the implementation's precision.

    The oracle is the mechanism in float64 on these inputs; the naive baseline is the same code with
    ``compute_dtype=dtype`` (through torch for bfloat16). The rule, per quantity X:

        ``max|X − oracle| ≤ factor·max|X_naive − oracle| + floor``,
        ``floor = 2·max|fl(fl(oracle + 0.3) − 0.3) − oracle|`` in ``dtype`` (:func:`rounding_floor`)

    ``factor`` defaults to 2, or 3 when ``params`` hold a nonzero ``softcap`` (flash-attn FA3/FA4).
    The floor, about an ulp of ``dtype`` at magnitude 1, keeps the rule satisfiable where the
    baseline happens to be exact; it is FA3's, not a multiple of ``eps·max|oracle|`` (4 ulps of
    max|O| let a 1/√(D+2) scale bug pass at bfloat16). A baseline that overflows ``dtype`` counts
    as an infinite error (any finite ``actual`` passes; NaN never does). Resolution: at bfloat16
    with D = 64 that scale bug exceeds the bound by only 1–1.8× on outputs and 1.03–1.44× on
    gradients; bigger bugs (softcap dropped, GQA heads tiled) by 25× or more.

    Gradients: ``grads`` maps input names (``"q"``, ``"k"``, ``"v"``, ``"bias"``, ...) to the
    implementation's gradients of ``⟨d_out, out⟩ (+ ⟨d_lse, lse⟩)``; ``d_out`` (and ``d_lse`` for
    a joint (out, lse) backward, as FA4 tests) is required with it. Each is held to the same rule
    with the oracle :func:`reflex.vjp` in float64 and the baseline :func:`reflex.vjp` with
    ``compute_dtype=dtype``. ``actual=None`` checks the gradients only. See
    :func:`assert_gradients_match_oracle`.

    Returns:
        :class:`OracleComparison` for the output (``.gradients``: one per name in ``grads``).
    Raises:
        AssertionError: the rule fails for the output or a gradient (the message names the case,
            the quantity, the worst element, both errors and their ratio), or a shape differs.
        ValueError: unknown dtype, missing inputs, ``grads`` without ``d_out`` or naming a non-input.
        NotImplementedError: ``grads`` for a mechanism without a VJP.
    """
    mechanism, name, names, args, kwargs, params, label = _prepare(key, inputs, params, dtype)
    factor = _default_factor(params) if factor is None else float(factor)
    gradients = {} if grads is None else _check_gradients(
        mechanism, name, names, args, kwargs, params, label, grads, d_out, d_lse, factor)
    if actual is None:
        if grads is None:
            raise ValueError("actual is None and no grads were given: nothing to check")
        return OracleComparison(label, name, 0.0, 0.0, 0.0, 0.0, 0.0, (), "none", gradients)
    oracle = _host(_first(mechanism.function(*args, **kwargs, **params)))
    naive = _naive(mechanism, args, kwargs, params, name)
    result = _compare(label, "out", name, _host(actual), oracle, naive, factor)
    return replace(result, gradients=gradients)


def assert_gradients_match_oracle(grads: Mapping[str, Any], key: str, inputs: Any, d_out: Any, *,
                                  d_lse: Any = None, params: Mapping[str, Any] | None = None, dtype: Any,
                                  factor: float | None = None) -> dict[str, OracleComparison]:
    """Assert the FlashAttention rule for an implementation's gradients only (flash-attn FA3/FA4).

    ``grads``: input name → the implementation's gradient of ``⟨d_out, out⟩ + ⟨d_lse, lse⟩``, for
    any subset of the floating inputs; ``inputs``, ``params``, ``dtype``, ``factor`` as
    :func:`assert_matches_oracle`. Per gradient ``g``: ``max|g − g_64| ≤ factor·max|g_naive − g_64|
    + floor(g_64)`` with ``g_64 = reflex.vjp(key, inputs, d_out, d_lse=d_lse, **params)[name]`` in
    float64 and ``g_naive`` the same call with ``compute_dtype=dtype``. Returns one
    :class:`OracleComparison` per gradient (``quantity = "d_<name>"``); raises as
    :func:`assert_matches_oracle`.
    """
    mechanism, name, names, args, kwargs, params, label = _prepare(key, inputs, params, dtype)
    factor = _default_factor(params) if factor is None else float(factor)
    return _check_gradients(mechanism, name, names, args, kwargs, params, label, grads, d_out, d_lse, factor)

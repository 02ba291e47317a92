"""The precision certificate: how far a mechanism's float64 result lies from a higher-precision one.

reflex says it is exact to float64 round-off; :func:`certify` measures it, case by case. It runs the
mechanism in float64 and again, on the same inputs entered exactly (float64 inputs are exact in both
references), in higher precision:

- ``"longdouble"``: the mechanism itself with ``compute_dtype=numpy.longdouble`` (x87 80-bit on
  x86-64 Linux: 64-bit significand, eps 2⁻⁶³ ≈ 1.1e-19). Every mechanism accepts ``compute_dtype``;
  the certificate checks that the result really is longdouble (its dtype, and that it differs from
  the float64 result at the ulp level on the case: a path that silently computes float64 gives
  bitwise the float64 answer). Where ``finfo(longdouble).eps`` is not below float64's (MSVC on
  Windows, Apple arm64: long double *is* double) this method refuses with a clear message. CuPy has
  no long double: certification runs on the host.
- ``"mpmath"``: an independent evaluation of the mechanism's formula in mpmath at ``dps`` decimal
  digits (default 40), written here from the equations, not from the engine: the engine's dense
  softmax kernel (``full``: masks, bias, softcap, GQA, both causal alignments, attention sinks,
  the ``blhd`` layout), linear attention
  (``linear``: elu + 1 and relu feature maps, causal) and Performer (``performer`` with an explicit
  projection: positive, trigonometric and relu features, causal; unstabilised, the exact formula).
  Slow (pure Python): tiny cases.

Per output (``out``, ``lse`` where the mechanism returns one) and, when the mechanism has a VJP,
per gradient (``d_q``, ``d_k``, ...; always through longdouble ``compute_dtype``, with a fixed
cotangent), the certificate gives the max absolute error of float64 against the reference and that
error relative to the output scale ``max |reference|``. For the softmax formula (``full``, and a
restricted-softmax mechanism whose longdouble output equals softmax over its explicit
``Mechanism.pattern`` to 1e-17) it adds the first-order error bounds of Blanchard, Higham & Higham
(2021) and the logit term, and the case's condition:

- softmax (Thm 4.3, max-shifted): ``max|ĝ − g| / max|g| ≲ (n + 2 + 2·(max x − min x))·u``, n the
  attended keys of the row, ``u = 2⁻⁵³``; lse (Thm 4.2): ``|ŷ − y| ≲ |y + n − min x|·u``.
- logit term: ``|ΔZ_ij| ≤ γ_{D+1}·|scale|·Σ_d |q_id k_jd|`` (``γ_m = mu/(1 − mu)``, the dot product and
  the scale; plus ``u·|Z|`` per bias addition and ``3u·|Z|`` for a softcap), which changes P by a
  relative ``2·max|ΔZ|``.
- output bound per element: ``σ_i·max_j P_ij·Σ_j |v_j| + (2·ΔZ_i + γ_{n+1})·Σ_j P_ij |v_j|`` (σ_i the
  softmax bound of row i; the second term also covers the P·V sum); lse bound ``lse part + ΔZ_i``.
- condition: the largest logit range ``max x − min x`` over the attended keys of a row.

Bounds are worst-case and first order; observed errors sit far below them (a few ulp of max|O|), so
an error *above* the bound means a defect (a float32 cast, an unshifted softmax overflowing).

References: N. J. Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., §3 (γ_n);
P. Blanchard, D. J. Higham, N. J. Higham, "Accurately computing the log-sum-exp and softmax
functions", IMA J. Numer. Anal. 41(4), 2021, Thms 3.2–4.4; mpmath (F. Johansson et al.) for the
arbitrary-precision reference, entered as SciPy's mpmath tests do (``mpf(float(x))``, exact).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from reflex import random, registry
from reflex.backends import to_numpy
from reflex.certify_formulas import (FORMULA_INPUTS, FORMULAS, MPMATH_KEYS, UNIT_ROUNDOFF, Ops, error_longdouble,
                                     error_mpmath, mpmath_supports, products, reference_scale, softmax_bounds,
                                     softmax_formula)
from reflex.backends import numpy_namespace

hnp = numpy_namespace()  # host NumPy (files, long double), through the backends layer

__all__ = ["Certificate", "OutputError", "CertificationError", "certify", "certify_case", "case_record",
           "longdouble_extends_float64", "mpmath_supports", "METHODS", "MPMATH_KEYS", "UNIT_ROUNDOFF"]

METHODS = ("auto", "longdouble", "mpmath")
# "auto" takes mpmath when a case has at most this many multiply-adds in its score product (B·H·L·S·D).
MPMATH_AUTO_PRODUCTS = 1 << 15
_COTANGENT_SEED = (17, 1)  # the fixed d_out of a gradient certificate
_LONGDOUBLE = hnp.dtype(hnp.longdouble)  # passed as compute_dtype (a dtype object, as every mechanism takes)


class CertificationError(ValueError):
    """A case cannot be certified by the requested method (the message says why and what to use)."""


@dataclass(frozen=True)
class OutputError:
    """float64 against the reference for one output or gradient.

    ``max_abs``: ``max |float64 − reference|`` (``inf`` where float64 is NaN or a wrong infinity);
    ``scale``: ``max |reference|`` over its finite entries; ``max_rel``: ``max_abs / scale``;
    ``bound``: the largest per-element first-order bound (softmax formula only) and ``within_bound``
    whether every element's error is within its own bound.
    """

    name: str
    max_abs: float
    max_rel: float
    scale: float
    bound: float | None = None
    within_bound: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "max_abs": _json_float(self.max_abs), "max_rel": _json_float(self.max_rel),
                "scale": _json_float(self.scale), "bound": _json_float(self.bound), "within_bound": self.within_bound}


@dataclass(frozen=True)
class Certificate:
    """The result of :func:`certify` for one case.

    ``method`` is ``"longdouble"`` or ``"mpmath"`` (what was used), ``precision`` says how much (eps
    or dps). ``outputs``/``gradients`` hold an :class:`OutputError` each. For the softmax formula:
    ``condition`` (max logit range), ``softmax_bound`` (BHH Thm 4.3, relative), ``lse_bound`` (Thm
    4.2, absolute), ``logit_term`` (max ``|ΔZ|``). ``honoured``: the longdouble run returned longdouble
    and differs from float64 at the ulp level (None: bitwise equal, so the case cannot tell an exact
    result from an ignored ``compute_dtype``; not applicable under mpmath without a longdouble run).
    ``cross_check``: under mpmath, the mechanism's own longdouble result against mpmath, relative
    to the output scale (≈ 1e-18 when longdouble is honoured end to end).
    """

    key: str
    method: str
    precision: str
    outputs: tuple[OutputError, ...]
    gradients: tuple[OutputError, ...] = ()
    condition: float | None = None
    softmax_bound: float | None = None
    lse_bound: float | None = None
    logit_term: float | None = None
    honoured: bool | None = None
    cross_check: float | None = None
    notes: tuple[str, ...] = ()

    @property
    def max_rel(self) -> float:
        """The worst relative error over every output and gradient (0 when there are none)."""
        return max((e.max_rel for e in (*self.outputs, *self.gradients)), default=0.0)

    @property
    def within_bound(self) -> bool | None:
        """False when some output exceeds its bound; None when no output has one."""
        flags = [e.within_bound for e in self.outputs if e.within_bound is not None]
        return all(flags) if flags else None

    @property
    def flagged(self) -> bool:
        """A defect: an error above its bound, or longdouble asked for and not delivered."""
        return self.within_bound is False or self.honoured is False

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able record (non-finite floats as the strings ``"inf"``/``"nan"``)."""
        return {
            "method": self.method, "precision": self.precision, "max_rel": _json_float(self.max_rel),
            "outputs": [e.to_dict() for e in self.outputs], "gradients": [e.to_dict() for e in self.gradients],
            "condition": _json_float(self.condition), "softmax_bound": _json_float(self.softmax_bound),
            "lse_bound": _json_float(self.lse_bound), "logit_term": _json_float(self.logit_term),
            "honoured": self.honoured, "cross_check": _json_float(self.cross_check), "notes": list(self.notes),
        }

    def summary(self) -> str:
        """One line: method, worst relative error per output, bound status."""
        parts = [f"{e.name} {e.max_rel:.1e}" + ("" if e.bound is None else f" (bound {e.bound / e.scale if e.scale else e.bound:.1e})")
                 for e in (*self.outputs, *self.gradients)]
        flag = "  FLAGGED" if self.flagged else ""
        return f"{self.key} [{self.method}]: " + ", ".join(parts) + flag


def _json_float(value: float | None) -> float | str | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else str(value)


# --- the platform ---------------------------------------------------------------------------------

def longdouble_extends_float64() -> bool:
    """Whether ``numpy.longdouble`` carries more precision than float64 on this platform."""
    return bool(hnp.finfo(hnp.longdouble).eps < hnp.finfo(hnp.float64).eps)


def _require_longdouble() -> None:
    if not longdouble_extends_float64():
        eps = hnp.finfo(hnp.longdouble).eps
        raise CertificationError(
            f"numpy.longdouble on this platform has eps {float(eps):.3g}, no finer than float64's 2.2e-16 "
            "(long double is double with MSVC and on Apple arm64): the longdouble certificate would compare "
            "float64 with itself; use method='mpmath' (tiny cases of full, linear, performer)")


def _mpmath() -> Any:
    try:
        import mpmath
    except ImportError as err:  # pragma: no cover - mpmath is in the [certify] extra
        raise CertificationError("method='mpmath' needs mpmath: pip install 'reflex-attention[certify]'") from err
    return mpmath


# --- inputs and outputs ---------------------------------------------------------------------------

def _host_inputs(key: str, function: Callable[..., Any], inputs: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Host NumPy copies of ``inputs`` (floats as float64, exact) and the positional argument names."""
    if not isinstance(inputs, Mapping) or not inputs:
        raise TypeError(f"inputs must be a non-empty mapping of argument names to arrays; got {type(inputs).__name__}")
    signature = inspect.signature(function).parameters
    positional = [name for name, p in signature.items() if p.kind == p.POSITIONAL_ONLY]
    missing = [name for name in positional if name not in inputs]
    if missing:
        raise ValueError(f"inputs lacks {', '.join(missing)}: {key!r} takes the arrays {', '.join(positional)} positionally")
    unknown = [name for name in inputs if name not in signature]
    if unknown:
        raise ValueError(f"inputs has {', '.join(unknown)}, which {key!r} does not take")
    host: dict[str, Any] = {}
    for name, x in inputs.items():
        if not hasattr(x, "shape"):
            host[name] = x
            continue
        array = to_numpy(x)
        if array.dtype.kind == "f":
            if hnp.finfo(array.dtype).eps < hnp.finfo(hnp.float64).eps:
                raise ValueError(f"inputs[{name!r}] has dtype {array.dtype}: certify compares float64 runs, so inputs "
                                 "must be exactly representable in float64 (float64 or narrower)")
            array = array.astype(hnp.float64)
        host[name] = array
    return host, positional


def _call(function: Callable[..., Any], host: Mapping[str, Any], positional: list[str], params: Mapping[str, Any]) -> Any:
    args = [host[name] for name in positional]
    kwargs = {name: value for name, value in host.items() if name not in positional}
    return function(*args, **kwargs, **params)


def _named(result: Any, with_lse: bool) -> list[tuple[str, hnp.ndarray]]:
    parts = result if isinstance(result, tuple) else (result,)
    names = ["out", "lse"] if with_lse else ["out"]
    names += [f"output{i}" for i in range(len(names), len(parts))]
    return [(name, to_numpy(part)) for name, part in zip(names, parts) if hasattr(part, "shape")]


def _compare(name: str, value: hnp.ndarray, reference: hnp.ndarray, *, mp: Any = None,
             bound: hnp.ndarray | None = None) -> OutputError:
    if tuple(value.shape) != tuple(reference.shape):
        raise AssertionError(f"{name}: float64 shape {tuple(value.shape)}, reference {tuple(reference.shape)} (a bug in reflex)")
    err = error_mpmath(value, reference, mp) if reference.dtype == object else error_longdouble(value, reference)
    max_abs = float(err.max()) if err.size else 0.0
    scale = reference_scale(reference, mp)
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    if bound is None:
        return OutputError(name, max_abs, max_rel, scale)
    return OutputError(name, max_abs, max_rel, scale, float(bound.max()) if bound.size else 0.0, bool(hnp.all(err <= bound)))


# --- certify --------------------------------------------------------------------------------------

def certify(key: str, inputs: Mapping[str, Any], /, *, method: str = "auto", dps: int = 40, **params: Any) -> Certificate:
    """Certify the float64 result of mechanism ``key`` on ``inputs`` against higher precision.

    Args:
        key: a registered mechanism (``reflex list``).
        inputs: argument name → array (any array library; moved to the host, floats entered exactly
            as float64), every array the mechanism takes: ``q``, ``k``, ``v``, masks, biases, ...
        method: ``"longdouble"`` (the mechanism with ``compute_dtype=numpy.longdouble``), ``"mpmath"``
            (an independent formula at ``dps`` digits; ``full``, ``linear``, ``performer``) or ``"auto"``: mpmath
            where it has the formula and the case has at most 2¹⁵ score multiply-adds, else longdouble
            (else mpmath where longdouble is only float64).
        dps: mpmath decimal digits, at least 30 (default 40).
        **params: the mechanism's options, as its function takes them (not ``compute_dtype``). A
            mechanism that returns an lse is run with ``return_lse=True`` unless given otherwise.

    Returns:
        A :class:`Certificate`: per output and gradient the max absolute and relative (to
        ``max|reference|``) error of float64; for the softmax formula the Blanchard–Higham–Higham
        bounds, the logit term and the condition.

    Raises:
        CertificationError: longdouble is no wider than float64 here, the mechanism has no mpmath
            formula for these options, mpmath is missing, or the mechanism fails in longdouble.
        ValueError: an unknown method, a bad ``dps``, ``compute_dtype`` among ``params``, or inputs
            that do not match the mechanism's arguments.
        KeyError: an unknown mechanism (with close matches).
    """
    mechanism = registry.get(key)
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if isinstance(dps, bool) or not isinstance(dps, int) or dps < 30:
        raise ValueError(f"dps must be an int >= 30 (float64 needs 17 digits; the reference needs more); got {dps!r}")
    if "compute_dtype" in params:
        raise ValueError("certify sets compute_dtype itself (float64, then the reference precision); do not pass it")
    host, positional = _host_inputs(key, mechanism.function, inputs)
    with_lse = mechanism.returns_lse and params.get("return_lse", True) is not False
    run_params = {**params, "return_lse": True} if mechanism.returns_lse and "return_lse" not in params else dict(params)
    chosen = _choose(method, key, host, params)
    float64 = _named(_call(mechanism.function, host, positional, run_params), with_lse)
    longdouble = None
    notes: list[str] = []
    if longdouble_extends_float64():
        try:
            longdouble = _named(_call(mechanism.function, host, positional,
                                      {**run_params, "compute_dtype": _LONGDOUBLE}), with_lse)
        except Exception as err:  # noqa: BLE001 - reported: the mechanism cannot run in longdouble
            if chosen == "longdouble":
                raise CertificationError(f"{key!r} does not run with compute_dtype=numpy.longdouble: "
                                         f"{type(err).__name__}: {err}") from err
            notes.append(f"no longdouble run ({type(err).__name__}: {err})")
    honoured = None if longdouble is None else _honoured(float64, longdouble, notes)
    gradients = _gradients(mechanism, host, params, float64[0][1], notes) if mechanism.vjp is not None else ()
    if chosen == "longdouble":
        bounds = _longdouble_bounds(key, host, params) or _pattern_bounds(mechanism, host, positional, params, longdouble, notes)
        outputs = tuple(_compare(name, value, ref, bound=bounds.get(name))
                        for (name, value), (_, ref) in zip(float64, longdouble))
        eps = float(hnp.finfo(hnp.longdouble).eps)
        return Certificate(key, "longdouble", f"numpy.longdouble (eps {eps:.3g})", outputs, gradients, honoured=honoured,
                           notes=tuple(notes), **_summary(bounds))
    mp = _mpmath()
    formula, _ = FORMULAS[key]
    with mp.workdps(dps):
        parts, bounds = _evaluate(formula, Ops(mp), host, params)
        outputs = tuple(_compare(name, value, parts[name], mp=mp, bound=bounds.get(name)) for name, value in float64)
        cross = None
        if longdouble is not None:
            cross = max((_compare(name, value, parts[name], mp=mp).max_rel for name, value in longdouble), default=0.0)
    return Certificate(key, "mpmath", f"mpmath dps {dps}", outputs, gradients, honoured=honoured, cross_check=cross,
                       notes=tuple(notes), **_summary(bounds))


def _summary(bounds: Mapping[str, Any]) -> dict[str, float]:
    """The scalar bound fields of a :class:`Certificate` (the per-element arrays left out)."""
    return {name: value for name, value in bounds.items() if name not in ("out", "lse")}


def _choose(method: str, key: str, host: Mapping[str, Any], params: Mapping[str, Any]) -> str:
    reason = mpmath_supports(key, host, params)
    if method == "mpmath":
        if reason is not None:
            raise CertificationError(f"{reason}; use method='longdouble'")
        _mpmath()
        return "mpmath"
    if method == "longdouble":
        _require_longdouble()
        return "longdouble"
    small = reason is None and products(host) <= MPMATH_AUTO_PRODUCTS
    if small or (reason is None and not longdouble_extends_float64()):
        try:
            _mpmath()
            return "mpmath"
        except CertificationError:
            if not longdouble_extends_float64():
                raise
    _require_longdouble()
    return "longdouble"


def _honoured(float64: list[tuple[str, hnp.ndarray]], longdouble: list[tuple[str, hnp.ndarray]], notes: list[str]) -> bool | None:
    """Whether the longdouble run really computed in longdouble (see :class:`Certificate`)."""
    narrow = [name for name, value in longdouble if value.dtype != hnp.longdouble]
    if narrow:
        notes.append(f"compute_dtype=longdouble returned {', '.join(narrow)} as {longdouble[0][1].dtype}: not honoured")
        return False
    if any(not hnp.array_equal(a.astype(hnp.longdouble), b) for (_, a), (_, b) in zip(float64, longdouble)):
        return True
    notes.append("longdouble and float64 results are bitwise equal (an exact case, or longdouble ignored)")
    return None


def _gradients(mechanism: registry.Mechanism, host: Mapping[str, Any], params: Mapping[str, Any], out: hnp.ndarray,
               notes: list[str]) -> tuple[OutputError, ...]:
    """float64 VJP against the longdouble VJP, with the fixed cotangent ``d_out``."""
    from reflex.gradients import vjp

    if not longdouble_extends_float64():
        notes.append("gradients not certified: longdouble is float64 here")
        return ()
    arrays = {name: value for name, value in host.items() if hasattr(value, "shape")}
    options = {name: value for name, value in params.items() if name != "return_lse"}
    d_out = random.normal(tuple(out.shape), seed=_COTANGENT_SEED)
    try:
        low = vjp(mechanism.key, arrays, d_out, **options)
        high = vjp(mechanism.key, arrays, d_out, compute_dtype=_LONGDOUBLE, **options)
    except Exception as err:  # noqa: BLE001 - reported: the VJP cannot run here
        notes.append(f"gradients not certified ({type(err).__name__}: {err})")
        return ()
    narrow = [name for name, g in high.items() if to_numpy(g).dtype != hnp.longdouble]
    if narrow:
        notes.append(f"VJP with compute_dtype=longdouble returned d_{', d_'.join(narrow)} below longdouble: not honoured")
    errors = [_compare(f"d_{name}", to_numpy(low[name]), to_numpy(high[name])) for name in sorted(low)]
    # A gradient that is 0 in exact arithmetic (a query attending only itself; a key-projection bias,
    # to which softmax is invariant) is a cancellation of O(1) terms: its reference is 0 or round-off
    # (below √u of the case's largest gradient scale), and float64 leaves its own round-off there.
    # Its error is measured against the case's largest gradient scale, and a note says so.
    scale = max((e.scale for e in errors), default=0.0)
    zero = [e.name for e in errors if e.scale <= math.sqrt(UNIT_ROUNDOFF) * scale and e.max_abs > 0]
    if zero and scale > 0:
        notes.append(f"{', '.join(zero)} zero up to round-off in the reference (a cancellation): relative to the "
                     f"largest gradient scale {scale:.3g}")
        errors = [dataclasses.replace(e, max_rel=e.max_abs / scale) if e.name in zero else e for e in errors]
    return tuple(errors)


def _longdouble_bounds(key: str, host: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """For the softmax formula (``full``): bounds from the formula evaluated in longdouble; else none."""
    if key != "full" or mpmath_supports(key, host, params) is not None:
        return {}
    with hnp.errstate(invalid="ignore", divide="ignore", over="ignore"):
        return _evaluate(softmax_formula, Ops(), host, params)[1]


def _evaluate(formula: Callable[..., dict[str, hnp.ndarray]], ops: Ops, host: Mapping[str, Any],
              params: Mapping[str, Any]) -> tuple[dict[str, hnp.ndarray], dict[str, Any]]:
    """A formula's parts (``out`` in the mechanism's layout) and, for the softmax formula, its bounds."""
    flash = params.get("layout", "bhld") == "blhd"  # q, k, v and out as (..., L, H, D)
    q, k, v = (hnp.swapaxes(host[name], -3, -2) if flash else host[name] for name in FORMULA_INPUTS)
    options = {name: value for name, value in {**host, **params}.items()
               if name not in (*FORMULA_INPUTS, "return_lse", "implementation", "layout")}
    parts = formula(ops, q, k, v, **options)
    bounds = {}
    if formula is softmax_formula:
        bounds = softmax_bounds(q, k, v, parts, scale=params.get("scale"), softcap=params.get("softcap"),
                                dropout_mask=host.get("dropout_mask"), dropout_p=params.get("dropout_p", 0.0),
                                bias=host.get("bias"), sinks=host.get("sinks"))
    if flash:
        parts = {**parts, "out": hnp.swapaxes(parts["out"], -3, -2)}
        bounds = {**bounds, "out": hnp.swapaxes(bounds["out"], -3, -2)} if "out" in bounds else bounds
    return parts, bounds


# A restricted-softmax mechanism's longdouble output must equal softmax over its pattern to this (relative).
_PATTERN_AGREEMENT = 1e-17


def _pattern_bounds(mechanism: registry.Mechanism, host: Mapping[str, Any], positional: list[str],
                    params: Mapping[str, Any], longdouble: list[tuple[str, hnp.ndarray]], notes: list[str]) -> dict[str, Any]:
    """Bounds for a restricted-softmax mechanism through its explicit pattern (``Mechanism.pattern``).

    The registry says such a mechanism's output equals ``full_attention`` under its boolean pattern.
    When the softmax formula under that pattern (in longdouble, default or given ``scale``) agrees
    with the mechanism's own longdouble output and lse to ``_PATTERN_AGREEMENT``, the softmax bounds
    apply; otherwise (multiplicities, projections or terms beyond the pattern) a note says why not.
    """
    if mechanism.pattern is None or not all(name in host for name in FORMULA_INPUTS):
        return {}
    accepts = inspect.signature(mechanism.pattern).parameters
    takes_any = any(p.kind == p.VAR_KEYWORD for p in accepts.values())
    options = {name: value for name, value in params.items() if takes_any or name in accepts}
    try:
        pattern = to_numpy(_call(mechanism.pattern, host, positional, options))
    except Exception as err:  # noqa: BLE001 - no bounds, said in a note
        notes.append(f"no softmax bounds: the pattern is not computable here ({type(err).__name__}: {err})")
        return {}
    counts = None if pattern.dtype == bool else pattern  # multiplicities: a key attended c times
    q, k, v = (host[name] for name in FORMULA_INPUTS)
    with hnp.errstate(invalid="ignore", divide="ignore", over="ignore"):
        try:
            parts = softmax_formula(Ops(), q, k, v, mask=pattern if counts is None else None, counts=counts,
                                    scale=params.get("scale"))
        except ValueError as err:  # shapes beyond (..., H, L, D) / (..., G, S, D)
            notes.append(f"no softmax bounds: q, k, v are not attention inputs of the pattern ({err})")
            return {}
    for name, value in longdouble:
        if name in ("out", "lse") and value.shape == parts[name].shape:
            scale = reference_scale(value)
            gap = float(hnp.max(error_longdouble(value, parts[name]), initial=0.0))
            if gap > _PATTERN_AGREEMENT * max(scale, 1.0):
                notes.append(f"no softmax bounds: softmax over the pattern differs from the mechanism by {gap:.1e} "
                             f"({name}; the mechanism does more than attend its pattern)")
                return {}
        elif name in ("out", "lse"):
            notes.append(f"no softmax bounds: the pattern's {name} shape differs from the mechanism's")
            return {}
    notes.append("bounds through the mechanism's pattern (softmax over the keys it attends)")
    return softmax_bounds(q, k, v, parts, scale=params.get("scale"), softcap=None, bias=None, counts=counts)


def certify_case(mechanism: registry.Mechanism | str, case: registry.Case, *, method: str = "auto", dps: int = 40) -> Certificate:
    """:func:`certify` on a registry :class:`~reflex.registry.Case`."""
    key = mechanism if isinstance(mechanism, str) else mechanism.key
    return certify(key, dict(case.inputs), method=method, dps=dps, **dict(case.params))


def case_record(mechanism: registry.Mechanism | str, case: registry.Case, *, method: str = "auto", dps: int = 40) -> dict[str, Any]:
    """A JSON-able certificate of one case (the ``certificate`` field of a fixture manifest's case).

    On failure (no method applies, the mechanism does not run in longdouble) the record holds
    ``{"method": None, "error": "<why>"}`` instead.
    """
    try:
        return certify_case(mechanism, case, method=method, dps=dps).to_dict()
    except CertificationError as err:
        return {"method": None, "error": str(err)}

def default_method(size: str) -> str:
    """mpmath (where it has the formula) for tiny cases, longdouble for larger ones; auto where longdouble is float64."""
    return "auto" if size == "tiny" or not longdouble_extends_float64() else "longdouble"

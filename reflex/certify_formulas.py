"""Higher-precision formulas and error bounds for :mod:`reflex.certify`.

The formulas are written from the mechanisms' equations, not from their code, and evaluate on host
arrays whose elements are mpmath ``mpf`` objects (``Ops(mpmath)``, any precision) or
``numpy.longdouble`` (``Ops()``): ``full`` (dense softmax attention with masks, bias, softcap, GQA
and causal alignment), ``linear`` (elu + 1 / relu features) and ``performer`` (FAVOR+ with an
explicit projection). :func:`softmax_bounds` gives the first-order error bounds of Blanchard,
Higham & Higham (2021) and the logit term for the softmax formula; the module docstring of
:mod:`reflex.certify` states them.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping


from reflex.mechanisms._patterns import causal_offset, parse_causal
from reflex.backends import numpy_namespace

hnp = numpy_namespace()  # host NumPy (files, long double), through the backends layer

__all__ = ["Ops", "softmax_formula", "linear_formula", "performer_formula", "kernel_attention", "FORMULAS",
           "FORMULA_INPUTS", "MPMATH_KEYS", "mpmath_supports", "products", "softmax_bounds", "UNIT_ROUNDOFF",
           "error_longdouble", "error_mpmath", "to_mpf", "reference_scale"]

UNIT_ROUNDOFF = 2.0 ** -53  # u of float64


# --- formulas in higher precision (host arrays of mpf objects or of longdouble) -------------------

class Ops:
    """Elementwise functions and constants for object (mpmath) or longdouble arrays."""

    def __init__(self, mp: Any = None) -> None:
        self.mp = mp
        if mp is None:
            self.exp, self.log, self.tanh, self.sin, self.cos = hnp.exp, hnp.log, hnp.tanh, hnp.sin, hnp.cos
            self.number = hnp.longdouble
        else:
            self.exp, self.log, self.tanh, self.sin, self.cos = (hnp.frompyfunc(f, 1, 1) for f in
                                                                 (mp.exp, mp.log, mp.tanh, mp.sin, mp.cos))
            self.number = mp.mpf

    def array(self, x: hnp.ndarray) -> hnp.ndarray:
        """A float64 host array entered exactly."""
        if self.mp is None:
            return hnp.asarray(x, dtype=hnp.longdouble)
        return hnp.frompyfunc(lambda a: self.mp.mpf(float(a)), 1, 1)(hnp.asarray(x, dtype=hnp.float64)).astype(object)


def repeat_heads(x: hnp.ndarray, heads: int) -> hnp.ndarray:
    """``(..., G, S, ·)`` → ``(..., H, S, ·)``: query head h uses kv head ``h // (H/G)``."""
    return hnp.repeat(x, heads // x.shape[-3], axis=-3)


def allowed(shape: tuple[int, ...], causal: Any, mask: Any) -> hnp.ndarray:
    """The boolean ``(..., H, L, S)`` attend-map of a mask and a causal alignment."""
    allowed = hnp.ones(shape, dtype=bool)
    if mask is not None:
        allowed &= hnp.broadcast_to(hnp.asarray(mask, dtype=bool), shape)
    alignment = parse_causal(causal)
    if alignment is not None:
        length, key_length = shape[-2:]
        delta = causal_offset(alignment, length, key_length)
        allowed &= hnp.arange(key_length)[None, :] <= hnp.arange(length)[:, None] + delta
    return allowed


def softmax_formula(ops: Ops, q: hnp.ndarray, k: hnp.ndarray, v: hnp.ndarray, *, mask: Any = None, bias: Any = None,
                     causal: Any = False, scale: float | None = None, softcap: float | None = None,
                     counts: Any = None, sinks: Any = None, dropout_mask: Any = None,
                     dropout_p: float = 0.0) -> dict[str, hnp.ndarray]:
    """Dense softmax attention, term by term as ``full_attention``'s docstring defines it.

    ``Z = cap(scale·Q Kᵀ) + bias``, −∞ where masked or causally excluded; ``m`` the row max (0 for
    an empty row), ``P = c·e^{Z − m} / Σ c·e^{Z − m}``, ``O = P V``, ``lse = m + log Σ c·e^{Z − m}``;
    an empty row gives ``O = 0``, ``lse = −∞``. ``counts`` c (integers broadcastable to
    ``(..., H, L, S)``, default 1) count a key attended more than once (a multiplicity pattern; 0 =
    not attended). ``sinks (H,)``: a per-head logit ``s_h`` in every row's denominator with value 0
    (``P = e^{Z − m'} / (Σ e^{Z − m'} + e^{s_h − m'})``, ``m' = max(m, s_h)``; the lse includes it, an
    empty row gets ``O = 0``, ``lse = s_h``). ``dropout_mask`` M with ``dropout_p`` p > 0:
    ``O = (P∘M)·V/(1 − p)``, P and lse undropped. Returns ``out, lse, scores, probs`` in the ops' type.
    """
    heads, length, dim = q.shape[-3:]
    key_length = k.shape[-2]
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)  # the float64 the mechanism uses
    qh, kh, vh = ops.array(q), repeat_heads(ops.array(k), heads), repeat_heads(ops.array(v), heads)
    z = (qh @ hnp.swapaxes(kh, -1, -2)) * ops.number(scale)
    if softcap is not None:
        c = ops.number(float(softcap))
        z = c * ops.tanh(z / c)
    if bias is not None:
        z = z + ops.array(hnp.broadcast_to(hnp.asarray(bias, dtype=hnp.float64), z.shape))
    ninf, zero, one = ops.number(-math.inf), ops.number(0.0), ops.number(1.0)
    attended = allowed(z.shape, causal, mask)
    if counts is not None:
        counts = hnp.broadcast_to(hnp.asarray(counts), z.shape)
        attended &= counts > 0
    z = hnp.where(attended, z, ninf)
    if length == 0 or key_length == 0:
        out = hnp.full((*z.shape[:-1], v.shape[-1]), zero, dtype=z.dtype)
        return {"out": out, "lse": hnp.full(z.shape[:-1], ninf, dtype=z.dtype), "scores": z, "probs": z}
    row_max = hnp.max(z, axis=-1, keepdims=True)
    sink = None
    if sinks is not None:
        sink = hnp.broadcast_to(ops.array(hnp.asarray(sinks, dtype=hnp.float64))[:, None, None], row_max.shape)
        row_max = hnp.where(sink > row_max, sink, row_max)
    shift = hnp.where(row_max == ninf, zero, row_max)
    weights = ops.exp(z - shift)
    if counts is not None:
        weights = weights * ops.array(counts.astype(hnp.float64))
    row_sum = hnp.sum(weights, axis=-1, keepdims=True)
    if sink is not None:
        row_sum = row_sum + ops.exp(sink - shift)
    empty = row_sum == 0
    denominator = hnp.where(empty, one, row_sum)
    probs = weights / denominator
    out = probs @ vh
    if dropout_p and float(dropout_p) > 0.0:
        kept = hnp.broadcast_to(hnp.asarray(dropout_mask, dtype=bool), probs.shape)
        out = (hnp.where(kept, probs, zero) @ vh) / (one - ops.number(float(dropout_p)))
    lse = hnp.where(empty, ninf, shift + ops.log(denominator))[..., 0]
    return {"out": out, "lse": lse, "scores": z, "probs": probs}


def linear_formula(ops: Ops, q: hnp.ndarray, k: hnp.ndarray, v: hnp.ndarray, *, feature_map: str = "elu",
                    causal: Any = False, eps: float = 1e-6) -> dict[str, hnp.ndarray]:
    """Linear attention, the quadratic form: ``o_i = Σ_{j≤t_i} φ(q_i)·φ(k_j) v_j / (Σ_{j≤t_i} φ(q_i)·φ(k_j) + ε)``.

    ``φ(x) = elu(x) + 1`` (x + 1 for x > 0, eˣ otherwise) or ``relu``; a query with a zero
    normaliser outputs 0 (Katharopoulos et al. 2020, §3.2 eq. 4–6, causal §3.3).
    """
    zero, one = ops.number(0.0), ops.number(1.0)

    def phi(x: hnp.ndarray) -> hnp.ndarray:
        positive = x > 0
        if feature_map == "relu":
            return hnp.where(positive, x, zero)
        return hnp.where(positive, x + one, ops.exp(hnp.where(positive, zero, x)))

    return kernel_attention(ops, phi(ops.array(q)), phi(ops.array(k)), v, causal=causal, eps=eps)


def kernel_attention(ops: Ops, fq: hnp.ndarray, fk: hnp.ndarray, v: hnp.ndarray, *, causal: Any,
                      eps: float) -> dict[str, hnp.ndarray]:
    """``o_i = Σ_{j≤t_i} (fq_i·fk_j) v_j / (Σ_{j≤t_i} fq_i·fk_j + ε)`` from features ``fq (..., H, L, F)``,
    ``fk (..., G, S, F)``; 0 where the normaliser is 0. The quadratic form, materialising ``(L, S)``."""
    zero, one = ops.number(0.0), ops.number(1.0)
    heads = fq.shape[-3]
    fk, vh = repeat_heads(fk, heads), repeat_heads(ops.array(v), heads)
    kernel = fq @ hnp.swapaxes(fk, -1, -2)
    kernel = hnp.where(allowed(kernel.shape, causal, None), kernel, zero)
    numerator = kernel @ vh
    denominator = hnp.sum(kernel, axis=-1, keepdims=True) + ops.number(float(eps))
    empty = denominator == 0
    out = hnp.where(empty, zero, numerator / hnp.where(empty, one, denominator))
    return {"out": out}


def performer_formula(ops: Ops, q: hnp.ndarray, k: hnp.ndarray, v: hnp.ndarray, *, projection: hnp.ndarray,
                       kernel: str = "softmax_pos", causal: Any = False, scale: float | None = None) -> dict[str, hnp.ndarray]:
    """Performer FAVOR+ with an explicit projection ω (m, D), unstabilised (Choromanski et al. 2021, §2.3):

    ``softmax_pos``: ``φ(x) = exp(ωx − ‖x‖²/2)/√m``; ``softmax_trig``: ``exp(‖x‖²/2)/√m [sin ωx, cos ωx]``
    (x = √scale·q or √scale·k, √scale the float64 the mechanism uses); ``relu``: ``relu(ωx/√m) + 0.001``
    on the raw q, k. Then ``φ(Q)(φ(K)ᵀV) / φ(Q)φ(K)ᵀ1`` (0 where the denominator is 0).
    """
    from reflex.mechanisms.performer import RELU_STABILIZER

    m, dim = projection.shape
    omega_t = ops.array(projection).T
    zero = ops.number(0.0)
    if kernel == "relu":
        ratio, stabilizer = ops.number(1.0 / math.sqrt(m)), ops.number(RELU_STABILIZER)

        def phi(x: hnp.ndarray) -> hnp.ndarray:
            u = ratio * (x @ omega_t)
            return hnp.where(u > 0, u, zero) + stabilizer

        return kernel_attention(ops, phi(ops.array(q)), phi(ops.array(k)), v, causal=causal, eps=0.0)
    root = ops.number(math.sqrt(1.0 / math.sqrt(dim) if scale is None else float(scale)))
    norm = ops.number(1.0) / (ops.number(float(m)) ** ops.number(0.5))

    def phi(x: hnp.ndarray) -> hnp.ndarray:
        x = root * x
        u = x @ omega_t
        half_square = hnp.sum(x * x, axis=-1, keepdims=True) / 2
        if kernel == "softmax_pos":
            return norm * ops.exp(u - half_square)
        return norm * ops.exp(half_square) * hnp.concatenate([ops.sin(u), ops.cos(u)], axis=-1)

    return kernel_attention(ops, phi(ops.array(q)), phi(ops.array(k)), v, causal=causal, eps=0.0)


# key → (formula, the mechanism options it understands; others make mpmath decline)
FORMULAS: dict[str, tuple[Callable[..., dict[str, hnp.ndarray]], frozenset[str]]] = {
    "full": (softmax_formula, frozenset({"mask", "bias", "causal", "scale", "softcap", "return_lse", "implementation",
                                         "sinks", "layout", "dropout_mask", "dropout_p"})),
    "linear": (linear_formula, frozenset({"feature_map", "causal", "eps", "implementation", "layout"})),
    "performer": (performer_formula, frozenset({"projection", "kernel", "causal", "scale", "implementation", "layout"})),
}
MPMATH_KEYS = tuple(FORMULAS)
FORMULA_INPUTS = ("q", "k", "v")


def mpmath_supports(key: str, inputs: Mapping[str, Any], params: Mapping[str, Any]) -> str | None:
    """None when the mpmath method can certify this case; otherwise the reason it cannot."""
    if key not in FORMULAS:
        return f"no mpmath formula for {key!r} (mpmath certifies {', '.join(MPMATH_KEYS)})"
    _, understood = FORMULAS[key]
    unknown = sorted(set(params) - understood)
    if unknown:
        return f"the mpmath formula for {key!r} does not take {', '.join(unknown)}"
    extra = sorted(set(inputs) - set(FORMULA_INPUTS) - understood)
    if extra:
        return f"the mpmath formula for {key!r} does not take the arrays {', '.join(extra)}"
    if key == "linear" and params.get("feature_map", "elu") not in ("elu", "relu"):
        return "the mpmath formula for linear takes feature_map 'elu' or 'relu', not a callable"
    if key == "performer" and inputs.get("projection") is None:
        return "the mpmath formula for performer needs an explicit projection (not num_features and seed)"
    if key == "performer" and params.get("kernel", "softmax_pos") not in ("softmax_pos", "softmax_trig", "relu"):
        return f"the mpmath formula for performer has no kernel {params.get('kernel')!r}"
    return None


def products(host: Mapping[str, Any]) -> int:
    q, k = host["q"], host["k"]
    return int(math.prod(q.shape[:-1])) * int(k.shape[-2]) * int(q.shape[-1])


# --- the bounds -----------------------------------------------------------------------------------

def gamma(n: Any) -> Any:
    return n * UNIT_ROUNDOFF / (1 - n * UNIT_ROUNDOFF)


def softmax_bounds(q: hnp.ndarray, k: hnp.ndarray, v: hnp.ndarray, parts: Mapping[str, hnp.ndarray], *,
                   scale: float | None, softcap: float | None, bias: Any, counts: Any = None,
                   sinks: Any = None, dropout_mask: Any = None, dropout_p: float = 0.0) -> dict[str, Any]:
    """Per-element first-order bounds on out and lse, and the case's condition (see :mod:`reflex.certify`).

    ``counts``: a multiplicity pattern (a key counted c times is c terms of the sum). ``sinks (H,)``:
    one more term per row, an exact logit with value 0. Dropout (keep mask M, rate p): each weight is
    multiplied by M/(1 − p) (one more rounding, of the factor and of the product) before the value sum.
    """
    u = UNIT_ROUNDOFF
    heads, _, dim = q.shape[-3:]
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    z = hnp.asarray(parts["scores"].astype(hnp.float64) if parts["scores"].dtype == object
                      else parts["scores"], dtype=hnp.float64)
    probs = hnp.asarray(parts["probs"].astype(hnp.float64) if parts["probs"].dtype == object
                          else parts["probs"], dtype=hnp.float64)
    lse = hnp.asarray(parts["lse"].astype(hnp.float64) if parts["lse"].dtype == object
                        else parts["lse"], dtype=hnp.float64)
    qk = hnp.abs(q * scale) @ hnp.swapaxes(hnp.abs(repeat_heads(k, heads)), -1, -2)
    abs_v = hnp.abs(repeat_heads(v, heads))
    multiplicity = hnp.ones(z.shape) if counts is None else hnp.broadcast_to(hnp.asarray(counts, dtype=hnp.float64), z.shape)
    if sinks is not None:  # the sink: one more column, its logit exact (no q·k), its value 0
        sink = hnp.broadcast_to(hnp.asarray(sinks, dtype=hnp.float64)[:, None, None], (*z.shape[:-1], 1))
        with hnp.errstate(invalid="ignore"):
            sink_prob = hnp.exp(sink - lse[..., None])
        z, probs = hnp.concatenate([z, sink], axis=-1), hnp.concatenate([probs, sink_prob], axis=-1)
        qk = hnp.concatenate([qk, hnp.zeros(sink.shape)], axis=-1)
        multiplicity = hnp.concatenate([multiplicity, hnp.ones(sink.shape)], axis=-1)
        abs_v = hnp.concatenate([abs_v, hnp.zeros((*abs_v.shape[:-2], 1, abs_v.shape[-1]))], axis=-2)
    attended = hnp.isfinite(z)
    terms = attended * multiplicity
    n = terms.sum(axis=-1)
    z_max = hnp.where(attended, z, -hnp.inf).max(axis=-1, initial=-hnp.inf)
    z_min = hnp.where(attended, z, hnp.inf).min(axis=-1, initial=hnp.inf)
    some = n > 0
    spread = hnp.where(some, z_max - z_min, 0.0)
    softmax_rel = hnp.where(some, (n + 2 + 2 * spread) * u, 0.0)  # BHH Thm 4.3
    with hnp.errstate(invalid="ignore"):
        lse_part = hnp.where(some, hnp.abs(lse + n - z_min) * u, 0.0)  # BHH Thm 4.2
    keep = hnp.ones(z.shape)
    if dropout_p and float(dropout_p) > 0.0:
        keep = hnp.zeros(z.shape)
        kept = hnp.broadcast_to(hnp.asarray(dropout_mask, dtype=bool), (*z.shape[:-1], k.shape[-2]))
        keep[..., :k.shape[-2]] = kept / (1.0 - float(dropout_p))
    dropout_roundings = 0 if dropout_p is None or float(dropout_p) == 0.0 else 2
    term_roundings = (3 if softcap is not None else 0) + (1 if bias is not None else 0)
    logit = gamma(dim + 1) * qk + term_roundings * u * hnp.where(attended, hnp.abs(z), 0.0)
    logit_row = hnp.where(attended, logit, 0.0).max(axis=-1, initial=0.0)
    out_bound = (softmax_rel[..., None] * probs.max(axis=-1, initial=0.0)[..., None] * ((terms * keep) @ abs_v)
                 + (2 * logit_row + gamma(n + 1 + dropout_roundings))[..., None] * ((probs * keep) @ abs_v))
    return {
        "out": out_bound, "lse": hnp.where(some, lse_part + logit_row, 0.0),
        "condition": float(spread.max(initial=0.0)), "softmax_bound": float(softmax_rel.max(initial=0.0)),
        "lse_bound": float(lse_part.max(initial=0.0)), "logit_term": float(logit_row.max(initial=0.0)),
    }


# --- measuring the float64 error against a reference -------------------------------------------

def error_longdouble(value: hnp.ndarray, reference: hnp.ndarray) -> hnp.ndarray:
    """Elementwise ``|value − reference|`` in longdouble, as float64; NaN or a wrong infinity → inf."""
    wide = value.astype(hnp.longdouble)
    ref = reference.astype(hnp.longdouble)
    same = wide == ref  # equal infinities included
    with hnp.errstate(invalid="ignore", over="ignore"):
        err = hnp.where(same, 0.0, hnp.abs(wide - ref)).astype(hnp.float64)
    return hnp.where(hnp.isnan(err), hnp.inf, err)


def error_mpmath(value: hnp.ndarray, reference: hnp.ndarray, mp: Any) -> hnp.ndarray:
    """Elementwise ``|value − reference|`` with an mpmath (object) reference, as float64."""
    def one(a: Any, r: Any) -> float:
        a = to_mpf(a, mp)
        if a == r:
            return 0.0
        if mp.isnan(a) or mp.isinf(a) or mp.isinf(r):
            return math.inf
        return float(abs(a - r))

    if value.size == 0:
        return hnp.zeros(value.shape)
    with hnp.errstate(invalid="ignore"):  # NaN entries are handled in one()
        return hnp.frompyfunc(one, 2, 1)(value, reference).astype(hnp.float64)


def to_mpf(a: Any, mp: Any) -> Any:
    """A float64 or longdouble scalar as an exact mpf (longdouble split into two float64 parts)."""
    if isinstance(a, hnp.longdouble):
        hi = float(a)
        if not math.isfinite(hi):
            return mp.mpf(hi)
        return mp.mpf(hi) + mp.mpf(float(a - hnp.longdouble(hi)))
    return mp.mpf(float(a))


def reference_scale(reference: hnp.ndarray, mp: Any = None) -> float:
    """max |reference| over its finite entries (an mpmath object array or a float array); 0 if none."""
    if reference.size == 0:
        return 0.0
    if reference.dtype == object:
        finite = [abs(r) for r in reference.ravel() if mp.isfinite(r)]
        return float(max(finite, default=0.0))
    finite = hnp.abs(reference[hnp.isfinite(reference)])
    return float(finite.max()) if finite.size else 0.0

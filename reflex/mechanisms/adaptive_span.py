"""Adaptive attention span: a soft, learnt look-back per head, as a log-mask bias on the scores."""

from __future__ import annotations

import math
from typing import Any, Sequence

from reflex import random
from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import standard
from reflex.mechanisms._patterns import band_pattern, causal_offset, parse_causal
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import typed_options

__all__ = ["adaptive_span_attention"]


@typed_options()
def adaptive_span_attention(q: Any, k: Any, v: Any, /, *, spans: float | Sequence[float] | Any, ramp: float = 32.0,
                            causal: bool | str = "bottom_right", mask: Any = None, scale: float | None = None,
                            return_lse: bool = False, compute_dtype: Any = None, implementation: str = "auto") -> Any:
    """Adaptive span: softmax weights multiplied by a soft span mask m_z and renormalised, per head.

    .. math::

        a_{ij} = \\frac{m_z(x_{ij})\\, e^{s_{ij}}}{\\sum_{j'} m_z(x_{ij'})\\, e^{s_{ij'}}}
               = \\mathrm{softmax}_j\\big(s_{ij} + \\log m_z(x_{ij})\\big),\\qquad
        m_z(x) = \\mathrm{clamp}\\Big(\\frac{R + z - x}{R}, 0, 1\\Big)

    with ``s = scale·q·kᵀ`` and x the distance from query to key. Shapes: ``q (..., H, L, D)``,
    ``k (..., G, S, D)``, ``v (..., G, S, E)`` → ``(..., H, L, E)``. ``spans`` z is a number or one
    (real) span per query head; ``ramp`` R > 0 is the soft ramp length (the paper's 32).

    Distance: with ``causal`` ``"bottom_right"`` (default: the paper's decoder with a cache of
    S − L previous keys) or ``"top_left"``/``True``, query i sits at key position i + δ
    (δ = S − L or 0), later keys are masked and x = i + δ − j ≥ 0; with ``causal=False``,
    x = |i − j| (a symmetric span, for encoders). Pairs with m = 0 (x ≥ R + z) are masked — log 0 =
    −∞ — and the rest get the bias log m (0 inside the span), both as engine terms of the index
    grid, so tiles beyond every head's span are skipped. A span covering the sequence is full
    attention (causal if causal). ``mask``/``scale`` as in :func:`reflex.full_attention`.

    Reference: Sukhbaatar et al. 2019, "Adaptive Attention Span in Transformers", ACL, §3.2 (eq. 3–4).
    """
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    xp = p.xp
    if isinstance(ramp, bool) or not isinstance(ramp, (int, float)) or not ramp > 0 or not math.isfinite(ramp):
        raise ValueError(f"ramp must be a positive number; got {ramp!r}")
    ramp = float(ramp)
    if isinstance(spans, (int, float)) and not isinstance(spans, bool):
        z = xp.full((1, 1, 1), float(spans), dtype=p.q.dtype, device=p.device)
    else:
        if isinstance(spans, (list, tuple)):
            spans = xp.asarray([float(s) for s in spans], dtype=p.q.dtype, device=p.device)
        if not hasattr(spans, "shape") or spans.ndim != 1 or int(spans.shape[0]) not in (1, p.heads):
            raise ValueError(f"spans must be a number or one span per head (length {p.heads}); got {spans!r}")
        z = xp.reshape(xp.astype(spans, p.q.dtype), (-1, 1, 1))
    alignment = parse_causal(causal)
    offset = 0 if alignment is None else causal_offset(alignment, p.length, p.key_length)

    def distance(rows: Any, cols: Any) -> Any:
        x = xp.astype(rows + offset - cols, p.q.dtype)
        return x if alignment is not None else xp.abs(x)

    def soft_mask(rows: Any, cols: Any) -> Any:
        return xp.clip((ramp + z - distance(rows, cols)) / ramp, 0.0, 1.0)

    def within_span(rows: Any, cols: Any) -> Any:
        inside = soft_mask(rows, cols) > 0
        return inside & (cols <= rows + offset) if alignment is not None else inside

    def log_mask(rows: Any, cols: Any) -> Any:
        m = soft_mask(rows, cols)
        return xp.log(xp.where(m > 0, m, 1.0))

    reach = max(0, math.ceil(ramp + float(xp.max(z))))  # no head attends a distance ≥ R + max z
    band = band_pattern(reach, 0 if alignment is not None else reach, offset)
    masks = [_kernels.check_term(p, "mask", mask, boolean=True), within_span]
    return _kernels.softmax_attention(p, scale=_kernels.resolve_scale(scale, p.dim), mask=masks, bias=log_mask,
                                      tile_active=band.tile_active, implementation=implementation,
                                      return_lse=return_lse)


class _LogSpanMask:
    """The bias term ``log m_z(x)`` (0 where m = 0: those pairs are masked), a differentiable callable
    term of the engine: ``∂ log m / ∂z_h = 1/(R·m) = 1/(R + z_h − x)`` on the ramp ``0 < m < 1``, and 0
    where the clamp holds m at 1 (inside the span) or 0 (masked) — the forward's branch; at the
    kinks x = z and x = R + z, 0."""

    def __init__(self, xp: Any, z: Any, ramp: float, distance: Any, spans: Any) -> None:
        self.xp, self.z, self.ramp, self.distance = xp, z, ramp, distance
        self.params = {"spans": spans} if hasattr(spans, "shape") else {}

    def soft_mask(self, rows: Any, cols: Any) -> Any:
        return self.xp.clip((self.ramp + self.z - self.distance(rows, cols)) / self.ramp, 0.0, 1.0)

    def __call__(self, rows: Any, cols: Any) -> Any:
        m = self.soft_mask(rows, cols)
        return self.xp.log(self.xp.where(m > 0, m, 1.0))

    def vjp(self, rows: Any, cols: Any, d_value: Any) -> dict[str, Any]:
        xp = self.xp
        m = self.soft_mask(rows, cols)
        ramp_part = (m > 0) & (m < 1)
        per_pair = xp.where(ramp_part, d_value / (self.ramp * xp.where(ramp_part, m, 1.0)), 0.0)  # (..., H, l, s)
        d_z = xp.sum(per_pair, axis=(-2, -1))
        d_z = xp.sum(d_z, axis=tuple(range(d_z.ndim - 1))) if d_z.ndim > 1 else d_z  # (H,)
        if "spans" not in self.params:
            return {}
        if int(self.params["spans"].shape[0]) == 1:
            d_z = xp.sum(d_z, axis=0, keepdims=True)
        return {"spans": d_z}


def _adaptive_span_vjp(inputs: dict, d_out: Any, *, d_lse: Any = None, spans: Any = None, ramp: float = 32.0,
                       causal: bool | str = "bottom_right", mask: Any = None, scale: float | None = None,
                       compute_dtype: Any = None, implementation: str = "auto") -> dict:
    """VJP of :func:`adaptive_span_attention`: ``dq``, ``dk``, ``dv`` and ``d spans`` (the paper's learnt z).

    The engine's backward (dense, or tiled: FlashAttention-2 Alg. 2, tiles beyond every span skipped)
    gives ``dQ, dK, dV`` and ``dZ`` on the attended pairs; the bias ``log m_z(x)`` then gives
    ``dz_h = Σ_{i,j: 0 < m < 1} dZ_hij / (R + z_h − x_ij)`` (summed over the batch), see
    :class:`_LogSpanMask`. ``spans`` may be passed in ``inputs`` (an array: it gets a gradient) or as
    an option (a number or a list: no gradient).
    """
    from reflex.mechanisms import _grad

    p = _kernels.prepare(inputs["q"], inputs["k"], inputs["v"], compute_dtype=compute_dtype)
    xp = p.xp
    spans = inputs.get("spans", spans)
    if spans is None:
        raise ValueError("spans is required (in inputs as an array, or as an option)")
    ramp = float(ramp)
    if isinstance(spans, (int, float)) and not isinstance(spans, bool):
        z = xp.full((1, 1, 1), float(spans), dtype=p.q.dtype, device=p.device)
    else:
        spans_array = xp.asarray([float(s) for s in spans], dtype=p.q.dtype, device=p.device) \
            if isinstance(spans, (list, tuple)) else spans
        z = xp.reshape(xp.astype(spans_array, p.q.dtype), (-1, 1, 1))
    alignment = parse_causal(causal)
    offset = 0 if alignment is None else causal_offset(alignment, p.length, p.key_length)

    def distance(rows: Any, cols: Any) -> Any:
        x = xp.astype(rows + offset - cols, p.q.dtype)
        return x if alignment is not None else xp.abs(x)

    term = _LogSpanMask(xp, z, ramp, distance, spans)

    def within_span(rows: Any, cols: Any) -> Any:
        inside = term.soft_mask(rows, cols) > 0
        return inside & (cols <= rows + offset) if alignment is not None else inside

    reach = max(0, math.ceil(ramp + float(xp.max(z))))
    band = band_pattern(reach, 0 if alignment is not None else reach, offset)
    masks = [_kernels.check_term(p, "mask", mask, boolean=True), within_span]
    g = _grad.softmax_attention_vjp(p, d_out, d_lse, scale=_kernels.resolve_scale(scale, p.dim), mask=masks,
                                    bias=term, tile_active=band.tile_active, implementation=implementation)
    grads = {"q": g.dq, "k": g.dk, "v": g.dv}
    if "spans" in inputs and hasattr(spans, "shape"):
        grads["spans"] = g.bias[0]["spans"] if g.bias[0] else xp.zeros(spans.shape, dtype=p.q.dtype, device=p.device)
    return grads


def _cases(size: str, seed: int) -> list[Case]:
    d, gqa = standard(size, seed)
    spans = random.uniform((d["H"],), seed=(seed, 3), high=float(d["S"]))
    return [
        Case("per_head", {**gqa, "spans": spans}, {"ramp": 2.0}, seed=seed),
        Case("top_left", {**gqa, "spans": spans}, {"ramp": 1.5, "causal": "top_left"}, seed=seed),
        Case("symmetric", gqa, {"spans": 1.0, "ramp": 2.0, "causal": False}, seed=seed),
    ]


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    inputs = {name: random.normal((1, heads, seq, dim), seed=(seed, i)) for i, name in enumerate("qkv")}
    inputs["spans"] = random.uniform((heads,), seed=(seed, 3), high=float(seq))
    return Case("example", inputs, {}, seed=seed)


register(Mechanism(
    key="adaptive_span",
    function=adaptive_span_attention,
    family="J. multi-head",
    paper="Sukhbaatar et al. 2019, Adaptive Attention Span in Transformers, §3.2",
    params={"spans": "z: number or one span per head", "ramp": "R, soft ramp length (default 32)",
            "causal": "'bottom_right' (default) | 'top_left' | False (symmetric |i-j| distance)",
            "mask": "as full", "scale": "default 1/sqrt(D)"},
    cases=_cases,
    returns_lse=True,
    example=_example,
    vjp=_adaptive_span_vjp,
))

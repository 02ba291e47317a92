"""ALiBi: attention with linear biases (Press et al. 2022), a positional bias through the engine."""

from __future__ import annotations

import math
from typing import Any

from reflex import random
from reflex.backends import device as device_of
from reflex.backends import namespace, numpy_namespace
from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import dims, qkv
from reflex.mechanisms._engine.extra import sequence_offset
from reflex.mechanisms._patterns import band_pattern, causal_offset
from reflex.mechanisms._numerics import unbroadcast
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import typed_options

__all__ = ["alibi_attention", "alibi_slopes", "alibi_bias"]


def _slope_exponents(num_heads: int) -> list[float]:
    """k/n such that slope = 2^(−8k/n), in the paper's head order (closest power of two first)."""
    if num_heads & (num_heads - 1) == 0:
        return [(h + 1) / num_heads for h in range(num_heads)]
    closest = 2 ** int(math.floor(math.log2(num_heads)))
    extra = [(h + 1) / (2 * closest) for h in range(0, 2 * closest, 2)][: num_heads - closest]
    return [(h + 1) / closest for h in range(closest)] + extra


@typed_options()
def alibi_slopes(num_heads: int, /, *, xp: Any = None, device: Any = None, dtype: Any = None) -> Any:
    """The paper's per-head ALiBi slopes m_h as a float64 array of shape ``(H,)``.

    .. math::

        m_h = 2^{-8 (h+1) / H}, \\qquad h = 0, \\dots, H - 1 \\quad (H \\text{ a power of two}).

    For other H, with P the largest power of two below H: the P slopes for P heads, then the
    slopes at even indices (0, 2, 4, ...) of the 2P-head sequence, the first H − P of them (Press et
    al. 2022, §3 and their reference ``get_slopes``; flash-attn's tests and Hugging Face BLOOM use
    the same sequence). Each slope is evaluated as ``2.0 ** (-8k/n)`` directly, not as the reference
    code's ``start · ratio**h`` (which differs from the exact power by a few ulp).

    ``xp``/``device`` choose the array library (default NumPy on the CPU); ``dtype`` defaults to
    ``xp.float64``.
    """
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int; got {num_heads!r}")
    xp = numpy_namespace() if xp is None else xp
    values = [2.0 ** (-8.0 * e) for e in _slope_exponents(num_heads)]
    return xp.asarray(values, dtype=xp.float64 if dtype is None else dtype, device=device)


class _AlibiTerm:
    """Index-grid bias ``−m_h·|j − i − δ|`` (or ``m_h·(j − i − δ)``) for slopes ``(..., H)``, with its
    VJP (a differentiable callable term of the engine): ``∂b_hij/∂m_h = −|j − i − δ|`` (or
    ``j − i − δ``), so ``d m_h = Σ_ij d b_hij · ∂b_hij/∂m_h`` (summed over broadcast batch axes)."""

    def __init__(self, slopes: Any, offset: int, symmetric: bool) -> None:
        self.slopes, self.offset, self.symmetric = slopes, offset, symmetric
        self.xp = namespace(slopes)
        self.params = {"slopes": slopes}

    def _distance(self, rows: Any, cols: Any) -> Any:
        """``∂b/∂m``: −|j − (i + δ)| or j − (i + δ), in the slopes' dtype."""
        rel = self.xp.astype(cols - rows - self.offset, self.slopes.dtype)
        return -self.xp.abs(rel) if self.symmetric else rel

    def __call__(self, rows: Any, cols: Any) -> Any:
        return self.slopes[..., None, None] * self._distance(rows, cols)

    def vjp(self, rows: Any, cols: Any, d_value: Any) -> dict[str, Any]:
        grad = d_value * self._distance(rows, cols)
        return {"slopes": unbroadcast(self.xp, grad, (*self.slopes.shape, 1, 1))[..., 0, 0]}


def _alibi_term(slopes: Any, offset: int, symmetric: bool) -> _AlibiTerm:
    return _AlibiTerm(slopes, offset, symmetric)


def _check_slopes(p: _kernels.Prepared, slopes: Any) -> Any:
    heads, batch = p.heads, p.batch
    shape = tuple(int(n) for n in slopes.shape)
    if not shape or shape[-1] != heads or len(shape) > len(batch) + 1 or any(
            a not in (1, b) for a, b in zip(shape[-2::-1], batch[::-1])):
        raise ValueError(f"slopes must have shape (H,) or (..., H) with H = {heads} and ... broadcastable to {batch}; got {shape}")
    return _kernels.check_array(p.xp, p.device, p.q.dtype, "slopes", slopes)


@typed_options()
def alibi_bias(slopes: Any, /, length: int, key_length: int, *, alignment: str = "bottom_right",
               symmetric: bool = True) -> Any:
    """The ALiBi bias ``(..., H, L, S)`` for ``slopes (..., H)`` (e.g. from :func:`alibi_slopes`).

    .. math::

        b_{hij} = -m_h \\, |i + \\delta - j| \\quad (\\text{symmetric}), \\qquad
        b_{hij} = m_h (j - i - \\delta) \\quad (\\text{symmetric=False}),

    with δ = 0 for ``alignment="top_left"`` and δ = S − L for ``"bottom_right"``. The symmetric form
    is flash-attn's ``alibi_slopes`` convention (its docs: "a bias of
    (−alibi_slope · |i + seqlen_k − seqlen_q − j|)", i.e. bottom-right). ``symmetric=False`` with
    ``"top_left"`` is FlexAttention's ALiBi ``score_mod`` (``score + m_h·(kv_idx − q_idx)``). Under a
    causal mask with the same alignment (j ≤ i + δ) the two forms are equal. Returned in the slopes'
    array library, device and dtype.
    """
    xp = namespace(slopes)
    offset = causal_offset(alignment, length, key_length)
    rows = xp.reshape(xp.arange(length, dtype=xp.int64, device=device_of(slopes)), (length, 1))
    cols = xp.reshape(xp.arange(key_length, dtype=xp.int64, device=device_of(slopes)), (1, key_length))
    return _alibi_term(slopes, offset, symmetric)(rows, cols)


@typed_options()
def alibi_attention(q: Any, k: Any, v: Any, /, *, slopes: Any = None, causal: bool = False,
                    alignment: str = "bottom_right", symmetric: bool = True, scale: float | None = None,
                    return_lse: bool = False, compute_dtype: Any = None, implementation: str = "auto") -> Any:
    """ALiBi: softmax attention with a per-head linear distance penalty −m_h·|i − j|.

    .. math::

        O = \\mathrm{softmax}\\big(\\mathrm{scale}\\cdot QK^\\top + B\\big) V, \\qquad
        B_{hij} = -m_h\\,|i + \\delta - j|

    Shapes: ``q (..., H, L, D)``, ``k (..., G, S, D)``, ``v (..., G, S, E)`` → ``(..., H, L, E)``.

    Args:
        slopes: ``(H,)`` or ``(..., H)`` (per batch item, as flash-attn's ``(batch, nheads)``);
            default :func:`alibi_slopes` ``(H)``.
        causal: also mask keys j > i + δ.
        alignment: where query i sits among the keys: ``"bottom_right"`` (δ = S − L, flash-attn,
            KV caches; default) or ``"top_left"`` (δ = 0, FlexAttention / torch SDPA). Decides both
            the bias distance and the causal diagonal.
        symmetric: ``True`` (default) −m|i + δ − j| (the paper's non-causal extension, flash-attn);
            ``False`` m(j − i − δ) (FlexAttention's ``score_mod``). Equal under ``causal``.
        scale, return_lse, compute_dtype, implementation: as :func:`reflex.full_attention`.

    The bias is an index-grid term, so the tiled kernel never materialises ``L × S``. The bias is
    added to the scaled scores (as FlexAttention's ``score_mod`` and flash-attn do).

    Gradients (:func:`reflex.vjp`): q, k, v through the engine's backward (FlashAttention-2,
    Dao 2023, Alg. 2); the slopes, when given, through the bias term,
    ``d m_h = Σ_{i,j} dZ_{hij}·(−|i + δ − j|)`` (``symmetric=False``: ``(j − i − δ)``), summed over
    the batch axes they broadcast along; ``dZ = P∘(dP − D)`` is the score cotangent.

    Reference: Press, Smith & Lewis 2022, "Train Short, Test Long: Attention with Linear Biases
    Enables Input Length Extrapolation", ICLR, §3 (bias −m·(i − j), slopes).
    """
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    xp = p.xp
    dtype = p.q.dtype
    if slopes is None:
        slopes = alibi_slopes(p.heads, xp=xp, device=p.device, dtype=dtype)
    else:
        slopes = _check_slopes(p, slopes)
    # per sequence with padded lengths: a (B, 1, 1, 1) offset array (reflex.mechanisms._engine.extra)
    offset = sequence_offset(p, alignment, causal_offset(alignment, p.length, p.key_length))
    masks, tile_active = [], None
    if causal:
        pattern = band_pattern(-1, 0, offset)  # j <= i + offset
        masks, tile_active = [pattern.allowed], pattern.tile_active
    return _kernels.softmax_attention(
        p, scale=_kernels.resolve_scale(scale, p.dim), mask=masks, bias=_alibi_term(slopes, offset, symmetric),
        tile_active=tile_active, implementation=implementation, return_lse=return_lse,
    )


def _cases(size: str, seed: int) -> list[Case]:
    d = dims(size)
    shapes = dict(length=d["L"], key_length=d["S"], dim=d["D"], value_dim=d["E"])
    gqa = qkv(seed, heads=6, kv_heads=3, **shapes)  # 6 heads: non-power-of-two slopes
    return [
        Case("default", gqa, {}, seed=seed),
        Case("causal_bottom_right", gqa, {"causal": True}, seed=seed),
        Case("causal_top_left_flex", gqa, {"causal": True, "alignment": "top_left", "symmetric": False}, seed=seed),
        Case("explicit_slopes", {**gqa, "slopes": random.uniform((2, 6), seed=(seed, 5), low=0.05, high=1.0)}, {}, seed=seed),
    ]


def _reference(q: Any, k: Any, v: Any, /, *, slopes: Any = None, causal: bool = False,
               alignment: str = "bottom_right", symmetric: bool = True, **params: Any) -> Any:
    """``full_attention`` with the materialised :func:`alibi_bias`."""
    from reflex.mechanisms.full import full_attention

    xp = namespace(q)
    if slopes is None:
        slopes = alibi_slopes(q.shape[-3], xp=xp, device=device_of(q))
    bias = alibi_bias(xp.astype(slopes, xp.float64), q.shape[-2], k.shape[-2], alignment=alignment, symmetric=symmetric)
    return full_attention(q, k, v, bias=bias, causal=alignment if causal else False, implementation="dense", **params)


register(Mechanism(
    key="alibi",
    function=alibi_attention,
    family="H. positional biases and encodings",
    paper="Press, Smith & Lewis 2022 (ALiBi), ICLR, §3",
    params={
        "slopes": "(H,) or (..., H) per-head slopes; default the paper's (any head count)",
        "causal": "mask keys j > i + delta",
        "alignment": "'bottom_right' (delta = S - L, flash-attn; default) | 'top_left' (delta = 0, FlexAttention)",
        "symmetric": "True: -m|i + delta - j| (flash-attn); False: m(j - i - delta) (FlexAttention score_mod)",
    },
    cases=_cases,
    reference=_reference,
    returns_lse=True,
    vjp=_kernels.engine_vjp(alibi_attention),
))

"""Gaussian position priors on attention scores: localness (Yang 2018), Gaussian Transformer, hard-coded Gaussian."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

from reflex import random
from reflex.backends import device as device_of
from reflex.backends import namespace
from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import dims, qkv
from reflex.mechanisms._patterns import mask_and_causal
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import typed_options

__all__ = ["gaussian_prior_attention", "gaussian_transformer_attention", "hard_gaussian_attention"]


def _per_row(p: _kernels.Prepared, name: str, a: Any) -> Any:
    """An array broadcastable to ``(..., H, L)``, cast and reshaped to ``len(...) + 2`` axes."""
    xp = p.xp
    if namespace(a) is not xp or device_of(a) != p.device:
        raise TypeError(f"{name} must be an array of q's library on q's device")
    target = (*p.batch, p.heads, p.length)
    shape = tuple(int(n) for n in a.shape)
    if len(shape) > len(target) or not all(s in (1, t) for s, t in zip(shape[::-1], target[::-1])):
        raise ValueError(f"{name} of shape {shape} does not broadcast to (..., H, L) = {target}")
    return xp.reshape(xp.astype(a, p.q.dtype), (1,) * (len(target) - len(shape)) + shape)


def _rows_of(p: _kernels.Prepared, a: Any, rows: Any) -> Any:
    """Entries of a per-row array at the query indices ``rows (l, 1)``, as ``(..., H|1, l, 1)``."""
    xp = p.xp
    if a.shape[-1] != 1:
        a = xp.take(a, xp.reshape(rows, (-1,)), axis=-1)
    return a[..., None]


def _per_head(p: _kernels.Prepared, name: str, value: Any) -> Any:
    """A number, or a length-H sequence/array of per-head values, as a ``(H|1, 1, 1)`` array."""
    xp = p.xp
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return xp.full((1, 1, 1), float(value), dtype=p.q.dtype, device=p.device)
    if isinstance(value, (list, tuple)):
        value = xp.asarray([float(v) for v in value], dtype=p.q.dtype, device=p.device)
    if not hasattr(value, "shape") or value.ndim > 1 or int(value.shape[0] if value.ndim else 1) not in (1, p.heads):
        raise ValueError(f"{name} must be a number or one value per head (length {p.heads}); got {value!r}")
    if device_of(value) != p.device:
        raise ValueError(f"{name} is on device {device_of(value)}; q is on {p.device}")
    return xp.reshape(xp.astype(value, p.q.dtype), (-1, 1, 1))


def _check_widths(p: _kernels.Prepared, name: str, width: Any) -> None:
    """Gaussian widths must be > 0: σ = 0 gives 0·∞ = NaN at the centre (one host sync)."""
    if not bool(p.xp.all(width > 0)):
        raise ValueError(f"{name} must be > 0 (Gaussian widths); got a value <= 0 or NaN")


def _run(p: _kernels.Prepared, bias_fn: Any, *, mask: Any, causal: Any, scale: float, return_lse: bool,
         implementation: str) -> Any:
    masks, tile_active = mask_and_causal(p, mask, causal)
    return _kernels.softmax_attention(p, scale=scale, mask=masks, bias=bias_fn, tile_active=tile_active,
                                      implementation=implementation, return_lse=return_lse)


@typed_options()
def gaussian_prior_attention(q: Any, k: Any, v: Any, /, *, centers: Any, sigmas: Any = None, windows: Any = None,
                             sigma_per_window: float = 0.5, mask: Any = None, causal: bool | str = False,
                             scale: float | None = None, return_lse: bool = False, compute_dtype: Any = None,
                             implementation: str = "auto") -> Any:
    """Localness: softmax attention plus a Gaussian prior centred on a given position per query.

    .. math::

        O = \\mathrm{softmax}\\big(\\mathrm{scale}\\cdot QK^\\top + G\\big)V,\\qquad
        G_{ij} = -\\frac{(j - P_i)^2}{2\\sigma_i^2},\\qquad \\sigma_i = \\rho\\, D_i

    Shapes: ``q (..., H, L, D)``, ``k (..., G, S, D)``, ``v (..., G, S, E)`` → ``(..., H, L, E)``;
    ``centers`` P and ``sigmas`` σ (or ``windows`` D) broadcastable to ``(..., H, L)``, in key
    positions (j = 0 … S−1, real-valued). The paper predicts P = I·sigmoid(·) and D = I·sigmoid(·)
    from the queries; here both are explicit inputs. Its window-to-width rule σ = D/2 is
    ``sigma_per_window`` ρ = 0.5; pass exactly one of ``sigmas`` and ``windows``. The prior is a
    bias term of the index grid, so it also runs tiled. ``mask``/``causal``/``scale`` as in
    :func:`reflex.full_attention`.

    Reference: Yang et al. 2018, "Modeling Localness for Self-Attention Networks", §2.2 (eq. 5–9).
    """
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    if (sigmas is None) == (windows is None):
        raise ValueError("pass exactly one of sigmas and windows (sigma = sigma_per_window * window)")
    prior = _LocalnessPrior(p, centers, sigmas, windows, float(sigma_per_window))
    return _run(p, prior, mask=mask, causal=causal, scale=_kernels.resolve_scale(scale, p.dim),
                return_lse=return_lse, implementation=implementation)


def _place_rows(xp: Any, per_row: Any, rows: Any, length: int) -> Any:
    """Per-row values of the tile rows ``rows (l, 1)`` (consecutive) placed on a zero ``(..., L)`` axis."""
    first, count = int(rows[0, 0]), int(rows.shape[0])
    lead = per_row.shape[:-1]
    zeros = [xp.zeros((*lead, n), dtype=per_row.dtype, device=device_of(per_row)) for n in (first, length - first - count)]
    return xp.concat([zeros[0], per_row, zeros[1]], axis=-1)


def _reduce_param(xp: Any, g: Any, padded: tuple[int, ...], shape: tuple[int, ...]) -> Any:
    """``g`` summed over the axes the 1-padded parameter shape ``padded`` broadcasts along, shaped ``shape``."""
    lead = g.ndim - len(padded)
    full = (1,) * lead + tuple(padded)
    axes = tuple(i for i, (a, b) in enumerate(zip(g.shape, full)) if b == 1 and a != 1)
    return xp.reshape(xp.sum(g, axis=axes, keepdims=True) if axes else g, tuple(shape))


class _LocalnessPrior:
    """The Gaussian localness prior ``G_ij = −(j − P_i)²·c_i``, ``c_i = 1/(2σ_i²)``, as a differentiable
    engine term (``params``: the array inputs centers, and sigmas or windows).

    Backward: ``dP_i = Σ_j dG_ij·2(j − P_i)c_i``, ``dσ_i = Σ_j dG_ij·(j − P_i)²/σ_i³`` (``dc = −dσ·σ³``),
    ``dW_i = ρ·dσ_i`` for σ = ρW.
    """

    def __init__(self, p: _kernels.Prepared, centers: Any, sigmas: Any, windows: Any, rho: float) -> None:
        self.p = p
        self.centre = _per_row(p, "centers", centers)
        if sigmas is not None:
            self.width = _per_row(p, "sigmas", sigmas)
            self.width_name, self.rho, width_input = "sigmas", 1.0, sigmas
        else:
            self.width = rho * _per_row(p, "windows", windows)
            self.width_name, self.rho, width_input = "windows", rho, windows
        _check_widths(p, "sigmas" if sigmas is not None else "sigma_per_window * windows", self.width)
        self.inv_two_var = 1.0 / (2.0 * self.width * self.width)
        self.params = {"centers": centers, self.width_name: width_input}
        self.padded = {"centers": tuple(self.centre.shape), self.width_name: tuple(self.width.shape)}

    def __call__(self, rows: Any, cols: Any) -> Any:
        p = self.p
        offset = p.xp.astype(cols, p.q.dtype) - _rows_of(p, self.centre, rows)
        return -(offset * offset) * _rows_of(p, self.inv_two_var, rows)

    def vjp(self, rows: Any, cols: Any, d_value: Any) -> dict[str, Any]:
        p = self.p
        xp = p.xp
        offset = xp.astype(cols, p.q.dtype) - _rows_of(p, self.centre, rows)
        c = _rows_of(p, self.inv_two_var, rows)
        d_centre = xp.sum(d_value * 2.0 * offset * c, axis=-1)  # (..., l)
        width = _rows_of(p, self.width, rows)
        d_width = xp.sum(d_value * (offset * offset), axis=-1) / (width[..., 0] ** 3)
        out = {}
        for name, per_row in (("centers", d_centre), (self.width_name, self.rho * d_width)):
            padded = self.padded[name]
            if padded[-1] == 1:
                per_row = xp.sum(per_row, axis=-1, keepdims=True)
            else:
                per_row = _place_rows(xp, per_row, rows, p.length)
            if hasattr(self.params[name], "shape"):
                out[name] = _reduce_param(xp, per_row, padded, tuple(self.params[name].shape))
        return out


@typed_options()
def gaussian_transformer_attention(q: Any, k: Any, v: Any, /, *, w: Any, b: Any, mask: Any = None,
                                   causal: bool | str = False, scale: float | None = None, return_lse: bool = False,
                                   compute_dtype: Any = None, implementation: str = "auto") -> Any:
    """Gaussian Transformer: softmax attention plus a distance prior −|w·(i−j)² + b|.

    .. math::

        O = \\mathrm{softmax}\\big(\\mathrm{scale}\\cdot QK^\\top + G\\big)V,\\qquad
        G_{ij} = -\\left| w\\,(i - j)^2 + b \\right|

    Shapes as :func:`reflex.full_attention`. ``w`` and ``b`` are numbers (shared, the paper's
    learnt scalars) or one value per query head (length H). Distances use the raw indices i of the
    query and j of the key (top-left alignment). ``mask``/``causal``/``scale`` as in
    :func:`reflex.full_attention`; the prior is an index-grid bias, so it also runs tiled.

    Reference: Guo, Zhang & Liu 2019, "Gaussian Transformer: A Lightweight Approach for Natural
    Language Inference", AAAI, §3.2 (Gaussian prior, eq. 6–8).
    """
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    prior = _DistancePrior(p, w, b)
    return _run(p, prior, mask=mask, causal=causal, scale=_kernels.resolve_scale(scale, p.dim),
                return_lse=return_lse, implementation=implementation)


@typed_options()
def hard_gaussian_attention(q: Any, k: Any, v: Any, /, *, offsets: int | Sequence[int] | Any = 0,
                            sigmas: float | Sequence[float] | Any = 1.0, mask: Any = None, causal: bool | str = False,
                            return_lse: bool = False, compute_dtype: Any = None, implementation: str = "auto") -> Any:
    """Hard-coded Gaussian attention: fixed Gaussian weights around i + offset, no query-key scores.

    .. math::

        O_i = \\sum_j \\frac{\\exp\\!\\big(-(j - i - o_h)^2 / 2\\sigma_h^2\\big)}
                          {\\sum_{j'} \\exp\\!\\big(-(j' - i - o_h)^2 / 2\\sigma_h^2\\big)}\\, v_j

    The weights are the paper's Gaussian density normalised over the attended keys (the engine's
    softmax of the log density with scale 0). ``q`` and ``k`` give only the shapes
    ``(..., H, L, D)``, ``(..., G, S, D)`` (so the function drops into :func:`multi_head_attention`);
    their values are never read. ``offsets`` o and ``sigmas`` σ are numbers or one per head; the
    paper uses σ = 1 and offsets such as −1 / +1 for encoder heads and −1 with ``causal=True`` for the
    decoder. ``mask``/``causal`` as in :func:`reflex.full_attention`.

    Reference: You, Sun & Iyyer 2020, "Hard-Coded Gaussian Attention for Neural Machine
    Translation", ACL, §3 (eq. 2).
    """
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    p = replace(p, q=p.xp.zeros_like(p.q), k=p.xp.zeros_like(p.k))
    o_h, s_h = _per_head(p, "offsets", offsets), _per_head(p, "sigmas", sigmas)
    _check_widths(p, "sigmas", s_h)
    inv_two_var = 1.0 / (2.0 * s_h * s_h)

    def prior(rows: Any, cols: Any) -> Any:
        d = p.xp.astype(cols - rows, p.q.dtype) - o_h
        return -(d * d) * inv_two_var

    return _run(p, prior, mask=mask, causal=causal, scale=0.0, return_lse=return_lse, implementation=implementation)

class _DistancePrior:
    """The Gaussian Transformer prior ``G_ij = −|w_h (i − j)² + b_h|`` as a differentiable engine term
    (``params``: ``w`` and ``b`` where given as arrays). Backward with ``u = w d² + b``:
    ``dw_h = −Σ dG·sign(u)·d²``, ``db_h = −Σ dG·sign(u)`` (subgradient 0 where u = 0)."""

    def __init__(self, p: _kernels.Prepared, w: Any, b: Any) -> None:
        self.p = p
        self.w_h, self.b_h = _per_head(p, "w", w), _per_head(p, "b", b)
        self.params = {name: a for name, a in (("w", w), ("b", b)) if hasattr(a, "shape")}

    def _parts(self, rows: Any, cols: Any) -> tuple[Any, Any]:
        d = self.p.xp.astype(rows - cols, self.p.q.dtype)
        d2 = d * d
        return d2, self.w_h * d2 + self.b_h

    def __call__(self, rows: Any, cols: Any) -> Any:
        return -self.p.xp.abs(self._parts(rows, cols)[1])

    def vjp(self, rows: Any, cols: Any, d_value: Any) -> dict[str, Any]:
        xp = self.p.xp
        d2, u = self._parts(rows, cols)
        du = -d_value * xp.sign(u)
        out = {}
        for name, g in (("w", du * d2), ("b", du)):
            if name in self.params:
                g = xp.moveaxis(g, -3, 0)  # u has a head axis (of w_h, b_h: H or 1) third from the end
                per_head = xp.sum(xp.reshape(g, (int(g.shape[0]), -1)), axis=1)
                target = tuple(self.params[name].shape)
                out[name] = xp.reshape(xp.sum(per_head) if (not target or target[0] == 1) else per_head, target)
        return out



class _HardGaussianPrior:
    """The bias ``−(j − i − o_h)²/(2σ_h²)`` as a differentiable callable term of the engine:
    ``∂/∂o_h = (j − i − o_h)/σ_h²``, ``∂/∂σ_h = (j − i − o_h)²/σ_h³``, summed over the pairs (and batch)."""

    def __init__(self, p: _kernels.Prepared, offsets: Any, sigmas: Any, o_h: Any, s_h: Any) -> None:
        self.xp, self.dtype, self.o_h, self.s_h = p.xp, p.q.dtype, o_h, s_h
        self.params = {name: a for name, a in (("offsets", offsets), ("sigmas", sigmas))
                       if hasattr(a, "shape") and p.xp.isdtype(a.dtype, "real floating")}

    def _gap(self, rows: Any, cols: Any) -> Any:
        return self.xp.astype(cols - rows, self.dtype) - self.o_h

    def __call__(self, rows: Any, cols: Any) -> Any:
        d = self._gap(rows, cols)
        return -(d * d) / (2.0 * self.s_h * self.s_h)

    def vjp(self, rows: Any, cols: Any, d_value: Any) -> dict[str, Any]:
        xp = self.xp
        d = self._gap(rows, cols)
        out = {}
        for name, partial in (("offsets", d / (self.s_h * self.s_h)), ("sigmas", d * d / (self.s_h * self.s_h * self.s_h))):
            if name in self.params:
                g = xp.sum(d_value * partial, axis=(-2, -1))
                g = xp.sum(g, axis=tuple(range(g.ndim - 1))) if g.ndim > 1 else g  # (H,)
                out[name] = xp.sum(g, axis=0, keepdims=True) if int(self.params[name].shape[0]) == 1 else g
        return out


def _hard_gaussian_vjp(inputs: dict, d_out: Any, *, d_lse: Any = None, offsets: Any = 0, sigmas: Any = 1.0,
                       mask: Any = None, causal: bool | str = False, compute_dtype: Any = None,
                       implementation: str = "auto") -> dict:
    """VJP of :func:`hard_gaussian_attention`: ``dv``, ``d offsets`` and ``d sigmas`` (floating arrays in
    ``inputs``); ``dq = dk = 0`` (their values are never read).

    The engine's backward (dense, or tiled: FlashAttention-2 Alg. 2) with the prior as a bias gives
    ``dV = Pᵀ dO`` and ``dZ = P ∘ (dP − rowsum(P ∘ dP) + dL)``; then ``d o_h = Σ dZ_hij (j − i − o_h)/σ_h²``
    and ``d σ_h = Σ dZ_hij (j − i − o_h)²/σ_h³`` (see :class:`_HardGaussianPrior`).
    """
    from reflex.mechanisms import _grad

    p = _kernels.prepare(inputs["q"], inputs["k"], inputs["v"], compute_dtype=compute_dtype)
    p = replace(p, q=p.xp.zeros_like(p.q), k=p.xp.zeros_like(p.k))
    offsets, sigmas = inputs.get("offsets", offsets), inputs.get("sigmas", sigmas)
    o_h, s_h = _per_head(p, "offsets", offsets), _per_head(p, "sigmas", sigmas)
    _check_widths(p, "sigmas", s_h)
    term = _HardGaussianPrior(p, offsets, sigmas, o_h, s_h)
    masks, tile_active = mask_and_causal(p, mask, causal)
    g = _grad.softmax_attention_vjp(p, d_out, d_lse, scale=0.0, mask=masks, bias=term, tile_active=tile_active,
                                    implementation=implementation)
    grads = {"q": p.xp.zeros(p.q.shape, dtype=p.q.dtype, device=p.device),
             "k": p.xp.zeros(p.k.shape, dtype=p.q.dtype, device=p.device), "v": g.dv}
    for name in term.params:
        grads[name] = g.bias[0][name]
    return grads


# --- registry ------------------------------------------------------------------------------------

def _shapes(size: str) -> dict[str, int]:
    d = dims(size)
    return dict(heads=d["H"], length=d["L"], key_length=d["S"], dim=d["D"], value_dim=d["E"])


def _prior_cases(size: str, seed: int) -> list[Case]:
    s = _shapes(size)
    gqa = qkv(seed, kv_heads=2, **s)
    centers = random.uniform((2, s["heads"], s["length"]), seed=(seed, 3), high=float(s["key_length"] - 1))
    sigmas = random.uniform((2, s["heads"], s["length"]), seed=(seed, 4), low=0.5, high=3.0)
    shared = random.uniform((s["length"],), seed=(seed, 5), high=float(s["key_length"] - 1))
    return [
        Case("sigmas", {**gqa, "centers": centers, "sigmas": sigmas}, {}, seed=seed),
        Case("windows_causal", {**gqa, "centers": centers, "windows": 2 * sigmas}, {"causal": "bottom_right"}, seed=seed),
        Case("shared_centers", {**gqa, "centers": shared, "sigmas": sigmas[:1, :1]}, {}, seed=seed),
    ]


def _transformer_cases(size: str, seed: int) -> list[Case]:
    s = _shapes(size)
    gqa = qkv(seed, kv_heads=2, **s)
    return [
        Case("scalar", gqa, {"w": 0.3, "b": -1.0}, seed=seed),
        Case("per_head_causal", {**gqa, "w": random.uniform((s["heads"],), seed=(seed, 3)),
                                 "b": random.normal((s["heads"],), seed=(seed, 4))}, {"causal": True}, seed=seed),
    ]


def _hard_cases(size: str, seed: int) -> list[Case]:
    s = _shapes(size)
    gqa = qkv(seed, kv_heads=2, **s)
    return [
        Case("self", gqa, {}, seed=seed),
        Case("per_head", gqa, {"offsets": [-1, 1, 0, 2], "sigmas": [1.0, 1.0, 0.5, 2.0]}, seed=seed),
        Case("decoder", gqa, {"offsets": -1, "causal": True}, seed=seed),
    ]


def _qkv_example(seq: int, heads: int, dim: int, seed: int) -> dict:
    return {name: random.normal((1, heads, seq, dim), seed=(seed, i)) for i, name in enumerate("qkv")}


def _prior_example(seq: int, heads: int, dim: int, seed: int) -> Case:
    centers = random.uniform((1, heads, seq), seed=(seed, 3), high=float(seq - 1))
    return Case("example", {**_qkv_example(seq, heads, dim, seed), "centers": centers,
                            "sigmas": random.uniform((1, heads, seq), seed=(seed, 4), low=0.5, high=3.0)}, {}, seed=seed)


def _transformer_example(seq: int, heads: int, dim: int, seed: int) -> Case:
    return Case("example", _qkv_example(seq, heads, dim, seed), {"w": 0.1, "b": -1.0}, seed=seed)


register(Mechanism(
    key="gaussian_prior", function=gaussian_prior_attention, family="G. prior",
    paper="Yang et al. 2018, Modeling Localness for Self-Attention Networks, §2.2",
    params={"centers": "P (..., H, L): Gaussian centre per query, in key positions",
            "sigmas": "σ (..., H, L): Gaussian width per query", "windows": "D (..., H, L): window, σ = ρ·D",
            "sigma_per_window": "ρ, default 0.5 (the paper's σ = D/2)", "mask": "as full", "causal": "as full"},
    cases=_prior_cases, returns_lse=True, example=_prior_example,
    vjp=_kernels.engine_vjp(gaussian_prior_attention),
))
register(Mechanism(
    key="gaussian_transformer", function=gaussian_transformer_attention, family="G. prior",
    paper="Guo, Zhang & Liu 2019, Gaussian Transformer, AAAI, §3.2",
    params={"w": "number or per-head weights", "b": "number or per-head offsets", "mask": "as full", "causal": "as full"},
    cases=_transformer_cases, returns_lse=True, example=_transformer_example,
    vjp=_kernels.engine_vjp(gaussian_transformer_attention),
))
register(Mechanism(
    key="hard_gaussian", function=hard_gaussian_attention, family="G. prior",
    paper="You, Sun & Iyyer 2020, Hard-Coded Gaussian Attention for NMT, ACL, §3",
    params={"offsets": "centre offset o per head (number or length H)", "sigmas": "σ per head, default 1",
            "mask": "as full", "causal": "as full"},
    cases=_hard_cases, returns_lse=True, vjp=_hard_gaussian_vjp,
))

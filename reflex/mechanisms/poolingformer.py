"""Poolingformer: a sliding-window level plus a level over pooled keys/values, summed."""

from __future__ import annotations

from typing import Any

from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import example_qkv, standard
from reflex.mechanisms._patterns import band_pattern, check_window
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import typed_options

__all__ = ["poolingformer_attention", "pool_sequence"]

POOLS = ("mean", "max")


@typed_options()
def pool_sequence(xp: Any, x: Any, *, pool: str, kernel_size: int, stride: int) -> Any:
    """Pool ``x (..., S, D)`` along S: slot t covers rows ``[tσ, tσ + κ)``, no padding → ``(..., T, D)``.

    ``T = ⌊(S − κ)/σ⌋ + 1``; ``pool`` is ``"mean"`` or ``"max"`` over each slot's κ rows.
    """
    n = int(x.shape[-2])
    slots = (n - kernel_size) // stride + 1
    stop = stride * (slots - 1) + 1
    windows = xp.stack([x[..., r:r + stop:stride, :] for r in range(kernel_size)], axis=0)  # (κ, ..., T, D)
    return xp.mean(windows, axis=0) if pool == "mean" else xp.max(windows, axis=0)


@typed_options()
def poolingformer_attention(q: Any, k: Any, v: Any, /, *, window: tuple[int, int], pool: str | None = "mean",
                            kernel_size: int = 2, stride: int | None = None, scale: float | None = None,
                            compute_dtype: Any = None, implementation: str = "auto") -> Any:
    """Poolingformer: sliding-window attention plus attention over pooled keys/values, summed.

    .. math::

        O = \\mathrm{softmax}_{\\,j - i \\in [-\\ell, r]}(\\mathrm{scale}\\cdot QK^\\top)\\,V
          + \\mathrm{softmax}(\\mathrm{scale}\\cdot Q\\,\\mathrm{pool}(K)^\\top)\\,\\mathrm{pool}(V)

    (Zhang et al. 2021, "Poolingformer: Long Document Modeling with Pooling Attention", §3.1–3.2:
    first level a sliding window, second level pooled keys/values; the level outputs are summed.
    Here the second level attends every pooled slot — the catalogue's semantics; the paper restricts
    it to a second, larger window).

    Shapes: ``q (..., H, L, D)``, ``k (..., G, S, D)``, ``v (..., G, S, E)`` → ``(..., H, L, E)``.

    Args:
        window: ``(left, right)`` of the first level (−1 = unbounded side), query i at key i.
        pool: ``"mean"``, ``"max"``, or ``None`` to disable the second level.
        kernel_size, stride: κ ≤ S and σ (default κ) of the pooling (:func:`pool_sequence`).
        scale: default 1/√D, both levels. implementation: engine kernel (band tiles are skipped).

    A query whose window holds no key gets 0 from the first level. With a window covering the
    sequence and ``pool=None`` the result is ``full_attention``.
    """
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    xp = p.xp
    left, right = check_window(window)
    s = _kernels.resolve_scale(scale, p.dim)
    band = band_pattern(left, right)
    local = _kernels.softmax_attention(p, scale=s, mask=band.allowed, tile_active=band.tile_active,
                                       implementation=implementation)
    if pool is None:
        return local
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {', '.join(POOLS)} or None; got {pool!r}")
    stride = kernel_size if stride is None else stride
    for name, value in (("kernel_size", kernel_size), ("stride", stride)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1; got {value!r}")
    if kernel_size > p.key_length:
        raise ValueError(f"kernel_size must be at most S = {p.key_length}; got {kernel_size}")
    pooled_k = pool_sequence(xp, p.k, pool=pool, kernel_size=kernel_size, stride=stride)
    pooled_v = pool_sequence(xp, p.v, pool=pool, kernel_size=kernel_size, stride=stride)
    pooled = _kernels.softmax_attention(_kernels.prepare(p.q, pooled_k, pooled_v, compute_dtype=p.q.dtype), scale=s,
                                        implementation=implementation)
    return local + pooled


def _pool_vjp(xp: Any, x: Any, d_pooled: Any, *, pool: str, kernel_size: int, stride: int) -> Any:
    """Adjoint of :func:`pool_sequence`: ``d_pooled (..., T, D)`` → ``dx (..., S, D)``.

    Mean: row ``tσ + r`` receives ``d_t/κ`` from every slot t covering it. Max: each (slot, feature)
    sends its gradient to the row holding the max — the forward's branch; at a tie, the first such
    row (subgradient; ties are a kink). Rows are placed by interleaving with zeros, never an (T, S) matrix.
    """
    n, width = int(x.shape[-2]), int(x.shape[-1])
    slots = int(d_pooled.shape[-2])
    stop = stride * (slots - 1) + 1
    lead = tuple(d_pooled.shape[:-2])
    if pool == "max":
        windows = xp.stack([x[..., r:r + stop:stride, :] for r in range(kernel_size)], axis=0)
        winner = xp.argmax(windows, axis=0)  # (..., T, D), first index at a tie
    d_x = xp.zeros((*lead, n, width), dtype=d_pooled.dtype, device=d_pooled.device)
    for r in range(kernel_size):
        part = d_pooled / kernel_size if pool == "mean" else xp.where(winner == r, d_pooled, 0.0)
        if stride > 1:  # row t of part goes to position r + tσ: interleave σ − 1 zero rows after each
            gaps = xp.zeros((*lead, slots, stride - 1, width), dtype=part.dtype, device=part.device)
            part = xp.reshape(xp.concat([part[..., None, :], gaps], axis=-2), (*lead, slots * stride, width))
        part = part[..., :min(int(part.shape[-2]), n - r), :]
        tail = n - r - int(part.shape[-2])
        pieces = [xp.zeros((*lead, r, width), dtype=part.dtype, device=part.device), part,
                  xp.zeros((*lead, tail, width), dtype=part.dtype, device=part.device)]
        d_x = d_x + xp.concat(pieces, axis=-2)
    return d_x


def _poolingformer_vjp(inputs: dict, d_out: Any, *, d_lse: Any = None, window: tuple[int, int],
                       pool: str | None = "mean", kernel_size: int = 2, stride: int | None = None,
                       scale: float | None = None, compute_dtype: Any = None, implementation: str = "auto") -> dict:
    """VJP of :func:`poolingformer_attention`: ``{"q": dq, "k": dk, "v": dv}``.

    The output is a sum, so ``dO`` reaches both levels unchanged. The engine's backward (dense, or
    tiled: FlashAttention-2 Alg. 2, band tiles skipped) of the sliding level gives its ``dQ, dK, dV``;
    that of the pooled level gives ``dQ``, ``d pool(K)``, ``d pool(V)``, which :func:`_pool_vjp` returns to
    the rows each slot pooled (mean: ``/κ``; max: the maximal row, ties to the first).
    """
    from reflex.mechanisms import _grad

    p = _kernels.prepare(inputs["q"], inputs["k"], inputs["v"], compute_dtype=compute_dtype)
    xp = p.xp
    left, right = check_window(window)
    s = _kernels.resolve_scale(scale, p.dim)
    band = band_pattern(left, right)
    g = _grad.softmax_attention_vjp(p, d_out, scale=s, mask=band.allowed, tile_active=band.tile_active,
                                    implementation=implementation)
    if pool is None:
        return {"q": g.dq, "k": g.dk, "v": g.dv}
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {', '.join(POOLS)} or None; got {pool!r}")
    stride = kernel_size if stride is None else stride
    pooled_k = pool_sequence(xp, p.k, pool=pool, kernel_size=kernel_size, stride=stride)
    pooled_v = pool_sequence(xp, p.v, pool=pool, kernel_size=kernel_size, stride=stride)
    h = _grad.softmax_attention_vjp(_kernels.prepare(p.q, pooled_k, pooled_v, compute_dtype=p.q.dtype), d_out, scale=s,
                                    implementation=implementation)
    options = dict(pool=pool, kernel_size=kernel_size, stride=stride)
    return {"q": g.dq + h.dq, "k": g.dk + _pool_vjp(xp, p.k, h.dk, **options),
            "v": g.dv + _pool_vjp(xp, p.v, h.dv, **options)}


def _cases(size: str, seed: int) -> list[Case]:
    d, gqa = standard(size, seed)
    return [
        Case("mean", gqa, {"window": [1, 1], "pool": "mean", "kernel_size": 2}, seed=seed),
        Case("max_overlapping", gqa, {"window": [2, 0], "pool": "max", "kernel_size": 3, "stride": 2}, seed=seed),
        Case("tiled", gqa, {"window": [1, 2], "pool": "mean", "kernel_size": 2, "implementation": "tiled"}, seed=seed),
    ]


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    w = min(64, max(1, seq // 16))
    return Case("example", example_qkv(seq, heads, dim, seed), {"window": [w, w], "pool": "mean", "kernel_size": min(4, seq)},
                seed=seed)


register(Mechanism(
    key="poolingformer",
    function=poolingformer_attention,
    family="E. compressed memory",
    paper="Zhang et al. 2021, 'Poolingformer', §3.1-3.2",
    params={
        "window": "(left, right) of the sliding level, -1 = unbounded",
        "pool": "'mean' | 'max' | None (second level off)",
        "kernel_size": "pooling kernel (<= S)",
        "stride": "pooling stride (default kernel_size)",
        "scale": "score scale, default 1/sqrt(D)",
    },
    cases=_cases,
    example=_example,
    vjp=_poolingformer_vjp,
))

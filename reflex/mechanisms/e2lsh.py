"""E2LSH (p-stable) bucketed attention: queries attend exactly the keys with the same hash code."""

from __future__ import annotations

from typing import Any

from reflex import random
from reflex.backends import device as device_of
from reflex.backends import namespace
from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import example_qkv, standard
from reflex.mechanisms._patterns import causal_pattern, explicit_mask, mask_and_causal, parse_causal
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import typed_options

__all__ = ["e2lsh_attention", "e2lsh_hash"]


def _projections(xp: Any, dev: Any, dtype: Any, dim: int, num_projections: Any, bucket_width: Any,
                 projections: Any, offsets: Any, seed: Any) -> tuple[Any, Any, float]:
    if isinstance(num_projections, bool) or not isinstance(num_projections, int) or num_projections < 1:
        raise ValueError(f"num_projections must be an int >= 1; got {num_projections!r}")
    if isinstance(bucket_width, bool) or not isinstance(bucket_width, (int, float)) or not bucket_width > 0:
        raise ValueError(f"bucket_width must be a positive number; got {bucket_width!r}")
    width = float(bucket_width)
    if seed is not None:
        if projections is not None or offsets is not None:
            raise ValueError("pass either seed= or projections= and offsets=, not both")
        r = random.normal((dim, num_projections), seed=(*_parts(seed), 0), xp=xp, device=dev)
        b = random.uniform((num_projections,), seed=(*_parts(seed), 1), high=width, xp=xp, device=dev)
        return xp.astype(r, dtype), xp.astype(b, dtype), width
    if projections is None or offsets is None:
        raise ValueError("pass seed=, or projections= (D, P) and offsets= (P,)")
    for name, x, shape in (("projections", projections, (dim, num_projections)), ("offsets", offsets, (num_projections,))):
        if tuple(int(n) for n in x.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}; got {tuple(x.shape)}")
    return (_kernels.check_array(xp, dev, dtype, "projections", projections),
            _kernels.check_array(xp, dev, dtype, "offsets", offsets), width)


def _parts(seed: Any) -> tuple[int, ...]:
    return tuple(seed) if isinstance(seed, tuple) else (seed,)


def _codes(xp: Any, x: Any, r: Any, b: Any, width: float) -> Any:
    """``floor((x·r + b)/w)`` as int64 ``(..., n, P)``; x·r summed over d in order (identical on every backend)."""
    proj = None
    for d in range(int(x.shape[-1])):
        term = x[..., d:d + 1] * r[d, :]
        proj = term if proj is None else proj + term
    if proj is None:
        proj = xp.zeros((*x.shape[:-1], int(r.shape[-1])), dtype=x.dtype, device=device_of(x))
    return xp.astype(xp.floor((proj + b) / width), xp.int64)


@typed_options()
def e2lsh_hash(x: Any, /, *, num_projections: int, bucket_width: float, projections: Any = None, offsets: Any = None,
               seed: Any = None, compute_dtype: Any = None) -> Any:
    """Hash codes ``h(x) = ⌊(x·r_p + b_p)/w⌋`` of ``x (..., n, D)`` → int64 ``(..., n, P)``."""
    p = _kernels.prepare(x, x, x, compute_dtype=compute_dtype) if x.ndim >= 3 else None
    xp = namespace(x)
    dtype = p.q.dtype if p is not None else _kernels.resolve_dtype(xp, compute_dtype)
    r, b, width = _projections(xp, device_of(x), dtype, int(x.shape[-1]), num_projections, bucket_width,
                               projections, offsets, seed)
    return _codes(xp, xp.astype(x, dtype), r, b, width)


def _same_bucket(p: _kernels.Prepared, r: Any, b: Any, width: float) -> Any:
    xp = p.xp
    cq = _codes(xp, p.q, r, b, width)  # (..., H, L, P)
    heads = xp.arange(p.heads, dtype=xp.int64, device=p.device) // p.group
    ck = xp.take(_codes(xp, p.k, r, b, width), heads, axis=-3)  # (..., H, S, P)
    same = None
    for j in range(int(r.shape[-1])):
        eq = xp.expand_dims(cq[..., j], axis=-1) == xp.expand_dims(ck[..., j], axis=-2)
        same = eq if same is None else same & eq
    return same


@typed_options()
def e2lsh_attention(q: Any, k: Any, v: Any, /, *, num_projections: int, bucket_width: float, projections: Any = None,
                    offsets: Any = None, seed: Any = None, causal: bool | str = False, scale: float | None = None,
                    return_lse: bool = False, compute_dtype: Any = None, implementation: str = "auto") -> Any:
    """E2LSH bucketed attention: each query attends the keys whose p-stable hash codes all equal its own.

    .. math::

        h_p(x) = \\Big\\lfloor \\frac{x \\cdot r_p + b_p}{w} \\Big\\rfloor, \\quad p = 1..P, \\qquad
        o_i = \\mathrm{softmax}_{j:\\, h(k_j) = h(q_i),\\ j \\le i + δ}(\\mathrm{scale}\\; q_i \\cdot k_j)\\, V

    ``r_p ~ N(0, I)`` (2-stable), ``b_p ~ U[0, w)``: given as ``projections (D, P)`` and
    ``offsets (P,)`` or drawn from ``seed`` with :mod:`reflex.random`. Queries and keys are hashed
    with the same functions; attention is exactly within equal-code buckets (no chunking, no
    sorting). A query whose bucket holds no key outputs 0 and lse −∞. The projection is summed over d
    in order with elementwise float64 operations, so codes are identical on every backend.

    Shapes: ``q (..., H, L, D)``, ``k (..., G, S, D)``, ``v (..., G, S, E)`` → ``(..., H, L, E)``.

    Args:
        num_projections: P. bucket_width: w > 0. causal: ``False``, ``True``/``"top_left"``,
            ``"bottom_right"``. scale: default 1/√D. return_lse, compute_dtype, implementation: as in
            :func:`reflex.full_attention`.

    A very wide bucket (all codes equal) is full attention.

    References: Datar, Immorlica, Indyk, Mirrokni 2004, "Locality-Sensitive Hashing Scheme Based on
    p-Stable Distributions", §3 (h(v) = ⌊(a·v + b)/r⌋); seed article "Advanced Attention Mechanisms
    for Long Sequence Transformers" §1 (sparse attention with LSH).
    """
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    r, b, width = _projections(p.xp, p.device, p.q.dtype, p.dim, num_projections, bucket_width, projections, offsets, seed)
    masks = [_same_bucket(p, r, b, width)]
    causal_masks, tile_active = mask_and_causal(p, None, causal)
    masks += causal_masks
    return _kernels.softmax_attention(p, scale=_kernels.resolve_scale(scale, p.dim), mask=masks, tile_active=tile_active,
                                      implementation=implementation, return_lse=return_lse)


def _pattern(q: Any, k: Any, v: Any, /, *, num_projections: int, bucket_width: float, projections: Any = None,
             offsets: Any = None, seed: Any = None, causal: bool | str = False, compute_dtype: Any = None,
             **_: Any) -> Any:
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    r, b, width = _projections(p.xp, p.device, p.q.dtype, p.dim, num_projections, bucket_width, projections, offsets, seed)
    same = _same_bucket(p, r, b, width)
    alignment = parse_causal(causal)
    if alignment is not None:
        same = same & explicit_mask(p.xp, p.device, p.score_shape, causal_pattern(alignment, p.length, p.key_length).allowed)
    return same


def _reference(q: Any, k: Any, v: Any, /, *, scale: Any = None, implementation: Any = None, compute_dtype: Any = None,
               **params: Any) -> Any:
    from reflex.mechanisms.full import full_attention

    return full_attention(q, k, v, mask=_pattern(q, k, v, compute_dtype=compute_dtype, **params), scale=scale,
                          compute_dtype=compute_dtype, implementation="dense")


def _cases(size: str, seed: int) -> list[Case]:
    d, gqa = standard(size, seed)
    explicit = {"projections": random.normal((d["D"], 2), seed=(seed, 5)),
                "offsets": random.uniform((2,), seed=(seed, 6), high=4.0)}
    return [
        Case("explicit", {**gqa, **explicit}, {"num_projections": 2, "bucket_width": 4.0}, seed=seed),
        Case("seed_causal", gqa, {"num_projections": 1, "bucket_width": 2.0, "seed": seed, "causal": True}, seed=seed),
        Case("wide", gqa, {"num_projections": 1, "bucket_width": 1e6, "seed": seed}, seed=seed),
    ]


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    """P = 2 hash functions of width w = √D (about the spread of q·r for N(0, I) inputs)."""
    width = float(dim) ** 0.5
    inputs = {**example_qkv(seq, heads, dim, seed),
              "projections": random.normal((dim, 2), seed=(seed, 3)),
              "offsets": random.uniform((2,), seed=(seed, 4), high=width)}
    return Case("example", inputs, {"num_projections": 2, "bucket_width": width}, seed=seed)


register(Mechanism(
    key="e2lsh",
    function=e2lsh_attention,
    family="C. content-sparse",
    paper="Datar et al. 2004 §3 (p-stable LSH); seed article 'Advanced Attention Mechanisms' §1",
    params={
        "num_projections": "P hash functions (a bucket = all P codes equal)",
        "bucket_width": "w",
        "projections": "(D, P) Gaussian projections r (with offsets), or seed",
        "offsets": "(P,) offsets b in [0, w)",
        "seed": "seed for r and b (reflex.random)",
        "causal": "False | True | 'top_left' | 'bottom_right'",
        "scale": "score scale, default 1/sqrt(D)",
    },
    cases=_cases,
    reference=_reference,
    returns_lse=True,
    pattern=_pattern,
    example=_example,
    vjp=_kernels.engine_vjp(e2lsh_attention, constants=("projections", "offsets")),
))

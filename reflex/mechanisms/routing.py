"""Routing Transformer attention: queries and keys routed to k-means clusters, attention within a cluster."""

from __future__ import annotations

from typing import Any

from reflex import random
from reflex.backends import device as device_of
from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import example_qkv, standard
from reflex.mechanisms._kmeans import initial_centroids, kmeans
from reflex.mechanisms._patterns import causal_pattern, explicit_mask, mask_and_causal, parse_causal, top_indices
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import typed_options
from reflex.mechanisms._numerics import vector_norm

__all__ = ["routing_attention", "routing_clusters", "routing_pattern"]


def _unit(xp: Any, x: Any) -> Any:
    norm = vector_norm(xp, x)
    return x / xp.where(norm > 0, norm, 1.0)


def _centroids(p: _kernels.Prepared, num_clusters: Any, centroids: Any, iterations: Any, seed: Any) -> Any:
    """Unit centroids ``(..., H, C, D)``: given (``(C, D)`` or ``(H, C, D)``), or spherical k-means."""
    xp = p.xp
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or num_clusters < 1:
        raise ValueError(f"num_clusters must be an int >= 1; got {num_clusters!r}")
    if centroids is not None:
        if seed is not None or iterations is not None:
            raise ValueError("pass either centroids= or (iterations=, seed=) for k-means, not both")
        shape = tuple(int(n) for n in centroids.shape)
        if shape not in ((num_clusters, p.dim), (p.heads, num_clusters, p.dim)):
            raise ValueError(f"centroids must have shape (C, D) = {(num_clusters, p.dim)} or (H, C, D) = "
                             f"{(p.heads, num_clusters, p.dim)}; got {shape}")
        return _unit(xp, _kernels.check_array(xp, p.device, p.q.dtype, "centroids", centroids))
    if seed is None or iterations is None:
        raise ValueError("pass centroids=, or iterations= and seed= to run k-means")
    keys = xp.take(_unit(xp, p.k), xp.arange(p.heads, dtype=xp.int64, device=p.device) // p.group, axis=-3)
    points = xp.concat([_unit(xp, p.q), keys], axis=-2)  # (..., H, L + S, D)
    return kmeans(points, init=initial_centroids(points, num_clusters, seed=seed), iterations=iterations, metric="cosine")


def _membership(xp: Any, x: Any, centroids: Any, window: int | None) -> Any:
    """Boolean ``(..., H, C, n)``: point n belongs to cluster c (nearest centroid, or top-w per cluster)."""
    sims = centroids @ xp.matrix_transpose(x)  # (..., H, C, n)
    clusters = xp.reshape(xp.arange(int(centroids.shape[-2]), dtype=xp.int64, device=device_of(x)), (-1, 1))
    if window is None:
        return xp.expand_dims(xp.argmax(sims, axis=-2), axis=-2) == clusters
    chosen = top_indices(xp, sims, window)  # (..., H, C, w)
    points = xp.arange(int(x.shape[-2]), dtype=xp.int64, device=device_of(x))
    member = xp.zeros(sims.shape, dtype=xp.bool, device=device_of(x))
    for slot in range(int(chosen.shape[-1])):
        member = member | (chosen[..., slot:slot + 1] == points)
    return member


def _routing(p: _kernels.Prepared, num_clusters: Any, centroids: Any, iterations: Any, seed: Any,
             window: Any) -> tuple[Any, Any]:
    xp = p.xp
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be None or an int >= 1 (members per cluster); got {window!r}")
    mu = _centroids(p, num_clusters, centroids, iterations, seed)
    keys = xp.take(_unit(xp, p.k), xp.arange(p.heads, dtype=xp.int64, device=p.device) // p.group, axis=-3)
    return _membership(xp, _unit(xp, p.q), mu, window), _membership(xp, keys, mu, window)


@typed_options()
def routing_clusters(q: Any, k: Any, /, *, num_clusters: int, centroids: Any = None, iterations: int | None = None,
                     seed: Any = None, window: int | None = None, compute_dtype: Any = None) -> tuple[Any, Any]:
    """Cluster membership of queries ``(..., H, C, L)`` and keys ``(..., H, C, S)`` (bool; keys per query head)."""
    p = _kernels.prepare(q, k, k, compute_dtype=compute_dtype)
    return _routing(p, num_clusters, centroids, iterations, seed, window)


def _allowed(p: _kernels.Prepared, member_q: Any, member_k: Any) -> Any:
    xp = p.xp
    shared = xp.matrix_transpose(xp.astype(member_q, p.q.dtype)) @ xp.astype(member_k, p.q.dtype)
    return shared > 0  # (..., H, L, S): some cluster holds both


@typed_options()
def routing_pattern(q: Any, k: Any, /, *, num_clusters: int, centroids: Any = None, iterations: int | None = None,
                    seed: Any = None, window: int | None = None, causal: bool | str = False,
                    compute_dtype: Any = None) -> Any:
    """Boolean ``(..., H, L, S)``: True where query i attends key j in :func:`routing_attention`."""
    p = _kernels.prepare(q, k, k, compute_dtype=compute_dtype)
    allowed = _allowed(p, *_routing(p, num_clusters, centroids, iterations, seed, window))
    alignment = parse_causal(causal)
    if alignment is not None:
        allowed = allowed & explicit_mask(p.xp, p.device, p.score_shape, causal_pattern(alignment, p.length, p.key_length).allowed)
    return allowed


@typed_options()
def routing_attention(q: Any, k: Any, v: Any, /, *, num_clusters: int, centroids: Any = None,
                      iterations: int | None = None, seed: Any = None, window: int | None = None,
                      causal: bool | str = False, scale: float | None = None, return_lse: bool = False,
                      compute_dtype: Any = None, implementation: str = "auto") -> Any:
    """Routing attention: softmax over the keys that share a cluster with the query.

    .. math::

        \\hat x = x / \\lVert x \\rVert, \\qquad c(x) = \\arg\\max_c\\, \\hat x \\cdot \\mu_c, \\qquad
        o_i = \\mathrm{softmax}_{j:\\, c(k_j) = c(q_i),\\ j \\le i + δ}(\\mathrm{scale}\\; q_i \\cdot k_j)\\, V

    Routing uses unit-normalised queries and keys against unit centroids μ (spherical k-means,
    Roy et al. 2021 §4.1); attention uses the raw q, k.

    - ``window=None``: each query and key joins its nearest centroid (ties → lower cluster index).
    - ``window=w``: balanced routing (§4.1): each cluster takes the w queries and the w keys most
      similar to its centroid (ties → lower position); query i attends every key that shares at
      least one cluster with it (once). A query in no cluster attends nothing: output 0, lse −∞.
    - ``centroids``: ``(C, D)`` or per head ``(H, C, D)``, normalised here; or ``iterations`` and
      ``seed``: spherical k-means (``reflex.mechanisms._kmeans``) per batch element and query head on
      the normalised queries and keys together, initialised at C distinct points drawn from ``seed``.

    Shapes: ``q (..., H, L, D)``, ``k (..., G, S, D)``, ``v (..., G, S, E)`` → ``(..., H, L, E)``;
    keys of kv head ``h // (H/G)`` are routed with query head h's centroids.

    Args:
        num_clusters: C. causal: ``False``, ``True``/``"top_left"``, ``"bottom_right"``.
        scale: default 1/√D. return_lse, compute_dtype, implementation: as in
            :func:`reflex.full_attention` (``"dense"``, ``"tiled"``, ``"auto"``).

    One cluster (C = 1, no window) is full attention. The pattern is :func:`routing_pattern`.

    References: Roy, Saffar, Vaswani, Grangier 2021, "Efficient Content-Based Sparse Attention with
    Routing Transformers", §4 (routing attention, eq. 11; k-means centroids, balanced top-k routing).
    """
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    masks = [_allowed(p, *_routing(p, num_clusters, centroids, iterations, seed, window))]
    causal_masks, tile_active = mask_and_causal(p, None, causal)
    masks += causal_masks
    return _kernels.softmax_attention(p, scale=_kernels.resolve_scale(scale, p.dim), mask=masks,
                                      tile_active=tile_active, implementation=implementation, return_lse=return_lse)


def _pattern(q: Any, k: Any, v: Any, /, *, scale: Any = None, implementation: Any = None, **params: Any) -> Any:
    return routing_pattern(q, k, **params)


def _reference(q: Any, k: Any, v: Any, /, *, scale: Any = None, implementation: Any = None,
               compute_dtype: Any = None, **params: Any) -> Any:
    from reflex.mechanisms.full import full_attention

    return full_attention(q, k, v, mask=routing_pattern(q, k, compute_dtype=compute_dtype, **params), scale=scale,
                          compute_dtype=compute_dtype, implementation="dense")


def _cases(size: str, seed: int) -> list[Case]:
    d, gqa = standard(size, seed)
    centroids = random.normal((d["H"], 3, d["D"]), seed=(seed, 5))
    return [
        Case("centroids", {**gqa, "centroids": centroids}, {"num_clusters": 3}, seed=seed),
        Case("kmeans_causal", gqa, {"num_clusters": 2, "iterations": 3, "seed": seed, "causal": True}, seed=seed),
        Case("balanced", {**gqa, "centroids": centroids}, {"num_clusters": 3, "window": 2}, seed=seed),
        Case("one_cluster", gqa, {"num_clusters": 1, "iterations": 1, "seed": seed}, seed=seed),
    ]


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    """C ≈ √seq clusters with explicit per-head centroids (H, C, D)."""
    clusters = max(1, round(seq ** 0.5))
    inputs = {**example_qkv(seq, heads, dim, seed), "centroids": random.normal((heads, clusters, dim), seed=(seed, 3))}
    return Case("example", inputs, {"num_clusters": clusters}, seed=seed)


register(Mechanism(
    key="routing",
    function=routing_attention,
    family="C. content-sparse",
    paper="Roy et al. 2021, Routing Transformer §4",
    params={
        "num_clusters": "C",
        "centroids": "(C, D) or (H, C, D) centroids, or k-means from (iterations, seed)",
        "iterations": "k-means iterations (with seed)",
        "seed": "k-means initialisation seed (reflex.random)",
        "window": "None (nearest centroid) or w: top-w balanced members per cluster",
        "causal": "False | True | 'top_left' | 'bottom_right'",
        "scale": "score scale, default 1/sqrt(D)",
    },
    cases=_cases,
    reference=_reference,
    returns_lse=True,
    row_separable=False,
    pattern=_pattern,
    example=_example,
    vjp=_kernels.engine_vjp(routing_attention, constants=("centroids",)),
))

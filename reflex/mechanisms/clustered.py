"""Clustered attention (Vyas et al. 2020): query prototypes attend; members copy or refine on top-k keys."""

from __future__ import annotations

from typing import Any

from reflex import random
from reflex.backends import device as device_of
from reflex.backends import namespace
from reflex.mechanisms import _kernels, _kmeans
from reflex.mechanisms._cases import dims, example_qkv, standard
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import typed_options

__all__ = ["clustered_attention", "improved_clustered_attention", "cluster_queries"]


def _check_count(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an int in [{low}, {high}]; got {value!r}")
    return int(value)


def cluster_queries(p: _kernels.Prepared, *, num_clusters: Any, assignment: Any, iterations: int, seed: Any) -> tuple[Any, int]:
    """The cluster of every query ``(..., H, L)`` int64 and the cluster count C.

    Either the caller's ``assignment`` (values in ``[0, C)``; C = ``num_clusters``, or max + 1), or
    Euclidean k-means of each head's queries (:mod:`reflex.mechanisms._kmeans`): ``iterations`` Lloyd
    steps from C distinct queries drawn with ``seed``, then each query's nearest final centroid.
    """
    xp = p.xp
    if assignment is not None:
        if seed is not None:
            raise ValueError("pass either assignment or seed (k-means), not both")
        if namespace(assignment) is not xp or device_of(assignment) != p.device:
            raise TypeError(f"assignment must come from the same array library and device as q ({p.device})")
        if not xp.isdtype(assignment.dtype, "integral"):
            raise TypeError(f"assignment must be an integer array of cluster ids; got dtype {assignment.dtype}")
        want = (*p.batch, p.heads, p.length)
        if tuple(int(n) for n in assignment.shape) != want:
            raise ValueError(f"assignment must have shape (..., H, L) = {want}; got {tuple(int(n) for n in assignment.shape)}")
        low, high = (int(xp.min(assignment)), int(xp.max(assignment))) if p.length else (0, -1)
        if num_clusters is not None and (isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or num_clusters < 1):
            raise ValueError(f"num_clusters must be an int >= 1; got {num_clusters!r}")
        count = max(1, high + 1) if num_clusters is None else int(num_clusters)
        if low < 0 or high >= count:
            raise ValueError(f"assignment values must lie in [0, {count}); got values in [{low}, {high}]")
        return xp.astype(assignment, xp.int64), count
    if seed is None or num_clusters is None:
        raise ValueError("pass an assignment (..., H, L), or num_clusters and a seed for k-means (no hidden randomness)")
    count = _check_count("num_clusters", num_clusters, 1, p.length)
    init = _kmeans.initial_centroids(p.q, count, seed=seed)
    centroids = _kmeans.kmeans(p.q, init=init, iterations=iterations)
    return _kmeans.assign(p.q, centroids), count


def _centroids(p: _kernels.Prepared, assignment: Any, count: int) -> Any:
    """Mean query of each cluster ``(..., H, C, D)`` (an empty cluster gets 0; nobody reads it)."""
    xp = p.xp
    onehot = xp.astype(assignment[..., None] == xp.arange(count, dtype=xp.int64, device=p.device), p.q.dtype)
    counts = xp.sum(onehot, axis=-2)[..., None]
    return (xp.matrix_transpose(onehot) @ p.q) / xp.where(counts > 0, counts, 1.0)


def _rows_of_cluster(xp: Any, per_cluster: Any, assignment: Any) -> Any:
    """``per_cluster (..., H, C, F)`` read at each query's cluster → ``(..., H, L, F)``."""
    idx = xp.broadcast_to(assignment[..., None], (*assignment.shape, int(per_cluster.shape[-1])))
    return xp.take_along_axis(per_cluster, idx, axis=-2)


@typed_options()
def clustered_attention(q: Any, k: Any, v: Any, /, *, num_clusters: int | None = None, assignment: Any = None,
                        iterations: int = 10, seed: Any = None, scale: float | None = None, compute_dtype: Any = None,
                        implementation: str = "auto") -> Any:
    """Clustered attention: each cluster's centroid query attends all keys; its members copy the output.

    .. math::

        q^c_j = \\frac{1}{|C_j|}\\sum_{i \\in C_j} q_i,\\qquad
        o_i = \\mathrm{softmax}(\\mathrm{scale}\\cdot q^c_{c(i)} K^\\top)\\, V

    (Vyas et al. 2020, "Fast Transformers with Clustered Attention", §3.2 eq. 5–6).

    Shapes: ``q (..., H, L, D)``, ``k (..., G, S, D)``, ``v (..., G, S, E)`` → ``(..., H, L, E)``;
    queries are clustered per (batch, head).

    Args:
        assignment: ``(..., H, L)`` int cluster ids in ``[0, C)``; or
        num_clusters, iterations, seed: C clusters by Euclidean k-means (Lloyd, ``iterations`` steps)
            of the queries, initialised with C distinct queries drawn from ``seed``
            (:func:`cluster_queries`). The paper clusters Hamming codes of LSH hashes of the queries
            with k-means; the assignment argument accepts any clustering.
        scale: default 1/√D. implementation: engine kernel for the centroids' softmax.

    With one query per cluster (C = L, ``assignment = arange(L)``) the result is ``full_attention``.
    """
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    xp = p.xp
    labels, count = cluster_queries(p, num_clusters=num_clusters, assignment=assignment, iterations=iterations, seed=seed)
    centroid_out = _kernels.softmax_attention(_kernels.prepare(_centroids(p, labels, count), p.k, p.v, compute_dtype=p.q.dtype),
                                              scale=_kernels.resolve_scale(scale, p.dim), implementation=implementation)
    return _rows_of_cluster(xp, centroid_out, labels)


@typed_options()
def improved_clustered_attention(q: Any, k: Any, v: Any, /, *, topk: int, num_clusters: int | None = None,
                                 assignment: Any = None, iterations: int = 10, seed: Any = None,
                                 scale: float | None = None, compute_dtype: Any = None) -> Any:
    """Improved clustered attention: centroid attention, with each query's exact softmax on its cluster's top-k keys.

    .. math::

        A_{il} = \\begin{cases}
            \\hat m_{c(i)}\\, \\dfrac{e^{s\\, q_i\\cdot k_l}}{\\sum_{r \\in T_{c(i)}} e^{s\\, q_i\\cdot k_r}} & l \\in T_{c(i)}\\\\
            A^c_{c(i) l} & \\text{otherwise}
        \\end{cases},\\qquad \\hat m_j = \\sum_{l \\in T_j} A^c_{jl},\\qquad o_i = \\sum_l A_{il} v_l

    where ``A^c = softmax(s·Q^c Kᵀ)`` is the centroids' attention and ``T_j`` the ``topk`` keys with
    the largest centroid scores (ties → lower key index) (Vyas et al. 2020, §3.3 eq. 9–10).

    Shapes and clustering arguments as :func:`clustered_attention`. ``topk`` ∈ [1, S]. With
    ``topk = S`` every query gets its exact softmax: ``full_attention`` (up to round-off).

    Softmaxes run on the engine: the centroid weights ``A^c`` by
    :func:`reflex.mechanisms._kernels.weights`, the queries' top-k softmax by
    :func:`reflex.mechanisms._kernels.gather`. Memory O(C·S + L·topk) per head.
    """
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    xp = p.xp
    topk = _check_count("topk", topk, 1, max(1, p.key_length))
    labels, count = cluster_queries(p, num_clusters=num_clusters, assignment=assignment, iterations=iterations, seed=seed)
    s = _kernels.resolve_scale(scale, p.dim)
    centroid = _kernels.prepare(_centroids(p, labels, count), p.k, p.v, compute_dtype=p.q.dtype)
    order = xp.argsort(-_kernels.scores(centroid, scale=s), axis=-1, stable=True)  # (..., H, C, S), best first
    chosen = order[..., :topk]
    in_top = xp.argsort(order, axis=-1, stable=True) < topk  # rank of each key < topk
    weights = _kernels.weights(centroid, scale=s)  # A^c (..., H, C, S)
    top_mass = xp.sum(xp.where(in_top, weights, 0.0), axis=-1, keepdims=True)  # m̂ (..., H, C, 1)
    rest = xp.where(in_top, 0.0, weights)
    grouped_rest = xp.reshape(rest, (*p.batch, p.kv_heads, p.group, count, p.key_length)) @ xp.expand_dims(p.v, axis=-3)
    rest_out = xp.reshape(grouped_rest, (*p.batch, p.heads, count, p.value_dim))  # Σ_{l∉T} A^c_l v_l
    exact, _ = _kernels.gather(p, _rows_of_cluster(xp, chosen, labels), scale=s)
    return _rows_of_cluster(xp, top_mass, labels) * exact + _rows_of_cluster(xp, rest_out, labels)


def _cluster_sums(p: _kernels.Prepared, labels: Any, count: int, rows: Any) -> Any:
    """``Σ_{i ∈ cluster c} rows_i`` for ``rows (..., H, L, F)`` → ``(..., H, C, F)`` (adjoint of :func:`_rows_of_cluster`)."""
    xp = p.xp
    onehot = xp.astype(labels[..., None] == xp.arange(count, dtype=xp.int64, device=p.device), p.q.dtype)
    return xp.matrix_transpose(onehot) @ rows


def _centroids_vjp(p: _kernels.Prepared, labels: Any, count: int, d_centroids: Any) -> Any:
    """``dq_i = d q^c_{c(i)} / |C_{c(i)}|`` (adjoint of :func:`_centroids`)."""
    xp = p.xp
    onehot = xp.astype(labels[..., None] == xp.arange(count, dtype=xp.int64, device=p.device), p.q.dtype)
    counts = xp.sum(onehot, axis=-2)[..., None]
    return _rows_of_cluster(xp, d_centroids / xp.where(counts > 0, counts, 1.0), labels)


def _clustered_vjp(inputs: dict, d_out: Any, *, d_lse: Any = None, num_clusters: int | None = None,
                   iterations: int = 10, seed: Any = None, scale: float | None = None, compute_dtype: Any = None,
                   implementation: str = "auto") -> dict:
    """VJP of :func:`clustered_attention`: ``{"q": dq, "k": dk, "v": dv}``; the cluster assignment
    (given, or k-means of the queries) is a constant.

    ``d o^c_j = Σ_{i ∈ C_j} dO_i``; the engine's backward (dense, or tiled: FlashAttention-2 Alg. 2) on
    ``(Q^c, K, V)`` gives ``dQ^c``, ``dK``, ``dV``; the centroid mean gives ``dq_i = dq^c_{c(i)}/|C_{c(i)}|``.
    """
    from reflex.mechanisms import _grad

    p = _kernels.prepare(inputs["q"], inputs["k"], inputs["v"], compute_dtype=compute_dtype)
    labels, count = cluster_queries(p, num_clusters=num_clusters, assignment=inputs.get("assignment"),
                                    iterations=iterations, seed=seed)
    d_o = p.xp.astype(d_out, p.q.dtype)
    g = _grad.softmax_attention_vjp(_kernels.prepare(_centroids(p, labels, count), p.k, p.v, compute_dtype=p.q.dtype),
                                    _cluster_sums(p, labels, count, d_o), scale=_kernels.resolve_scale(scale, p.dim),
                                    implementation=implementation)
    return {"q": _centroids_vjp(p, labels, count, g.dq), "k": g.dk, "v": g.dv}


def _improved_clustered_vjp(inputs: dict, d_out: Any, *, d_lse: Any = None, topk: int, num_clusters: int | None = None,
                            iterations: int = 10, seed: Any = None, scale: float | None = None,
                            compute_dtype: Any = None) -> dict:
    """VJP of :func:`improved_clustered_attention`: ``{"q": dq, "k": dk, "v": dv}``; the assignment and the
    top-k key sets ``T_j`` are constants (the forward's selection, ties to the lower index).

    With ``o_i = m̂_c e_i + r_c`` (c = c(i); ``e_i`` the query's exact softmax on ``T_c``, ``r_c = Σ_{l∉T_c}
    A^c_{cl} v_l``): ``d e_i = m̂_c dO_i`` through the engine's gather backward (dq, dk, dv);
    ``d m̂_c = Σ_{i∈C_c} ⟨dO_i, e_i⟩``, ``d r_c = Σ_{i∈C_c} dO_i``; ``dA^c_{cl} = d m̂_c`` (l ∈ T_c) or
    ``⟨d r_c, v_l⟩`` (l ∉ T_c), ``dV += A^cᵀ d r`` off the top-k; ``dZ^c = A^c ∘ (dA^c − rowsum(A^c ∘ dA^c))``,
    ``dQ^c = s dZ^c K``, ``dK += s dZ^cᵀ Q^c``; then ``dq_i += dq^c_{c(i)}/|C_{c(i)}|``.
    """
    from reflex.mechanisms import _grad

    p = _kernels.prepare(inputs["q"], inputs["k"], inputs["v"], compute_dtype=compute_dtype)
    xp = p.xp
    topk = _check_count("topk", topk, 1, max(1, p.key_length))
    labels, count = cluster_queries(p, num_clusters=num_clusters, assignment=inputs.get("assignment"),
                                    iterations=iterations, seed=seed)
    s = _kernels.resolve_scale(scale, p.dim)
    q_c = _centroids(p, labels, count)
    centroid = _kernels.prepare(q_c, p.k, p.v, compute_dtype=p.q.dtype)
    order = xp.argsort(-_kernels.scores(centroid, scale=s), axis=-1, stable=True)
    chosen = order[..., :topk]
    in_top = xp.argsort(order, axis=-1, stable=True) < topk
    weights = _kernels.weights(centroid, scale=s)
    top_mass = xp.sum(xp.where(in_top, weights, 0.0), axis=-1, keepdims=True)
    indices = _rows_of_cluster(xp, chosen, labels)
    exact, lse = _kernels.gather(p, indices, scale=s)
    d_o = xp.astype(d_out, p.q.dtype)
    g = _kernels.gather_backward(p, indices, exact, lse, _rows_of_cluster(xp, top_mass, labels) * d_o, scale=s)
    d_mass = _cluster_sums(p, labels, count, xp.sum(d_o * exact, axis=-1, keepdims=True))  # (..., H, C, 1)
    d_rest = _grad.group_queries(p, _cluster_sums(p, labels, count, d_o))  # (..., G, H/G, C, E)
    v = xp.expand_dims(p.v, axis=-3)
    d_weights = xp.where(in_top, d_mass, _grad.ungroup(p, d_rest @ xp.matrix_transpose(v)))
    rest = _grad.group_queries(p, xp.where(in_top, 0.0, weights))
    d_z = _grad.group_queries(p, _grad.softmax_vjp(xp, weights, d_weights))
    k = xp.expand_dims(p.k, axis=-3)
    d_qc = _grad.ungroup(p, s * (d_z @ k))
    d_k = g.dk + s * xp.sum(xp.matrix_transpose(d_z) @ _grad.group_queries(p, q_c), axis=-3)
    d_v = g.dv + xp.sum(xp.matrix_transpose(rest) @ d_rest, axis=-3)
    return {"q": g.dq + _centroids_vjp(p, labels, count, d_qc), "k": d_k, "v": d_v}


def _cases(size: str, seed: int) -> list[Case]:
    d, gqa = standard(size, seed)
    count = max(1, d["L"] // 2)
    assignment = random.integers((2, d["H"], d["L"]), seed=(seed, 5), low=0, high=count)
    return [
        Case("assignment", {**gqa, "assignment": assignment}, {"num_clusters": count}, seed=seed),
        Case("kmeans", gqa, {"num_clusters": count, "iterations": 3, "seed": seed}, seed=seed),
    ]


def _improved_cases(size: str, seed: int) -> list[Case]:
    d = dims(size)
    top = max(1, d["S"] // 3)
    return [Case(c.variant, c.inputs, {**c.params, "topk": top}, seed=seed) for c in _cases(size, seed)]


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    return Case("example", example_qkv(seq, heads, dim, seed), {"num_clusters": min(100, seq), "seed": seed}, seed=seed)


def _improved_example(seq: int, heads: int, dim: int, seed: int) -> Case:
    case = _example(seq, heads, dim, seed)
    return Case("example", case.inputs, {**case.params, "topk": min(32, seq)}, seed=seed)


register(Mechanism(
    key="clustered",
    function=clustered_attention,
    family="E. query prototypes",
    paper="Vyas et al. 2020, 'Fast Transformers with Clustered Attention', §3.2",
    params={
        "num_clusters": "C (with seed: k-means; with assignment: default max id + 1)",
        "assignment": "(..., H, L) int cluster ids, explicit",
        "iterations": "Lloyd steps of k-means (default 10)",
        "seed": "draws the k-means initial centroids (distinct queries)",
        "scale": "score scale, default 1/sqrt(D)",
    },
    cases=_cases,
    row_separable=False,
    example=_example,
    vjp=_clustered_vjp,
))

register(Mechanism(
    key="improved_clustered",
    function=improved_clustered_attention,
    family="E. query prototypes",
    paper="Vyas et al. 2020, 'Fast Transformers with Clustered Attention', §3.3",
    params={
        "topk": "keys per cluster recomputed exactly (top centroid scores, ties -> lower index)",
        "num_clusters": "C (with seed: k-means; with assignment: default max id + 1)",
        "assignment": "(..., H, L) int cluster ids, explicit",
        "iterations": "Lloyd steps of k-means (default 10)",
        "seed": "draws the k-means initial centroids",
        "scale": "score scale, default 1/sqrt(D)",
    },
    cases=_improved_cases,
    row_separable=False,
    example=_improved_example,
    vjp=_improved_clustered_vjp,
))

"""Backward pieces the formula mechanisms share: softmax and division VJPs, the VJP of a masked
attention map times V, the engine's backward for a derived problem (pooled, projected, compressed
q/k/v), GQA group sums, and the reverse mode of the kernelised core
(:func:`reflex.mechanisms.linear._kernelized`).

Every function works on compute-dtype arrays of one namespace; none allocates an ``(L, S)`` array
unless its inputs already are one. Notation: a cotangent ``dX`` is ``∂ℓ/∂X`` of the scalar
``ℓ = ⟨d_out, out⟩`` being differentiated.
"""

from __future__ import annotations

import math

from typing import Any, Callable

from reflex.mechanisms import _kernels
from reflex.mechanisms._numerics import unbroadcast

# normalise_vjp(num (..., l, E), den (..., l, 1), d_out (..., l, E)) -> (d_num, d_den)
NormaliseVJP = Callable[[Any, Any, Any], tuple[Any, Any]]


def softmax(xp: Any, scores: Any, axis: int = -1, mask: Any = None) -> Any:
    """Max-shifted softmax along ``axis`` (the maps a formula VJP re-materialises); ``mask`` False →
    weight 0, and a row with nothing unmasked is all 0 (never NaN)."""
    if mask is not None:
        scores = xp.where(mask, scores, -math.inf)
    top = xp.max(scores, axis=axis, keepdims=True)
    e = xp.exp(scores - xp.where(top == -math.inf, 0.0, top))
    total = xp.sum(e, axis=axis, keepdims=True)
    return e / xp.where(total == 0, 1.0, total)


def softmax_vjp(xp: Any, prob: Any, d_prob: Any, axis: int = -1) -> Any:
    """``dS = P ∘ (dP − Σ_axis P ∘ dP)`` for ``P = softmax(S)`` along ``axis`` (a zero row of P — a
    fully masked row — gives a zero row)."""
    return prob * (d_prob - xp.sum(prob * d_prob, axis=axis, keepdims=True))


def attention_map_vjp(p: _kernels.Prepared, prob: Any, d_out: Any, d_lse: Any = None) -> tuple[Any, Any]:
    """VJP of ``O = P V`` with ``P = softmax(Z)`` a masked probability map (``_kernels.weights``).

    ``prob (..., H, L, S)`` (a fully masked row all 0), values ``p.v (..., G, S, E)``, ``d_out
    (..., H, L, E)``, ``d_lse (..., H, L)`` or None. Returns ``dZ (..., H, L, S)`` and ``dV (..., G, S, E)``:
    ``dP = dO Vᵀ``, ``dZ = P ∘ (dP − rowsum(P ∘ dP) + dL)`` (∂lse_i/∂Z_ij = P_ij), ``dV = Σ_group Pᵀ dO``.
    Masked entries and fully masked rows get 0 (P is 0 there).
    """
    xp = p.xp
    prob_g = group_queries(p, prob)
    d_o = group_queries(p, xp.astype(d_out, p.q.dtype))
    v = xp.expand_dims(p.v, axis=-3)
    d_z = softmax_vjp(xp, prob_g, d_o @ xp.matrix_transpose(v))
    if d_lse is not None:
        d_z = d_z + prob_g * group_queries(p, xp.astype(d_lse, p.q.dtype)[..., None])
    d_v = xp.sum(xp.matrix_transpose(prob_g) @ d_o, axis=-3)
    return ungroup(p, d_z), d_v


def softmax_attention_vjp(p: _kernels.Prepared, d_out: Any, d_lse: Any = None, *, scale: float, mask: Any = None,
                          bias: Any = None, softcap: float | None = None, tile_active: Any = None,
                          implementation: str = "auto") -> Any:
    """The engine's backward of ``_kernels.softmax_attention(p, ...)`` (a mechanism that runs the engine on
    derived q, k, v): re-runs the forward kernel ``implementation`` picks (dense, or tiled: FA2 Alg. 2,
    never ``L × S``) and returns its :class:`~reflex.mechanisms._engine.terms.Gradients` (``dq``, ``dk``,
    ``dv`` of the derived problem, ``bias`` per bias term)."""
    if implementation == "auto":
        implementation = _kernels.choose_implementation(p.length, p.key_length)
    options = dict(scale=scale, mask=mask, bias=bias, softcap=softcap)
    if implementation == "dense":
        out, lse = _kernels.dense(p, **options)
        return _kernels.dense_backward(p, out, lse, d_out, d_lse, **options)
    out, lse = _kernels.tiled(p, **options, tile_active=tile_active)
    return _kernels.tiled_backward(p, out, lse, d_out, d_lse, **options, tile_active=tile_active)


def sum_to_matrix(xp: Any, x: Any) -> Any:
    """Sum a ``(..., m, n)`` array over its leading axes: the gradient of a shared ``(m, n)`` parameter."""
    return xp.sum(x, axis=tuple(range(x.ndim - 2))) if x.ndim > 2 else x


def divide_vjp(xp: Any, *, eps: float = 0.0, floor: float | None = None) -> NormaliseVJP:
    """VJP of the kernel normalisers ``num / (den + eps)`` (0 where ``den + eps == 0``) or, with
    ``floor``, ``num / max(den, floor)`` (the clamp's branch: no gradient into ``den`` where
    ``den ≤ floor``).

    ``d_num = d_out / den'``, ``d_den = −⟨d_out, num⟩ / den'²`` with ``den'`` the divisor used.
    """
    def vjp(num: Any, den: Any, d_out: Any) -> tuple[Any, Any]:
        if floor is not None:
            live = den > floor
            divisor = xp.where(live, den, floor)
        else:
            divisor = den + eps
            live = divisor != 0
            divisor = xp.where(live, divisor, 1.0)
        d_num = xp.where(live, d_out / divisor, 0.0)
        d_den = xp.where(live, -xp.sum(d_out * num, axis=-1, keepdims=True) / (divisor * divisor), 0.0)
        return d_num, d_den
    return vjp


def ungroup(p: _kernels.Prepared, d_grouped: Any) -> Any:
    """``(..., G, H/G, L, X)`` → ``(..., H, L, X)``: a query-side gradient in q's head layout."""
    return p.xp.reshape(d_grouped, (*p.batch, p.heads, *d_grouped.shape[-2:]))


def group_queries(p: _kernels.Prepared, x: Any) -> Any:
    """``(..., H, L, X)`` → ``(..., G, H/G, L, X)``, query heads grouped by the kv head they read."""
    return p.xp.reshape(x, (*p.batch, p.kv_heads, p.group, *x.shape[-2:]))


# --- the kernelised core ------------------------------------------------------------------------

def _reverse_scan(xp: Any, decay: Any, state: Any, norm: Any) -> tuple[Any, Any, Any]:
    """The scan of :func:`reflex.mechanisms.linear._scan` run from the last step to the first."""
    from reflex.mechanisms.linear import _scan

    prod, state, norm = _scan(xp, xp.flip(decay, axis=-1), xp.flip(state, axis=-3), xp.flip(norm, axis=-2))
    return xp.flip(prod, axis=-1), xp.flip(state, axis=-3), xp.flip(norm, axis=-2)


def kernelized_vjp(p: _kernels.Prepared, fq: Any, fk: Any, normalise_vjp: NormaliseVJP, d_out: Any, *,
                   offset: int | None, form: str, gate: Any = None,
                   block: int | None = None) -> tuple[Any, Any, Any, Any]:
    """Reverse mode of the kernelised core: ``(d_fq, d_fk, d_v, d_gate)``.

    ``fq (..., G, H/G, L, F)`` and ``fk (..., G, 1, S, F)`` are the features, ``d_out (..., H, L, E)``.
    Returns ``d_fq`` like ``fq``, ``d_fk (..., G, 1, S, F)``, ``d_v (..., G, S, E)`` and
    ``d_gate (..., G, S)`` (None without a gate).

    With ``S_t = g_t S_{t−1} + (1 − g_t) φ(k_t) v_tᵀ`` (``g = 1`` and no ``(1 − g)`` factor ungated;
    ``z_t`` likewise with ``φ(k_t)``), ``num_i = φ(q_i)ᵀ S_{t_i}``, ``den_i = φ(q_i)ᵀ z_{t_i}``:

    - ``(d num_i, d den_i)`` from ``normalise_vjp``; ``dφ(q_i) = S_{t_i} d num_i + z_{t_i} d den_i``;
    - the state adjoint ``Λ_t = Σ_{i: t_i = t} φ(q_i) d num_iᵀ + g_{t+1} Λ_{t+1}`` (λ_t likewise with
      ``d den_i``): reversed prefix sums (ungated) or a reversed scan (gated), over key blocks from the
      last to the first, never an ``(L, S)`` array;
    - ``dφ(k_t) = (1 − g_t)(Λ_t v_t + λ_t)``, ``dv_t = (1 − g_t) Λ_tᵀ φ(k_t)``,
      ``dg_t = ⟨Λ_t, S_{t−1} − φ(k_t)v_tᵀ⟩ + ⟨λ_t, z_{t−1} − φ(k_t)⟩``.

    ``form == "recurrent"`` runs it one key at a time (back-propagation through the RNN); the other
    forms use key blocks of the forward's size (the gated block states are recomputed from the
    stored block-start states, so memory stays O((S/block + block)·F·E) per head).
    """
    xp = p.xp
    L, S, E = p.length, p.key_length, p.value_dim
    dt, dev = p.q.dtype, p.device
    F = int(fq.shape[-1])
    v = xp.expand_dims(p.v, axis=-3)  # (..., G, 1, S, E)
    d_o = group_queries(p, xp.astype(d_out, dt))
    zeros_fq = xp.zeros(fq.shape, dtype=dt, device=dev)
    d_gate = None if gate is None else xp.zeros((*p.batch, p.kv_heads, S), dtype=dt, device=dev)
    if L == 0 or S == 0:
        return zeros_fq, xp.zeros(fk.shape, dtype=dt, device=dev), xp.zeros(p.v.shape, dtype=dt, device=dev), d_gate

    def read(fq_rows: Any, state_rows: Any, norm_rows: Any, d_rows: Any) -> tuple[Any, Any, Any]:
        """``(d_fq, d_num, d_den)`` of query rows against per-row states ``(..., l, F, E)``, ``(..., l, F)``."""
        num = (fq_rows[..., :, None, :] @ state_rows)[..., 0, :]
        den = xp.sum(fq_rows * norm_rows, axis=-1, keepdims=True)
        d_num, d_den = normalise_vjp(num, den, d_rows)
        d_fq = (state_rows @ d_num[..., :, :, None])[..., 0] + d_den * norm_rows
        return d_fq, d_num, d_den

    def outer_sum(fq_rows: Any, d_num: Any, d_den: Any) -> tuple[Any, Any]:
        """``Σ_group φ(q_i) d num_iᵀ`` per row ``(..., G, 1, l, F, E)`` and ``Σ_group φ(q_i) d den_i``."""
        ds = xp.sum(fq_rows[..., :, :, None] * d_num[..., :, None, :], axis=-4, keepdims=True)
        return ds, xp.sum(fq_rows * d_den, axis=-3, keepdims=True)

    if offset is None:  # every query reads the final state: plain matrix products
        state = xp.matrix_transpose(fk) @ v  # (..., G, 1, F, E)
        norm = xp.sum(fk, axis=-2)[..., :, None]  # (..., G, 1, F, 1)
        d_num, d_den = normalise_vjp(fq @ state, fq @ norm, d_o)
        d_fq = d_num @ xp.matrix_transpose(state) + d_den * xp.matrix_transpose(norm)
        big = xp.sum(xp.matrix_transpose(fq) @ d_num, axis=-3, keepdims=True)  # (..., G, 1, F, E)
        small = xp.sum(xp.matrix_transpose(fq) @ d_den, axis=-3, keepdims=True)  # (..., G, 1, F, 1)
        d_fk = v @ xp.matrix_transpose(big) + xp.matrix_transpose(small)
        return d_fq, d_fk, (fk @ big)[..., 0, :, :], d_gate

    if form == "recurrent":
        block = 1
    elif block is None:
        block = max(16, min(1024, (1 << 20) // max(1, F * E)))
    first = min(L, max(0, -offset))
    last = max(first, min(L, S - offset))

    def block_prefix(j0: int, j1: int, state: Any, norm: Any) -> tuple[Any, Any]:
        """States ``S_t``, ``z_t`` for t in ``[j0, j1)`` from the state before ``j0`` (as the forward)."""
        f, vk = fk[..., j0:j1, :], v[..., j0:j1, :]
        outer = f[..., :, :, None] * vk[..., :, None, :]
        if gate is None:
            return state[..., None, :, :] + xp.cumulative_sum(outer, axis=-3), norm[..., None, :] + xp.cumulative_sum(f, axis=-2)
        from reflex.mechanisms.linear import _scan

        g = gate[..., j0:j1]
        decay, prefix, prefix_norm = _scan(xp, g, (1.0 - g)[..., None, None] * outer, (1.0 - g)[..., None] * f)
        return decay[..., None, None] * state[..., None, :, :] + prefix, decay[..., None] * norm[..., None, :] + prefix_norm

    # Pass 1, first key block to last: the states each query reads, dφ(q), d num, d den.
    state = xp.zeros((*p.batch, p.kv_heads, 1, F, E), dtype=dt, device=dev)
    norm = xp.zeros((*p.batch, p.kv_heads, 1, F), dtype=dt, device=dev)
    starts: list[tuple[Any, Any]] = []
    d_fq_parts = [zeros_fq[..., :first, :]]
    d_num_parts = [xp.zeros((*d_o.shape[:-2], first, E), dtype=dt, device=dev)]
    d_den_parts = [xp.zeros((*d_o.shape[:-2], first, 1), dtype=dt, device=dev)]
    for j0 in range(0, S, block):
        j1 = min(j0 + block, S)
        if gate is not None:
            starts.append((state, norm))
        prefix, prefix_norm = block_prefix(j0, j1, state, norm)
        i0, i1 = max(first, j0 - offset), min(last, j1 - offset)
        if i1 > i0:
            r0 = i0 + offset - j0
            parts = read(fq[..., i0:i1, :], prefix[..., r0:r0 + i1 - i0, :, :], prefix_norm[..., r0:r0 + i1 - i0, :],
                         d_o[..., i0:i1, :])
            for bucket, part in zip((d_fq_parts, d_num_parts, d_den_parts), parts):
                bucket.append(part)
        state, norm = prefix[..., -1, :, :], prefix_norm[..., -1, :]
    if last < L:  # queries that read the final state
        parts = read(fq[..., last:, :], state[..., None, :, :], norm[..., None, :], d_o[..., last:, :])
        for bucket, part in zip((d_fq_parts, d_num_parts, d_den_parts), parts):
            bucket.append(part)
    d_fq = xp.concat(d_fq_parts, axis=-2)
    d_num, d_den = xp.concat(d_num_parts, axis=-2), xp.concat(d_den_parts, axis=-2)

    # Pass 2, last key block to first: the adjoints Λ, λ and the key-side gradients.
    carry = xp.sum(xp.matrix_transpose(fq[..., last:, :]) @ d_num[..., last:, :], axis=-3, keepdims=True)
    carry_norm = xp.sum(xp.matrix_transpose(fq[..., last:, :]) @ d_den[..., last:, :], axis=-3, keepdims=True)[..., 0]
    d_fk_parts, d_v_parts, d_gate_parts = [], [], []
    for j0 in reversed(range(0, S, block)):
        j1 = min(j0 + block, S)
        c = j1 - j0
        ds = xp.zeros((*p.batch, p.kv_heads, 1, c, F, E), dtype=dt, device=dev)
        dz = xp.zeros((*p.batch, p.kv_heads, 1, c, F), dtype=dt, device=dev)
        i0, i1 = max(first, j0 - offset), min(last, j1 - offset)
        if i1 > i0:
            r0 = i0 + offset - j0
            rows_ds, rows_dz = outer_sum(fq[..., i0:i1, :], d_num[..., i0:i1, :], d_den[..., i0:i1, :])
            ds = xp.concat([ds[..., :r0, :, :], rows_ds, ds[..., r0 + i1 - i0:, :, :]], axis=-3)
            dz = xp.concat([dz[..., :r0, :], rows_dz, dz[..., r0 + i1 - i0:, :]], axis=-2)
        # the carry enters the block's last step unscaled: Λ_{j1−1} = dS_{j1−1} + carry
        ds = xp.concat([ds[..., :-1, :, :], ds[..., -1:, :, :] + carry[..., None, :, :]], axis=-3)
        dz = xp.concat([dz[..., :-1, :], dz[..., -1:, :] + carry_norm[..., None, :]], axis=-2)
        f, vk = fk[..., j0:j1, :], v[..., j0:j1, :]
        if gate is None:
            adj = xp.flip(xp.cumulative_sum(xp.flip(ds, axis=-3), axis=-3), axis=-3)
            adj_norm = xp.flip(xp.cumulative_sum(xp.flip(dz, axis=-2), axis=-2), axis=-2)
            weight = 1.0
        else:
            g = gate[..., j0:j1]
            # Λ_t = dS_t + g_{t+1} Λ_{t+1} inside the block: reversed scan with factors g_{t+1}
            factors = xp.concat([g[..., 1:], xp.ones((*g.shape[:-1], 1), dtype=dt, device=dev)], axis=-1)
            _, adj, adj_norm = _reverse_scan(xp, factors, ds, dz)
            prefix, prefix_norm = block_prefix(j0, j1, *starts[j0 // block])
            before = xp.concat([starts[j0 // block][0][..., None, :, :], prefix[..., :-1, :, :]], axis=-3)
            before_norm = xp.concat([starts[j0 // block][1][..., None, :], prefix_norm[..., :-1, :]], axis=-2)
            kv = f[..., :, :, None] * vk[..., :, None, :]
            dg = xp.sum(adj * (before - kv), axis=(-2, -1)) + xp.sum(adj_norm * (before_norm - f), axis=-1)
            d_gate_parts.append(dg[..., 0, :])
            weight = (1.0 - g)[..., None]
        d_fk_parts.append(weight * ((adj @ vk[..., :, :, None])[..., 0] + adj_norm))
        d_v_parts.append(weight * (f[..., :, None, :] @ adj)[..., 0, :])
        carry, carry_norm = adj[..., 0, :, :], adj_norm[..., 0, :]
        if gate is not None:
            carry, carry_norm = gate[..., j0:j0 + 1, None] * carry, gate[..., j0:j0 + 1] * carry_norm
    d_fk = xp.concat(d_fk_parts[::-1], axis=-2)
    d_v = xp.concat(d_v_parts[::-1], axis=-2)[..., 0, :, :]
    if gate is not None:
        d_gate = xp.concat(d_gate_parts[::-1], axis=-1)
    return d_fq, d_fk, d_v, d_gate

"""Linear (kernelised) attention, and the factorised core the kernel family (D) shares.

Every mechanism of catalogue section D is, for a feature map φ,

.. math::

    o_i = \\frac{\\sum_{j \\le t_i} w_{ij}\\, \\phi(q_i)\\cdot\\phi(k_j)\\; v_j}
               {\\sum_{j \\le t_i} w_{ij}\\, \\phi(q_i)\\cdot\\phi(k_j)}

with ``t_i = S − 1`` (non-causal) or ``t_i = i + δ`` (causal, δ from the alignment), and
``w_ij = 1`` except for RFA's recency gate. :func:`_kernelized` evaluates it three ways:

- ``"parallel"``: the factorised form. Non-causal: ``φ(Q)(φ(K)ᵀV)`` with the state summed over key
  blocks. Causal: prefix sums ``S_t = Σ_{j≤t} φ(k_j) v_jᵀ`` (``cumulative_sum`` inside a key block,
  plus the carried state of earlier blocks; a gated sum is a Hillis–Steele scan). Memory
  O(block·F·E), linear in L.
- ``"recurrent"``: the RNN form, one key at a time: ``S_t = g_t S_{t−1} + (1 − g_t) φ(k_t) v_tᵀ``
  (ungated: ``S_t = S_{t−1} + φ(k_t) v_tᵀ``), each query read when its step arrives.
- ``"quadratic"``: the materialised ``(L, S)`` matrix of ``w_ij φ(q_i)·φ(k_j)``: the dense reference.

A query that attends no key (causal, ``i + δ < 0``) outputs 0.
"""

from __future__ import annotations

from typing import Any, Callable

from reflex.backends import device as device_of
from reflex.backends import namespace
from reflex.mechanisms import _kernels
from reflex.mechanisms._cases import standard
from reflex.mechanisms._patterns import causal_offset, parse_causal
from reflex.registry import Case, Mechanism, register
from reflex.mechanisms._options import typed_options

__all__ = ["linear_attention"]

FORMS = ("auto", "parallel", "recurrent", "quadratic")
FEATURE_MAPS = ("elu", "relu")

Features = Callable[[int, int], Any]


# --- the shared factorised core -------------------------------------------------------------------

def check_form(implementation: Any) -> str:
    """``implementation`` of a kernelised mechanism: ``"auto"`` → ``"parallel"``."""
    if implementation not in FORMS:
        raise ValueError(f"implementation must be one of {', '.join(FORMS)}; got {implementation!r}")
    return "parallel" if implementation == "auto" else implementation


def causal_shift(p: _kernels.Prepared, causal: Any) -> int | None:
    """δ of the causal alignment (query i sees keys j ≤ i + δ), or None when not causal."""
    alignment = parse_causal(causal)
    return None if alignment is None else causal_offset(alignment, p.length, p.key_length)


def grouped(p: _kernels.Prepared) -> tuple[Any, Any, Any]:
    """``q (..., G, H/G, L, D)``, ``k (..., G, 1, S, D)``, ``v (..., G, 1, S, E)``: GQA without copies."""
    xp = p.xp
    q = xp.reshape(p.q, (*p.batch, p.kv_heads, p.group, p.length, p.dim))
    return q, xp.expand_dims(p.k, axis=-3), xp.expand_dims(p.v, axis=-3)


def check_gate(p: _kernels.Prepared, gate: Any) -> Any:
    """A recency gate ``(..., G, S)`` with values in [0, 1], cast to the compute dtype, as ``(..., G, 1, S)``."""
    xp = p.xp
    if namespace(gate) is not xp or device_of(gate) != p.device:
        raise TypeError(f"gate must come from the same array library and device as q ({p.device})")
    want = (*p.batch, p.kv_heads, p.key_length)
    if tuple(int(n) for n in gate.shape) != want:
        raise ValueError(f"gate must have shape (..., G, S) = {want}; got {tuple(int(n) for n in gate.shape)}")
    if not xp.isdtype(gate.dtype, "real floating"):
        raise TypeError(f"gate must be a real floating array of values in [0, 1]; got dtype {gate.dtype}")
    if gate.shape[-1] and not bool(xp.all((gate >= 0) & (gate <= 1))):
        raise ValueError("gate values must lie in [0, 1]")
    return xp.expand_dims(xp.astype(gate, p.q.dtype), axis=-2)


def _scan(xp: Any, decay: Any, state: Any, norm: Any) -> tuple[Any, Any, Any]:
    """Inclusive scan of ``x_t = a_t x_{t−1} + b_t`` along the block axis (Hillis & Steele 1986).

    ``decay (..., c)``, ``state (..., c, F, E)``, ``norm (..., c, F)``; returns the cumulative
    products of ``a`` and the scanned ``b`` of both. Log-depth, no division: stable for any gate.
    """
    count, shift = int(decay.shape[-1]), 1
    while shift < count:
        state = xp.concat([state[..., :shift, :, :],
                           state[..., shift:, :, :] + decay[..., shift:, None, None] * state[..., :-shift, :, :]], axis=-3)
        norm = xp.concat([norm[..., :shift, :], norm[..., shift:, :] + decay[..., shift:, None] * norm[..., :-shift, :]],
                         axis=-2)
        decay = xp.concat([decay[..., :shift], decay[..., shift:] * decay[..., :-shift]], axis=-1)
        shift *= 2
    return decay, state, norm


def _kernelized(p: _kernels.Prepared, features_q: Features, features_k: Features,
                normalise: Callable[[Any, Any], Any], *, offset: int | None, form: str,
                gate: Any = None, block: int | None = None) -> Any:
    """Kernelised attention ``(..., H, L, E)`` (see the module docstring).

    ``features_q(i0, i1)`` gives ``φ(q)`` of query rows ``[i0, i1)`` as ``(..., G, H/G, l, F)``;
    ``features_k(j0, j1)`` gives ``φ(k)`` of key rows ``[j0, j1)`` as ``(..., G, 1, s, F)``.
    ``normalise(num (..., l, E), den (..., l, 1))`` gives the output rows. ``offset`` δ: causal
    (query i reads the state after key i + δ) or None (every query reads the final state).
    ``gate (..., G, 1, S)``: recency gate of the recurrence (causal only).
    """
    xp = p.xp
    L, S, E = p.length, p.key_length, p.value_dim
    out_shape = (*p.batch, p.kv_heads, p.group)
    if L == 0 or S == 0:
        return _kernels.empty_result(p)[0]
    v = xp.expand_dims(p.v, axis=-3)
    num_features = int(features_k(0, 1).shape[-1])
    if block is None:
        block = 1024 if offset is None else max(16, min(1024, (1 << 20) // max(1, num_features * E)))
    # Queries [0, first) attend nothing; query i in [first, last) reads the state after key i + δ;
    # queries [last, L) (every query when not causal) read the final state.
    first = 0 if offset is None else min(L, max(0, -offset))
    last = first if offset is None else max(first, min(L, S - offset))
    pieces: list[Any] = []
    if first:
        pieces.append(xp.zeros((*out_shape, first, E), dtype=p.q.dtype, device=p.device))

    if form == "quadratic":
        rows = xp.reshape(xp.arange(L, dtype=xp.int64, device=p.device), (L, 1))
        cols = xp.reshape(xp.arange(S, dtype=xp.int64, device=p.device), (1, S))
        kernel = features_q(0, L) @ xp.matrix_transpose(features_k(0, S))  # (..., G, H/G, L, S)
        if offset is not None:
            kernel = xp.where(cols <= rows + offset, kernel, 0.0)
        if gate is not None:
            # weight of key j read at step t: (1 − g_j) Π_{j<r≤t} g_r, as a cumulative product over r.
            r_idx = xp.reshape(xp.arange(S, dtype=xp.int64, device=p.device), (S, 1))
            factors = xp.where(r_idx > cols, gate[..., :, None], 1.0)  # (..., G, 1, S_r, S_j)
            weights = xp.cumulative_prod(factors, axis=-2) * (1.0 - gate)[..., None, :]  # (..., G, 1, S_t, S_j)
            steps = xp.clip(xp.arange(L, dtype=xp.int64, device=p.device) + offset, 0, S - 1)
            kernel = kernel * xp.take(weights, steps, axis=-2)
        out = normalise(kernel @ v, xp.sum(kernel, axis=-1, keepdims=True))
        if first:
            out = xp.concat([pieces[0], out[..., first:, :]], axis=-2)
        return xp.reshape(out, (*p.batch, p.heads, L, E))

    state = xp.zeros((*p.batch, p.kv_heads, 1, num_features, E), dtype=p.q.dtype, device=p.device)
    norm = xp.zeros((*p.batch, p.kv_heads, 1, num_features), dtype=p.q.dtype, device=p.device)

    def read(i0: int, i1: int, state_rows: Any, norm_rows: Any) -> Any:
        """Outputs of queries [i0, i1) against per-query states ``(..., l, F, E)`` and ``(..., l, F)``."""
        fq = features_q(i0, i1)
        num = (fq[..., :, None, :] @ state_rows)[..., 0, :]
        den = xp.sum(fq * norm_rows, axis=-1, keepdims=True)
        return normalise(num, den)

    if form == "recurrent":
        for t in range(S):
            fk = features_k(t, t + 1)  # (..., G, 1, 1, F)
            update = xp.matrix_transpose(fk) @ v[..., t:t + 1, :]
            if gate is None:
                state, norm = state + update, norm + fk[..., 0, :]
            else:
                g = gate[..., t:t + 1]
                state = g[..., None] * state + (1.0 - g[..., None]) * update
                norm = g * norm + (1.0 - g) * fk[..., 0, :]
            i = t - offset if offset is not None else -1
            if first <= i < last:
                pieces.append(read(i, i + 1, state[..., None, :, :], norm[..., None, :]))
    elif form == "parallel":
        for j0 in range(0, S, block):
            j1 = min(j0 + block, S)
            fk = features_k(j0, j1)
            vk = v[..., j0:j1, :]
            i0 = max(first, j0 - offset) if offset is not None else 0
            i1 = min(last, j1 - offset) if offset is not None else 0
            if gate is None and i1 <= i0:  # nobody reads inside this block: add its sum
                state = state + xp.matrix_transpose(fk) @ vk
                norm = norm + xp.sum(fk, axis=-2)
                continue
            outer = fk[..., :, :, None] * vk[..., :, None, :]  # (..., G, 1, c, F, E)
            if gate is None:
                prefix = state[..., None, :, :] + xp.cumulative_sum(outer, axis=-3)
                prefix_norm = norm[..., None, :] + xp.cumulative_sum(fk, axis=-2)
            else:
                g = gate[..., j0:j1]
                decay, prefix, prefix_norm = _scan(xp, g, (1.0 - g)[..., None, None] * outer, (1.0 - g)[..., None] * fk)
                prefix = decay[..., None, None] * state[..., None, :, :] + prefix
                prefix_norm = decay[..., None] * norm[..., None, :] + prefix_norm
            if i1 > i0:
                r0 = i0 + offset - j0
                pieces.append(read(i0, i1, prefix[..., r0:r0 + i1 - i0, :, :], prefix_norm[..., r0:r0 + i1 - i0, :]))
            state, norm = prefix[..., -1, :, :], prefix_norm[..., -1, :]
    else:
        raise ValueError(f"unknown form {form!r}")

    for i0 in range(last, L, 1024):  # queries that read the final state
        i1 = min(i0 + 1024, L)
        fq = features_q(i0, i1)
        pieces.append(normalise(fq @ state, fq @ norm[..., :, None]))
    out = xp.concat(pieces, axis=-2) if len(pieces) != 1 else pieces[0]
    return xp.reshape(out, (*p.batch, p.heads, L, E))


def safe_divide(xp: Any) -> Callable[[Any, Any], Any]:
    """``num / den``, and 0 where ``den == 0`` (a query that attends nothing)."""
    return lambda num, den: xp.where(den == 0, 0.0, num / xp.where(den == 0, 1.0, den))


# --- linear attention -----------------------------------------------------------------------------

def _elu_plus_one(xp: Any) -> Callable[[Any], Any]:
    # elu(x) + 1 = x + 1 for x > 0, exp(x) otherwise (exp evaluated on min(x, 0): no overflow).
    return lambda x: xp.where(x > 0, x + 1.0, xp.exp(xp.where(x > 0, 0.0, x)))


def _feature_map(xp: Any, feature_map: Any) -> Callable[[Any], Any]:
    if callable(feature_map):
        return feature_map
    if feature_map == "elu":
        return _elu_plus_one(xp)
    if feature_map == "relu":
        return lambda x: xp.where(x > 0, x, 0.0)
    raise ValueError(f"feature_map must be one of {', '.join(FEATURE_MAPS)} or a callable; got {feature_map!r}")


@typed_options()
def linear_attention(q: Any, k: Any, v: Any, /, *, feature_map: Any = "elu", causal: bool | str = False,
                     eps: float = 1e-6, compute_dtype: Any = None, implementation: str = "auto") -> Any:
    """Linear attention: φ(Q)(φ(K)ᵀV) / (φ(Q)·Σφ(K) + eps), causal by prefix sums or as an RNN.

    .. math::

        o_i = \\frac{\\phi(q_i)^\\top \\sum_{j \\le t_i} \\phi(k_j) v_j^\\top}
                   {\\phi(q_i)^\\top \\sum_{j \\le t_i} \\phi(k_j) + \\varepsilon},
        \\qquad \\phi(x) = \\mathrm{elu}(x) + 1

    (Katharopoulos et al. 2020, "Transformers are RNNs", §3.2 eq. 4–6; causal §3.3 eq. 8–12, RNN
    form §3.4 eq. 16–20). ``t_i = S − 1`` without ``causal``; ``t_i = i + δ`` with it.

    Shapes: ``q (..., H, L, D)``, ``k (..., G, S, D)``, ``v (..., G, S, E)`` → ``(..., H, L, E)``;
    query head h uses kv head ``h // (H/G)``.

    Args:
        feature_map: ``"elu"`` (elu + 1, the paper's), ``"relu"``, or a callable mapping an array
            ``(..., n, D)`` to non-negative features ``(..., n, F)`` in the same namespace.
        causal: ``False``; ``True``/``"top_left"`` (j ≤ i) or ``"bottom_right"`` (j ≤ i + S − L).
        eps: added to the normaliser (the fast-transformers convention, default 1e-6); a query whose
            normaliser is 0 (no key: causal, i + δ < 0; or eps = 0 with all-zero features) outputs 0.
        compute_dtype: arithmetic dtype (default float64).
        implementation: ``"parallel"`` (= ``"auto"``: prefix sums over key blocks, memory linear in L),
            ``"recurrent"`` (one key at a time, the RNN form) or ``"quadratic"`` (the ``(L, S)``
            kernel matrix; the dense reference). All three agree to round-off.

    There is no ``scale``: the feature map sees q and k as given.
    """
    form = check_form(implementation)
    p = _kernels.prepare(q, k, v, compute_dtype=compute_dtype)
    xp = p.xp
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0; got {eps!r}")
    phi = _feature_map(xp, feature_map)
    qg, kg, _ = grouped(p)
    eps = float(eps)
    return _kernelized(
        p, lambda i0, i1: phi(qg[..., i0:i1, :]), lambda j0, j1: phi(kg[..., j0:j1, :]),
        lambda num, den: safe_divide(xp)(num, den + eps), offset=causal_shift(p, causal), form=form,
    )


def _feature_map_vjp(xp: Any, feature_map: Any, feature_map_grad: Any) -> Callable[[Any, Any], Any]:
    """``(x, dφ) -> dx`` for the feature map; a callable map needs ``feature_map_grad`` (see :func:`_linear_vjp`)."""
    if callable(feature_map):
        if not callable(feature_map_grad):
            raise ValueError("feature_map is a callable: its VJP needs feature_map_grad=, a callable (x, d_features) -> "
                             f"d_x in the same namespace; got feature_map_grad={feature_map_grad!r}")
        return feature_map_grad
    if feature_map_grad is not None:
        raise ValueError(f"feature_map_grad is only for a callable feature_map; got feature_map={feature_map!r}")
    if feature_map == "elu":
        return lambda x, d: d * xp.exp(xp.where(x > 0, 0.0, x))  # 1 for x > 0, e^x otherwise
    if feature_map == "relu":
        return lambda x, d: xp.where(x > 0, d, 0.0)  # subgradient 0 at x = 0
    raise ValueError(f"feature_map must be one of {', '.join(FEATURE_MAPS)} or a callable; got {feature_map!r}")


def _linear_vjp(inputs: dict, d_out: Any, *, d_lse: Any = None, feature_map: Any = "elu",
                feature_map_grad: Any = None, causal: bool | str = False, eps: float = 1e-6,
                compute_dtype: Any = None, implementation: str = "auto") -> dict:
    """VJP of :func:`linear_attention`: ``{"q": dq, "k": dk, "v": dv}``.

    Backward equations (``φ`` the feature map, ``n_i = φ(q_i)ᵀ S_{t_i}``, ``d_i = φ(q_i)ᵀ z_{t_i} + ε``):
    ``d n_i = do_i / d_i``, ``d d_i = −⟨do_i, n_i⟩ / d_i²`` (0 for a query whose normaliser is 0);
    ``dφ(q_i) = S_{t_i} d n_i + z_{t_i} d d_i``; the state adjoints ``Λ_t = Σ_{i: t_i ≥ t} φ(q_i) d n_iᵀ``,
    ``λ_t = Σ_{i: t_i ≥ t} φ(q_i) d d_i`` (reversed prefix sums over key blocks, never ``(L, S)``);
    ``dφ(k_j) = Λ_j v_j + λ_j``, ``dv_j = Λ_jᵀ φ(k_j)``; then ``dq = φ'(q) ∘ dφ(q)`` and
    ``dk = Σ_{query heads of the group} φ'(k) ∘ dφ(k)``. ``φ' = 1`` (x > 0) or ``e^x`` for elu + 1;
    ReLU's is 1 for x > 0, else 0 (subgradient 0 at the kink x = 0). A callable ``feature_map`` needs
    ``feature_map_grad``: a callable ``(x (..., n, D), d_features (..., n, F)) -> d_x (..., n, D)``
    giving the feature map's VJP in x's namespace (without it a ``ValueError`` says so).
    ``implementation="recurrent"`` back-propagates through the RNN one key at a time; the other
    forms use key blocks; all agree to round-off. See :func:`reflex.mechanisms._grad.kernelized_vjp`.
    """
    from reflex.mechanisms import _grad

    form = check_form(implementation)
    p = _kernels.prepare(inputs["q"], inputs["k"], inputs["v"], compute_dtype=compute_dtype)
    xp = p.xp
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0; got {eps!r}")
    phi, phi_vjp = _feature_map(xp, feature_map), _feature_map_vjp(xp, feature_map, feature_map_grad)
    qg, kg, _ = grouped(p)
    fq, fk = phi(qg), phi(kg)
    d_fq, d_fk, d_v, _ = _grad.kernelized_vjp(p, fq, fk, _grad.divide_vjp(xp, eps=float(eps)), d_out,
                                              offset=causal_shift(p, causal), form=form)
    d_q = _grad.ungroup(p, phi_vjp(qg, d_fq))
    d_k = phi_vjp(kg, d_fk)[..., 0, :, :]
    return {"q": d_q, "k": d_k, "v": d_v}


def _cases(size: str, seed: int) -> list[Case]:
    d, gqa = standard(size, seed)
    return [
        Case("gqa", gqa, {}, seed=seed),
        Case("relu", gqa, {"feature_map": "relu"}, seed=seed),
        Case("causal_top_left", gqa, {"causal": "top_left"}, seed=seed),
        Case("causal_bottom_right", gqa, {"causal": "bottom_right"}, seed=seed),
        Case("causal_recurrent", gqa, {"causal": True, "implementation": "recurrent"}, seed=seed),
    ]


def _reference(q: Any, k: Any, v: Any, /, **params: Any) -> Any:
    """The materialised ``(L, S)`` kernel matrix."""
    return linear_attention(q, k, v, **{**params, "implementation": "quadratic"})


register(Mechanism(
    key="linear",
    function=linear_attention,
    family="D. linearized",
    paper="Katharopoulos et al. 2020, 'Transformers are RNNs', §3.2-3.4",
    params={
        "feature_map": "'elu' (elu(x)+1) | 'relu' | callable (..., n, D) -> (..., n, F)",
        "causal": "False | True | 'top_left' | 'bottom_right'",
        "eps": "added to the normaliser (default 1e-6)",
        "implementation": "'parallel' (prefix sums) | 'recurrent' (RNN) | 'quadratic' (dense reference)",
    },
    cases=_cases,
    reference=_reference,
    row_separable=True,
    vjp=_linear_vjp,
))

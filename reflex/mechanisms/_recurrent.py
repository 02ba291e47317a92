"""The state-recurrent core of catalogue section K: one diagonal-plus-low-rank step, three forms, its VJP.

Every mechanism of section K (``linear_recurrent``, ``mamba2``, ``rwkv6``, ``rwkv7``) is, per key/value
head, a recurrence on a state ``S ∈ ℝ^{D×E}`` (rows indexed by key dimensions, columns by value
dimensions — the ONNX / flash-linear-attention layout) built from one step:

.. math::

    P &= \\mathrm{diag}(e^{g_t})\\, S_{t-1}                           &&\\text{(decay, log space, } g_t \\le 0)\\\\
    S_t &= P + b_t\\,(a_t^\\top S_{t-1}) + k_t u_t^\\top, \\quad
    u_t = \\begin{cases} \\beta_t (v_t - P^\\top k_t) & \\text{(ONNX delta correction)}\\\\ v_t \\end{cases}\\\\
    o_{t} &= \\tau\\, S_t^\\top q_t \\quad\\text{(read after the write)} \\quad\\text{or}\\quad
    \\tau\\, S_{t-1}^\\top q_t + \\tau\\,(q_t \\cdot (u \\circ k_t))\\, v_t \\quad\\text{(read before, RWKV-6 bonus)}

``g_t`` is one log multiplier per head (``Dd = 1``) or one per key dimension (``Dd = D``). The delta
correction with decay is the diagonal-plus-low-rank step with ``a_t = −e^{g_t}∘k_t``,
``b_t = β_t k_t`` and ``v_t ← β_t v_t``: the chunked form and the VJP use that reduction, the
recurrent form (and the Numba scan) follow ONNX's order of operations literally.

Forms (all agree to round-off; tests hold them to 1e-12):

- **recurrent**: token by token, the definition.
- **chunked** (chunk C, any C ≥ 1, the last chunk may be shorter): inside a chunk, with segment sums
  ``Y_ij = Σ_{j<s≤i} g_s`` (summed directly, never differenced, and ≤ 0, so ``e^Y`` never overflows —
  the exponent is taken only of sums over a segment, never of a positive cumulative sum) and the
  exclusive ``Y′_ij = Y_{i−1,j}`` (j < i),

  .. math::

      (I - \\mathrm{tril}_{-1}A^{ab}) X = (\\mathcal{A}\\circ e^{\\Gamma'}) S_0 + \\mathrm{tril}_{-1}(A^{ak}) V
      \\quad\\text{(forward substitution; the WY/UT representation of the low-rank updates)}\\\\
      O = \\tau[(Q\\circ e^{\\Gamma})S_0 + \\mathrm{tril}(A^{qk})V + \\mathrm{tril}(A^{qb})X],\\quad
      S_C = e^{\\Gamma_C}\\circ S_0 + (K\\circ e^{Y_{C,\\cdot}})^\\top V + (B\\circ e^{Y_{C,\\cdot}})^\\top X

  where 𝒜, B, K, Q, V are the chunk's rows of a, b, k, q, v, ``A^{xy}_{ij} = Σ_d x_{id} y_{jd} e^{Y_{ijd}}``
  (``Y′`` for rows read from ``a``), ``Γ`` the inclusive and ``Γ′`` the exclusive cumulative log decay
  from the chunk start. X holds ``a_tᵀS_{t−1}``
  for every t of the chunk. Read-before-write uses ``Y′`` and ``Γ′`` for the queries.
- **parallel**: the same with one chunk spanning T — the quadratic ``(T, T)`` masked form.

The VJP is a reverse-time scan (backpropagation through the recurrence), with the states recomputed
from checkpoints stored every ``block`` steps: memory O(block·D·E), not O(T·D·E).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from reflex.backends import is_plain_numpy, numba_kernels
from reflex.mechanisms._inputs import check_array
from reflex.mechanisms._numerics import unbroadcast

__all__ = ["Terms", "run", "vjp_terms", "check_log_decay", "check_shape", "check_form", "initial_state",
           "FORMS"]

FORMS = ("auto", "recurrent", "chunked", "parallel")


@dataclass(frozen=True)
class Terms:
    """Inputs of the core in the grouped layout (R = H/G query heads per kv head), compute dtype.

    ``q (..., G, R, T, D)``, ``k (..., G, 1, T, D)``, ``v (..., G, 1, T, E)``, ``decay (..., G, 1, T, Dd)``,
    ``beta (..., G, 1, T, 1)``, ``a``/``b`` ``(..., G, 1, T, D)``, ``bonus (..., G, 1, 1, D)``; absent
    terms are None.
    """

    xp: Any
    device: Any
    q: Any
    k: Any
    v: Any
    decay: Any = None
    beta: Any = None
    a: Any = None
    b: Any = None
    bonus: Any = None
    read_before: bool = False

    @property
    def length(self) -> int:
        return int(self.k.shape[-2])


def shape_of(x: Any) -> tuple[int, ...]:
    return tuple(int(n) for n in x.shape)


def check_shape(name: str, x: Any, want: tuple[int, ...], letters: str) -> None:
    """``x.shape == want`` or a ValueError naming ``name`` with the expected letters and sizes."""
    if shape_of(x) != tuple(want):
        raise ValueError(f"{name} must have shape {letters} = {tuple(want)}; got {shape_of(x)}")


def check_log_decay(xp: Any, device: Any, dtype: Any, name: str, x: Any) -> Any:
    """A log-space decay array: real floating, finite, ≤ 0 (the multiplier is e^x ∈ (0, 1])."""
    x = check_array(xp, device, dtype, name, x)
    if math.prod(x.shape) and not bool(xp.all(x <= 0.0)):
        raise ValueError(f"{name} holds log multipliers and must be <= 0 (multiplier e^{name} in (0, 1]); "
                         f"got a maximum of {float(xp.max(x))} (pass log(multiplier), not the multiplier)")
    if math.prod(x.shape) and not bool(xp.all(xp.isfinite(x))):
        raise ValueError(f"{name} must be finite (a multiplier of exactly 0 is log -inf, which is not allowed)")
    return x


def initial_state(xp: Any, device: Any, dtype: Any, state: Any, want: tuple[int, ...], letters: str) -> Any:
    """``initial_state`` checked against ``want`` (zeros if None), as ``(..., G, 1, D, E)``."""
    if state is None:
        return xp.zeros((*want[:-2], 1, *want[-2:]), dtype=dtype, device=device)
    state = check_array(xp, device, dtype, "initial_state", state)
    check_shape("initial_state", state, want, letters)
    return xp.expand_dims(state, axis=-3)


def check_form(form: Any) -> str:
    if form not in FORMS:
        raise ValueError(f"form must be one of {', '.join(FORMS)}; got {form!r}")
    return form


# --- forms ----------------------------------------------------------------------------------------

def run(t: Terms, state: Any, *, scale: float, form: str, chunk_size: int) -> tuple[Any, Any]:
    """``(out (..., G, R, T, E), state (..., G, 1, D, E))`` by ``form`` (``"auto"``: the Numba
    recurrent scan for plain NumPy float64, otherwise chunked)."""
    if form == "auto":
        plain = all(is_plain_numpy(x) for x in (t.q, t.k, t.v, state)) and t.q.dtype == t.xp.float64
        form = "numba" if plain else "chunked"
    if form == "numba":
        return _numba(t, state, scale=scale)
    if form == "recurrent":
        return recurrent(t, state, scale=scale)
    if form == "parallel":
        return chunked(t, state, scale=scale, chunk=max(1, t.length))
    if form == "chunked":
        return chunked(t, state, scale=scale, chunk=chunk_size)
    raise ValueError(f"form must be one of {', '.join(FORMS)}; got {form!r}")


def _row(x: Any, i: int) -> Any:
    return x[..., i:i + 1, :]


def _scalar_read(xp: Any, q: Any, k: Any, bonus: Any, v: Any, scale: float) -> Any:
    """RWKV-6's bonus read ``τ (q·(u∘k)) v`` for rows ``q (..., R, n, D)``, ``k, v (..., 1, n, ·)``."""
    return scale * xp.sum(q * (bonus * k), axis=-1, keepdims=True) * v


def recurrent(t: Terms, state: Any, *, scale: float) -> tuple[Any, Any]:
    """Token by token, in the order of the module docstring (ONNX's for the delta correction)."""
    xp = t.xp
    outs = []
    for i in range(t.length):
        q, k, v = _row(t.q, i), _row(t.k, i), _row(t.v, i)
        if t.read_before:
            o = scale * (q @ state)
            if t.bonus is not None:
                o = o + _scalar_read(xp, q, k, t.bonus, v, scale)
            outs.append(o)
        if t.a is not None:
            x = _row(t.a, i) @ state  # a_tᵀ S_{t−1}, (..., 1, E)
        if t.decay is not None:
            state = xp.exp(xp.matrix_transpose(_row(t.decay, i))) * state
        if t.a is not None:
            state = state + xp.matrix_transpose(_row(t.b, i)) * x
        if t.beta is not None:
            v = _row(t.beta, i) * (v - k @ state)  # β_t (v_t − Sᵀk_t) with the decayed S
        state = state + xp.matrix_transpose(k) * v
        if not t.read_before:
            outs.append(scale * (q @ state))
    if not outs:
        shape = (*t.q.shape[:-1], int(t.v.shape[-1]))
        return xp.zeros(shape, dtype=t.q.dtype, device=t.device), state
    return xp.concat(outs, axis=-2), state


def as_low_rank(t: Terms) -> Terms:
    """The delta correction as the diagonal-plus-low-rank step: a = −e^g∘k, b = βk, v ← βv."""
    if t.beta is None:
        return t
    xp = t.xp
    a = -t.k if t.decay is None else -xp.exp(t.decay) * t.k
    return replace(t, a=a, b=t.beta * t.k, v=t.beta * t.v, beta=None)


def _window(t: Terms, c0: int, c1: int) -> Terms:
    """The terms of tokens [c0, c1)."""
    def cut(x: Any) -> Any:
        return None if x is None else x[..., c0:c1, :]

    return replace(t, q=cut(t.q), k=cut(t.k), v=cut(t.v), decay=cut(t.decay), beta=cut(t.beta), a=cut(t.a),
                   b=cut(t.b))


def _pair(xp: Any, x: Any, y: Any, weights: Any) -> Any:
    """``Σ_d x_id y_jd W_ijd`` → ``(..., n, n)``; ``W (..., n, n, Dd)``, Dd = 1 by a matrix product."""
    if int(weights.shape[-1]) == 1:
        return (x @ xp.matrix_transpose(y)) * weights[..., 0]
    return xp.sum(x[..., :, None, :] * y[..., None, :, :] * weights, axis=-1)


SLAB_ELEMENTS = 1 << 21  # budget of one slab's (chunks, C, C, Dd) segment-sum arrays, per batch·head


def chunked(t: Terms, state: Any, *, scale: float, chunk: int) -> tuple[Any, Any]:
    """The chunked form of the module docstring (the last chunk may be shorter).

    Chunks go in slabs of m equal chunks: everything that does not depend on the incoming state —
    segment sums, the forward substitution (for ``X = W S_0 + U``: ``W = T(𝒜∘e^{Γ′})``,
    ``U = T tril₋₁(A^{ak}) V``, the WY/UT factors), the intra-chunk products — for the m chunks at
    once, then the m states in sequence, a few matrix products per chunk.
    """
    xp = t.xp
    if t.read_before and (t.a is not None or t.beta is not None):
        raise ValueError("read-before-write with a low-rank update is not a form of this core")
    T, dev = t.length, t.device
    lead = math.prod(int(n) for n in t.k.shape[:-2])
    decay_dim = 1 if t.decay is None else int(t.decay.shape[-1])
    per_slab = max(1, SLAB_ELEMENTS // max(1, lead * chunk * chunk * max(decay_dim, 8)))
    bonus = None if t.bonus is None else xp.expand_dims(t.bonus, axis=-2)
    outs = []
    c0 = 0
    while c0 < T:
        n = min(chunk, T - c0)
        m = max(1, min(per_slab, (T - c0) // n))
        c1 = c0 + m * n
        part = as_low_rank(_window(t, c0, c1))  # the delta correction as a, b per slab: memory O(slab)

        def chunks(x: Any) -> Any:  # (..., m·n, X) → (..., m, n, X)
            return xp.reshape(x, (*x.shape[:-2], m, n, int(x.shape[-1])))

        q, k, v = chunks(part.q), chunks(part.k), chunks(part.v)
        g = chunks(part.decay) if part.decay is not None else xp.zeros((*k.shape[:-1], 1), dtype=k.dtype, device=dev)
        rows = xp.reshape(xp.arange(n, dtype=xp.int64, device=dev), (n, 1))
        cols = xp.reshape(xp.arange(n, dtype=xp.int64, device=dev), (1, n))
        # Segment sums Y[i, j] = Σ_{j<s≤i} g_s: a cumulative sum over s of g_s masked to s > j.
        seg = xp.cumulative_sum(xp.where((rows > cols)[..., None], g[..., :, None, :], 0.0), axis=-3)
        gamma = xp.cumulative_sum(g, axis=-2)  # Γ_i, inclusive, ≤ 0
        to_end = xp.exp(seg[..., n - 1, :, :])  # e^{Γ_C − Γ_j}, Γ_C − Γ_j as Σ_{j<s≤C} g_s
        decay_end = xp.exp(xp.matrix_transpose(gamma[..., n - 1:n, :]))  # (..., m, Dd, 1)
        if part.read_before or part.a is not None:
            # Exclusive: Y′[i, j] = Y[i−1, j] for j < i, and Γ′_i = Γ_{i−1}.
            shifted = xp.concat([xp.zeros_like(seg[..., :1, :, :]), seg[..., :n - 1, :, :]], axis=-3)
            exclusive = xp.where((rows > cols)[..., None], xp.exp(shifted), 0.0)
            gamma_ex = xp.concat([xp.zeros_like(gamma[..., :1, :]), gamma[..., :n - 1, :]], axis=-2)
        if part.read_before:
            q_state = q * xp.exp(gamma_ex)
            o_intra = _pair(xp, q, k, exclusive) @ v
            if bonus is not None:
                o_intra = o_intra + _scalar_read(xp, q, k, bonus, v, 1.0)
        else:
            inclusive = xp.where((rows >= cols)[..., None], xp.exp(seg), 0.0)
            q_state = q * xp.exp(gamma)
            o_intra = _pair(xp, q, k, inclusive) @ v
        state_intra = xp.matrix_transpose(k * to_end) @ v  # (..., m, D, E)
        if part.a is not None:
            a, b = chunks(part.a), chunks(part.b)
            a_ab = _pair(xp, a, b, exclusive)
            rhs = xp.concat([a * xp.exp(gamma_ex), _pair(xp, a, k, exclusive) @ v], axis=-1)
            xs = []  # forward substitution: x_i = rhs_i + Σ_{j<i} A^{ab}_ij x_j, for [W | U] at once
            for i in range(n):
                x = _row(rhs, i)
                if i:
                    x = x + a_ab[..., i:i + 1, :i] @ xp.concat(xs, axis=-2)
                xs.append(x)
            solved = xp.concat(xs, axis=-2)
            D = int(a.shape[-1])
            w, u = solved[..., :D], solved[..., D:]
            q_b = _pair(xp, q, b, inclusive)
            b_end = xp.matrix_transpose(b * to_end)
        for j in range(m):
            o = q_state[..., j, :, :] @ state + o_intra[..., j, :, :]
            new = decay_end[..., j, :, :] * state + state_intra[..., j, :, :]
            if part.a is not None:
                x = w[..., j, :, :] @ state + u[..., j, :, :]  # a_tᵀS_{t−1} for the chunk's t
                o = o + q_b[..., j, :, :] @ x
                new = new + b_end[..., j, :, :] @ x
            outs.append(scale * o)
            state = new
        c0 = c1
    if not outs:
        shape = (*t.q.shape[:-1], int(t.v.shape[-1]))
        return xp.zeros(shape, dtype=t.q.dtype, device=dev), state
    return xp.concat(outs, axis=-2), state


def _numba(t: Terms, state: Any, *, scale: float) -> tuple[Any, Any]:
    """The recurrent form by the Numba scan (plain NumPy float64 only)."""
    import importlib

    numba_kernels()
    kernel = importlib.import_module("reflex.backends.numba_kernels.recurrent")
    return kernel.recurrent_scan(t.q, t.k, t.v, decay=t.decay, beta=t.beta, a=t.a, b=t.b, bonus=t.bonus,
                                 read_before=t.read_before, state=state, scale=scale)


# --- reverse mode ---------------------------------------------------------------------------------

def _step(t: Terms, state: Any, i: int) -> Any:
    """One low-rank step (no beta): S_t from S_{t−1}."""
    xp = t.xp
    new = state
    if t.decay is not None:
        new = xp.exp(xp.matrix_transpose(_row(t.decay, i))) * new
    if t.a is not None:
        new = new + xp.matrix_transpose(_row(t.b, i)) * (_row(t.a, i) @ state)
    return new + xp.matrix_transpose(_row(t.k, i)) * _row(t.v, i)


def vjp_terms(t: Terms, state: Any, d_out: Any, d_state: Any, *, scale: float, block: int = 64) -> dict[str, Any]:
    """Gradients of ``⟨d_out, out⟩ + ⟨d_state, S_T⟩`` for every present term and the initial state.

    Backward of one step (G = dS_t accumulated from later steps and the read):
    ``dq = τ S dO``, ``dk = G u``, ``du = Gᵀk``, ``db = G x``, ``dx = Gᵀb``, ``da = S_{t−1} dx``,
    ``dg = Σ_e G∘P`` (summed over d too for one decay per head), ``dS_{t−1} = e^g∘G + a dxᵀ``
    (+ τ q dOᵀ when the read precedes the write). The delta correction is differentiated through
    its low-rank form (``a = −e^g∘k``, ``b = βk``, ``v ← βv``) and the chain rule back to k, v, β, g.
    Returns keys ``q k v decay beta a b bonus state`` (those present), grouped layout.
    """
    xp = t.xp
    original = t
    t = as_low_rank(t)
    T = t.length
    grad = d_state if d_state is not None else xp.zeros_like(state)
    checkpoints = []
    s = state
    for c0 in range(0, T, block):
        checkpoints.append(s)
        for i in range(c0, min(c0 + block, T)):
            s = _step(t, s, i)
    names = ["q", "k", "v"] + [n for n in ("decay", "a", "b", "bonus") if getattr(t, n) is not None]
    rows: dict[str, list[Any]] = {n: [] for n in names if n != "bonus"}
    d_bonus = xp.zeros_like(t.bonus) if t.bonus is not None else None
    per_dim = t.decay is not None and int(t.decay.shape[-1]) > 1
    for c0 in reversed(range(0, T, block)):
        c1 = min(c0 + block, T)
        states = [checkpoints[c0 // block]]
        for i in range(c0, c1 - 1):
            states.append(_step(t, states[-1], i))
        for i in reversed(range(c0, c1)):
            prev = states[i - c0]
            q, k, v, do = _row(t.q, i), _row(t.k, i), _row(t.v, i), _row(d_out, i)
            read = xp.sum(xp.matrix_transpose(q) @ do, axis=-3, keepdims=True)  # Σ_r q_r do_rᵀ, (..., 1, D, E)
            if t.read_before:
                rows["q"].append(scale * (do @ xp.matrix_transpose(prev)))
            else:
                grad = grad + scale * read
                rows["q"].append(scale * (do @ xp.matrix_transpose(_step(t, prev, i))))
            rows["k"].append(v @ xp.matrix_transpose(grad))
            rows["v"].append(k @ grad)
            if t.bonus is not None:
                weight = xp.sum(do * v, axis=-1, keepdims=True)  # (do·v) per query head, (..., R, 1, 1)
                u = t.bonus
                rows["q"][-1] = rows["q"][-1] + scale * weight * (u * k)
                rows["k"][-1] = rows["k"][-1] + scale * xp.sum(weight * q, axis=-3, keepdims=True) * u
                rows["v"][-1] = rows["v"][-1] + scale * xp.sum(xp.sum(q * (u * k), axis=-1, keepdims=True) * do,
                                                               axis=-3, keepdims=True)
                d_bonus = d_bonus + scale * xp.sum(weight * q, axis=-3, keepdims=True) * k
            nxt = grad
            if t.decay is not None:
                multiplier = xp.exp(xp.matrix_transpose(_row(t.decay, i)))  # (..., Dd, 1)
                decayed = multiplier * prev
                if per_dim:
                    rows["decay"].append(xp.matrix_transpose(xp.sum(grad * decayed, axis=-1, keepdims=True)))
                else:
                    rows["decay"].append(xp.sum(grad * decayed, axis=(-2, -1), keepdims=True))
                nxt = multiplier * grad
            if t.a is not None:
                x = _row(t.a, i) @ prev
                dx = _row(t.b, i) @ grad
                rows["b"].append(x @ xp.matrix_transpose(grad))
                rows["a"].append(dx @ xp.matrix_transpose(prev))
                nxt = nxt + xp.matrix_transpose(_row(t.a, i)) * dx
            if t.read_before:
                nxt = nxt + scale * read
            grad = nxt
    grads = {n: xp.concat(rows[n][::-1], axis=-2) if T else xp.zeros_like(getattr(t, n)) for n in rows}
    grads["state"] = grad
    if d_bonus is not None:
        grads["bonus"] = d_bonus
    if original.beta is None:
        return grads
    # Chain rule from (a, b, βv) back to (k, v, β, g).
    beta = original.beta
    da, db, dv_low = grads.pop("a"), grads.pop("b"), grads["v"]
    multiplier = xp.exp(original.decay) if original.decay is not None else None
    neg = -da if multiplier is None else -multiplier * da
    grads["k"] = grads["k"] + neg + beta * db
    grads["v"] = beta * dv_low
    grads["beta"] = xp.sum(original.k * db, axis=-1, keepdims=True) + xp.sum(original.v * dv_low, axis=-1, keepdims=True)
    if original.decay is not None:
        extra = neg * original.k
        if int(original.decay.shape[-1]) == 1:
            extra = xp.sum(extra, axis=-1, keepdims=True)
        grads["decay"] = grads["decay"] + extra
    return grads

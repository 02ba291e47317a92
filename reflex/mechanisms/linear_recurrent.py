"""Linear attention with a state: ONNX ``LinearAttention`` (opset 27) and the gated / delta-rule family."""

from __future__ import annotations

from typing import Any

from reflex import random
from reflex.backends import numpy_namespace
from reflex.mechanisms import _recurrent
from reflex.mechanisms._inputs import check_array, prepare, resolve_scale
from reflex.mechanisms._options import typed_options
from reflex.mechanisms._patterns import check_positive_int
from reflex.registry import Case, Mechanism, register

__all__ = ["linear_recurrent_attention"]

UPDATE_RULES = ("linear", "gated", "delta", "gated_delta")
BETA_RANGE = (0.0, 2.0)


def _check_inputs(q: Any, k: Any, v: Any, update_rule: Any, decay: Any, beta: Any, initial_state: Any,
                  scale: Any, form: Any, chunk_size: Any, compute_dtype: Any) -> tuple[Any, ...]:
    """Validated, cast inputs: ``(p, terms, state (..., G, 1, D, E), scale, per_dim)``."""
    if update_rule not in UPDATE_RULES:
        raise ValueError(f"update_rule must be one of {', '.join(UPDATE_RULES)}; got {update_rule!r}")
    if form not in _recurrent.FORMS:
        raise ValueError(f"form must be one of {', '.join(_recurrent.FORMS)}; got {form!r}")
    check_positive_int("chunk_size", chunk_size)
    p = prepare(q, k, v, compute_dtype=compute_dtype)
    xp, dtype = p.xp, p.q.dtype
    if p.length != p.key_length:
        raise ValueError(f"q has length {p.length}; k and v have {p.key_length}: a recurrence reads one query "
                         "per token, so they must match (T)")
    gated, delta = update_rule in ("gated", "gated_delta"), update_rule in ("delta", "gated_delta")
    G, T, D, E = p.kv_heads, p.length, p.dim, p.value_dim
    if gated and decay is None:
        raise ValueError(f"update_rule {update_rule!r} requires decay (log multipliers, (..., G, T) or (..., G, T, D))")
    if not gated and decay is not None:
        raise ValueError(f"update_rule {update_rule!r} forbids decay (use 'gated' or 'gated_delta')")
    if delta and beta is None:
        raise ValueError(f"update_rule {update_rule!r} requires beta ((..., G, T), values in [0, 2])")
    if not delta and beta is not None:
        raise ValueError(f"update_rule {update_rule!r} forbids beta (use 'delta' or 'gated_delta')")
    per_dim = False
    if decay is not None:
        decay = _recurrent.check_log_decay(xp, p.device, dtype, "decay", decay)
        head, dim = (*p.batch, G, T), (*p.batch, G, T, D)
        if _recurrent.shape_of(decay) == head:
            decay = decay[..., None]
        elif _recurrent.shape_of(decay) == dim:
            per_dim = True
        else:
            raise ValueError(f"decay must have shape (..., G, T) = {head} (one per head) or (..., G, T, D) = {dim} "
                             f"(one per key dimension); got {_recurrent.shape_of(decay)}")
        decay = xp.expand_dims(decay, axis=-3)
    if beta is not None:
        beta = check_array(xp, p.device, dtype, "beta", beta)
        _recurrent.check_shape("beta", beta, (*p.batch, G, T), "(..., G, T)")
        if T and not bool(xp.all((beta >= BETA_RANGE[0]) & (beta <= BETA_RANGE[1]))):
            raise ValueError(f"beta must lie in [{BETA_RANGE[0]:g}, {BETA_RANGE[1]:g}]; got values in "
                             f"[{float(xp.min(beta))}, {float(xp.max(beta))}]")
        beta = xp.expand_dims(beta[..., None], axis=-3)
    if initial_state is None:
        state = xp.zeros((*p.batch, G, 1, D, E), dtype=dtype, device=p.device)
    else:
        state = check_array(xp, p.device, dtype, "initial_state", initial_state)
        _recurrent.check_shape("initial_state", state, (*p.batch, G, D, E), "(..., G, D, E)")
        state = xp.expand_dims(state, axis=-3)
    terms = _recurrent.Terms(
        xp=xp, device=p.device, q=xp.reshape(p.q, (*p.batch, G, p.group, T, D)),
        k=xp.expand_dims(p.k, axis=-3), v=xp.expand_dims(p.v, axis=-3), decay=decay, beta=beta)
    return p, terms, state, resolve_scale(scale, D), per_dim


@typed_options()
@typed_options()
def linear_recurrent_attention(q: Any, k: Any, v: Any, /, *, update_rule: str, decay: Any = None, beta: Any = None,
                               initial_state: Any = None, scale: float | None = None, return_state: bool = False,
                               form: str = "auto", chunk_size: int = 64, compute_dtype: Any = None) -> Any:
    """State-recurrent linear attention: ONNX LinearAttention's linear / gated / delta / gated_delta rules.

    Per kv head a state ``S ∈ ℝ^{D×E}`` (zeros, or ``initial_state``) is updated token by token, in
    ONNX's order (onnx 1.23 ``LinearAttention``, opset 27):

    .. math::

        S &\\leftarrow e^{g_t}\\circ S \\quad &&\\text{(gated rules; } g_t \\le 0 \\text{ per head or per row of } S)\\\\
        v_t &\\leftarrow \\beta_t\\,(v_t - S^\\top k_t) &&\\text{(delta rules, with the decayed } S)\\\\
        S &\\leftarrow S + k_t v_t^\\top, \\qquad o_t = \\tau\\, S^\\top q_t &&\\text{(read after the write)}

    i.e. ``S_t = e^{g_t}(I − β_t k_t k_tᵀ)S_{t−1} + β_t k_t v_tᵀ`` (one decay per head) and
    ``S_t = (I − β_t k_t k_tᵀ)diag(e^{g_t})S_{t−1} + β_t k_t v_tᵀ`` (one per key dimension). Cases:

    - ``linear``: ``S_t = S_{t−1} + k_t v_tᵀ`` — causal linear attention without feature map or
      normaliser (Katharopoulos et al. 2020 §3.4).
    - ``gated`` with decay ``(..., G, T)``: RetNet (Sun et al. 2023, §2.1; fixed decay
      ``g = log(1 − 2^{−5−h})``) and simple GLA / Lightning Attention; with decay ``(..., G, T, D)``:
      GLA (Yang et al. 2024, "Gated Linear Attention Transformers", §3).
    - ``delta``: DeltaNet (Schlag et al. 2021; Yang et al. 2024, "Parallelizing Linear Transformers with
      the Delta Rule over Sequence Length", §2).
    - ``gated_delta`` with decay ``(..., G, T)``: Gated DeltaNet (Yang, Kautz & Hatamizadeh 2025, §3;
      Qwen3-Next); with decay ``(..., G, T, D)``: Kimi Delta Attention (KDA)-style per-channel gating.

    Shapes (T tokens): ``q (..., H, T, D)``, ``k (..., G, T, D)``, ``v (..., G, T, E)`` →
    ``out (..., H, T, E)``; query head h reads the state of kv head ``h // (H/G)`` (ONNX's GQA
    mapping, ``np.repeat``). ``decay (..., G, T)`` or ``(..., G, T, D)``, ``beta (..., G, T)``,
    state ``(..., G, D, E)``. ONNX packs heads into the last axis (``(B, T, H·D)``): unpack to convert.

    Args:
        update_rule: ``"linear" | "gated" | "delta" | "gated_delta"`` (required; ONNX defaults to
            gated_delta). Gated rules require ``decay`` and the others forbid it; delta rules require
            ``beta`` and the others forbid it (as ONNX).
        decay: log multipliers ``g ≤ 0`` (finite); the state is multiplied by ``e^g``. Passing the
            multiplier instead of its log is the usual mistake: positive values raise.
        beta: write strength, in [0, 2] (DeltaNet's sigmoid gives (0, 1); 2·sigmoid allows negative
            eigenvalues of ``I − βkkᵀ`` for unit keys). Keys are used as given (the delta rule
            expects L2-normalised keys; nothing normalises them, as in ONNX).
        initial_state: ``S_0 (..., G, D, E)``, zeros if None (ONNX ``past_state``).
        scale: τ, applied at read time; None → ``1/√D`` (ONNX's absent or 0).
        return_state: also return the final state ``(..., G, D, E)`` (ONNX ``present_state``).
        form: ``"recurrent"`` (token by token), ``"chunked"`` (chunks of ``chunk_size``; the WY/UT
            representation for the delta rules), ``"parallel"`` (the quadratic ``(T, T)`` masked form:
            one chunk spanning T) or ``"auto"`` (the Numba recurrent scan for plain NumPy float64,
            chunked otherwise). They agree to round-off (≤ 1e-12); see ``reflex.mechanisms._recurrent``.
        chunk_size: chunk length of ``"chunked"``, any int ≥ 1 (T need not be a multiple).
        compute_dtype: arithmetic dtype (default float64); ``float32`` emulates the ONNX reference.

    Returns:
        ``out``, or ``(out, state)`` with ``return_state``, in the compute dtype.

    Raises:
        ValueError: unknown rule or form, decay/beta missing or forbidden for the rule, decay > 0 or
            not finite, beta outside [0, 2], a shape mismatch (the message names the argument).
        TypeError: non-float arrays, arrays from another library.
    """
    p, terms, state, tau, _ = _check_inputs(q, k, v, update_rule, decay, beta, initial_state, scale, form,
                                            chunk_size, compute_dtype)
    xp = p.xp
    out, state = _recurrent.run(terms, state, scale=tau, form=form, chunk_size=chunk_size)
    out = xp.reshape(out, (*p.batch, p.heads, p.length, p.value_dim))
    if return_state:
        return out, state[..., 0, :, :]
    return out


def _vjp(inputs: dict[str, Any], d_out: Any, *, d_lse: Any = None, d_state: Any = None, update_rule: str,
         scale: float | None = None, return_state: bool = False, form: str = "auto", chunk_size: int = 64,
         compute_dtype: Any = None) -> dict[str, Any]:
    """Reverse-time scan (``reflex.mechanisms._recurrent.vjp_terms``): gradients for q, k, v, decay,
    beta and initial_state; ``form``/``chunk_size`` do not change the result."""
    del d_lse, return_state
    p, terms, state, tau, per_dim = _check_inputs(
        inputs["q"], inputs["k"], inputs["v"], update_rule, inputs.get("decay"), inputs.get("beta"),
        inputs.get("initial_state"), scale, form, chunk_size, compute_dtype)
    xp = p.xp
    G, R, T, D, E = p.kv_heads, p.group, p.length, p.dim, p.value_dim
    d_out = xp.reshape(xp.astype(d_out, p.q.dtype), (*p.batch, G, R, T, E))
    if d_state is not None:
        d_state = xp.expand_dims(xp.astype(d_state, p.q.dtype), axis=-3)
    grads = _recurrent.vjp_terms(terms, state, d_out, d_state, scale=tau)
    result = {
        "q": xp.reshape(grads["q"], (*p.batch, p.heads, T, D)),
        "k": grads["k"][..., 0, :, :], "v": grads["v"][..., 0, :, :],
    }
    if "decay" in inputs and inputs["decay"] is not None:
        d_decay = grads["decay"][..., 0, :, :]
        result["decay"] = d_decay if per_dim else d_decay[..., 0]
    if "beta" in inputs and inputs["beta"] is not None:
        result["beta"] = grads["beta"][..., 0, :, 0]
    if "initial_state" in inputs and inputs["initial_state"] is not None:
        result["initial_state"] = grads["state"][..., 0, :, :]
    return result


def _draw(seed: int, *, batch: int, heads: int, kv_heads: int, length: int, dim: int, value_dim: int,
          rule: str, per_dim: bool, state: bool) -> dict[str, Any]:
    """Host inputs: q, k (rows L2-normalised for the delta rules), v, decay = log U(0.6, 1),
    beta ~ U(0, 1), initial_state ~ N(0, 1)."""
    host = numpy_namespace()
    inputs = {
        "q": random.normal((batch, heads, length, dim), seed=(seed, 0)),
        "k": random.normal((batch, kv_heads, length, dim), seed=(seed, 1)),
        "v": random.normal((batch, kv_heads, length, value_dim), seed=(seed, 2)),
    }
    if rule in ("delta", "gated_delta"):
        k = inputs["k"]
        inputs["k"] = k / host.sqrt(host.sum(k * k, axis=-1, keepdims=True))
        inputs["beta"] = random.uniform((batch, kv_heads, length), seed=(seed, 4))
    if rule in ("gated", "gated_delta"):
        shape = (batch, kv_heads, length, dim) if per_dim else (batch, kv_heads, length)
        inputs["decay"] = host.log(0.6 + 0.4 * random.uniform(shape, seed=(seed, 3)))
    if state:
        inputs["initial_state"] = random.normal((batch, kv_heads, dim, value_dim), seed=(seed, 5))
    return inputs


def _cases(size: str, seed: int) -> list[Case]:
    from reflex.mechanisms._cases import dims

    d = dims(size)
    shape = dict(batch=2, heads=d["H"], kv_heads=d["G"], length=d["L"], dim=d["D"], value_dim=d["E"])
    cases = []
    for rule, per_dim, state in (("linear", False, False), ("gated", False, True), ("gated", True, False),
                                 ("delta", False, True), ("gated_delta", False, False), ("gated_delta", True, True)):
        name = rule + ("_per_dim" if per_dim else "") + ("_state" if state else "")
        inputs = _draw(seed, rule=rule, per_dim=per_dim, state=state, **shape)
        cases.append(Case(name, inputs, {"update_rule": rule, "form": "chunked", "chunk_size": 3}, seed=seed))
    cases.append(Case("gated_delta_recurrent", _draw(seed, rule="gated_delta", per_dim=False, state=True, **shape),
                      {"update_rule": "gated_delta", "form": "recurrent"}, seed=seed))
    return cases


def _example(seq: int, heads: int, dim: int, seed: int) -> Case:
    inputs = _draw(seed, batch=1, heads=heads, kv_heads=heads, length=seq, dim=dim, value_dim=dim,
                   rule="gated_delta", per_dim=False, state=False)
    return Case("example", inputs, {"update_rule": "gated_delta"}, seed=seed)


def _reference(q: Any, k: Any, v: Any, /, **params: Any) -> Any:
    """The token-by-token recurrence (array-API path)."""
    return linear_recurrent_attention(q, k, v, **{**params, "form": "recurrent"})


register(Mechanism(
    key="linear_recurrent",
    function=linear_recurrent_attention,
    family="K. state-recurrent linear",
    paper="ONNX LinearAttention (opset 27); RetNet (Sun et al. 2023 §2.1), GLA (Yang et al. 2024 §3), "
          "DeltaNet (Yang et al. 2024 §2), Gated DeltaNet (Yang et al. 2025 §3)",
    params={
        "update_rule": "'linear' | 'gated' (RetNet, simple GLA, GLA) | 'delta' (DeltaNet) | "
                       "'gated_delta' (Gated DeltaNet, KDA-style per-dim)",
        "decay": "log multipliers <= 0, (..., G, T) per head or (..., G, T, D) per key dim (gated rules)",
        "beta": "(..., G, T) in [0, 2] (delta rules)",
        "initial_state": "(..., G, D, E), zeros if None",
        "scale": "read-time scale, None -> 1/sqrt(D)",
        "return_state": "also return the final state (..., G, D, E)",
        "form": "'recurrent' | 'chunked' (WY/UT for delta) | 'parallel' (T x T) | 'auto'",
        "chunk_size": "chunk length of 'chunked' (any int >= 1)",
    },
    cases=_cases,
    reference=_reference,
    row_separable=False,
    example=_example,
    vjp=_vjp,
    returns_state=True,
))

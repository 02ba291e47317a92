"""Per-sequence positions shared by the packed (varlen) and paged-cache mechanisms.

Both compile to the engine with one mask term and one optional bias term built from the *relative
position* ``r = j' − i' − δ`` of key j to query i inside their own sequence (``i'``, ``j'`` positions
within the sequence, ``δ`` the alignment offset of that sequence: ``S_b − L_b`` bottom-right, 0
top-left). A pair is visible when query and key share a sequence, the key is a real token, and

- causal: ``r ≤ 0``;
- window ``(left, right)``: ``−left ≤ r ≤ right`` (−1 or ``None`` leaves a side unbounded);

ALiBi adds ``−m_h·|r|`` (flash-attn's ``alibi_slopes``: the distance to the aligned diagonal).
"""

from __future__ import annotations

from typing import Any

from reflex.backends import device as device_of
from reflex.backends import namespace
from reflex.mechanisms._patterns import check_window

__all__ = ["window_sides", "visible", "SequenceAlibi", "check_sinks", "check_slopes", "host_ints", "sequence_vjp"]


def window_sides(window: Any, causal: bool) -> tuple[int, int]:
    """``(left, right)`` with −1 for an unbounded side; ``None`` is accepted for −1 (FA4's spelling).
    Causal caps the right side at 0 (as flash-attn)."""
    if isinstance(window, (tuple, list)):
        window = tuple(-1 if side is None else side for side in window)
    left, right = check_window(window)
    if causal:
        right = 0 if right < 0 else min(right, 0)
    return left, right


def visible(rel: Any, left: int, right: int) -> Any:
    """The window/causal condition on relative positions ``rel`` (−1 = unbounded side)."""
    xp = namespace(rel)
    ok = xp.ones(rel.shape, dtype=xp.bool, device=device_of(rel))
    if left >= 0:
        ok = ok & (rel >= -left)
    if right >= 0:
        ok = ok & (rel <= right)
    return ok


class SequenceAlibi:
    """The ALiBi bias ``−m_h·|r|`` as a differentiable engine term (``params``: the slopes).

    ``relative(rows, cols)`` gives ``r``; ``head_shape`` reshapes the slopes ``(H,)`` to broadcast
    against it (``(H, 1, 1)`` for ``r (l, s)``, ``(1, H, 1, 1)`` for ``r (B, 1, l, s)``). Backward:
    ``d m_h = −Σ d b · |r|`` over every axis but the head.
    """

    def __init__(self, slopes: Any, relative: Any, head_shape: tuple[int, ...]) -> None:
        self.slopes, self.relative, self.head_shape = slopes, relative, head_shape
        self.params = {"alibi_slopes": slopes}

    def _distance(self, rows: Any, cols: Any) -> Any:
        xp = namespace(self.slopes)
        return xp.astype(xp.abs(self.relative(rows, cols)), self.slopes.dtype)

    def __call__(self, rows: Any, cols: Any) -> Any:
        xp = namespace(self.slopes)
        return -xp.reshape(self.slopes, self.head_shape) * self._distance(rows, cols)

    def vjp(self, rows: Any, cols: Any, d_value: Any) -> dict[str, Any]:
        xp = namespace(self.slopes)
        grad = -d_value * self._distance(rows, cols)  # (..., H, l, s): the head axis is third from the end
        others = tuple(i for i in range(grad.ndim) if i != grad.ndim - 3)
        return {"alibi_slopes": xp.sum(grad, axis=others)}


def _check_per_head(name: str, x: Any, heads: int, xp: Any, device: Any, dtype: Any) -> Any:
    if x is None:
        return None
    if tuple(x.shape) != (heads,):
        raise ValueError(f"{name} must have shape (H,) = ({heads},); got {tuple(x.shape)}")
    if device_of(x) != device:
        raise ValueError(f"{name} is on device {device_of(x)}; q is on {device}")
    return xp.astype(x, dtype)


def check_sinks(sinks: Any, heads: int, xp: Any, device: Any, dtype: Any) -> Any:
    """Per-head sink logits ``(H,)`` in the compute dtype (or None)."""
    return _check_per_head("sinks", sinks, heads, xp, device, dtype)


def check_slopes(slopes: Any, heads: int, xp: Any, device: Any, dtype: Any) -> Any:
    """Per-head ALiBi slopes ``(H,)`` in the compute dtype (or None)."""
    return _check_per_head("alibi_slopes", slopes, heads, xp, device, dtype)


def host_ints(x: Any) -> list[int]:
    """A small 1-D integer array as Python ints (sequence bookkeeping is host-side)."""
    return [int(x[i]) for i in range(int(x.shape[0]))]


def sequence_vjp(function: Any, to_inputs: Any) -> Any:
    """The VJP of a packed/paged mechanism: its one engine call's backward, mapped back to the inputs.

    ``to_inputs(inputs, params, gradients) -> dict`` maps the engine's ``dq``, ``dk``, ``dv`` (reflex's
    ``(..., H, L, D)`` layout) to the mechanism's own layout. Sinks: the chain rule of the merge
    (:func:`reflex.mechanisms._merge.sinks_vjp`); ALiBi slopes: :class:`SequenceAlibi`'s gradient.
    """
    from reflex.mechanisms._engine.record import run_recorded
    from reflex.mechanisms._merge import sinks_vjp

    def vjp(inputs: dict, d_out: Any, *, d_lse: Any = None, **params: Any) -> dict[str, Any]:
        inner = {name: x for name, x in inputs.items() if name != "sinks"}
        _, calls = run_recorded(function, inner, params, return_lse=True)
        (call,) = [c for c in calls if c.p is not None]
        xp = call.p.xp
        d_engine = xp.astype(to_inputs.engine_layout(d_out), call.p.q.dtype)
        d_lse_engine = None if d_lse is None else xp.astype(d_lse, call.p.q.dtype)
        grads: dict[str, Any] = {}
        if inputs.get("sinks") is not None:
            sinks = xp.astype(inputs["sinks"], call.p.q.dtype)
            d_engine, d_lse_engine, grads["sinks"] = sinks_vjp(xp, call.out, call.lse, sinks, d_engine, d_lse_engine)
        g = call.backward(d_engine, d_lse_engine)
        grads.update(to_inputs(inputs, params, g))
        if inputs.get("alibi_slopes") is not None:
            grads["alibi_slopes"] = g.bias[0]["alibi_slopes"]
        return grads

    return vjp

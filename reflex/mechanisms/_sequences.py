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

__all__ = ["window_sides", "visible", "alibi_term_values", "check_sinks", "check_slopes", "host_ints"]


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


def alibi_term_values(slopes: Any, rel: Any, head_axis_shape: tuple[int, ...]) -> Any:
    """``−m_h·|rel|`` with ``slopes (H,)`` reshaped to ``head_axis_shape`` (e.g. ``(H, 1, 1)``)."""
    xp = namespace(slopes)
    return -xp.reshape(slopes, head_axis_shape) * xp.astype(xp.abs(rel), slopes.dtype)


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

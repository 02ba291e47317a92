"""Inputs of the engine: validation and casting of q, k, v, mask/bias terms, key lists and options.

Every check raises ``TypeError``/``ValueError`` naming the argument with the expected and the actual
shape or dtype. Nothing here modifies its inputs; :func:`prepare` casts to the compute dtype without
copying arrays that already have it (so the kernels never write into ``Prepared.q/k/v``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from reflex.backends import device as device_of
from reflex.backends import namespace

__all__ = ["Prepared", "prepare", "check_term", "check_indices", "check_array", "resolve_dtype", "resolve_scale",
           "resolve_softcap", "check_padding_mask"]


@dataclass(frozen=True)
class Prepared:
    """Validated q, k, v cast to the compute dtype, with their namespace and shapes.

    ``q (..., H, L, D)``, ``k (..., G, S, D)``, ``v (..., G, S, E)``; ``batch`` is ``...``.
    """

    xp: Any
    device: Any
    q: Any
    k: Any
    v: Any
    batch: tuple[int, ...]
    heads: int
    kv_heads: int
    length: int
    key_length: int
    dim: int
    value_dim: int

    @property
    def group(self) -> int:
        """Query heads per key/value head, H // G."""
        return self.heads // self.kv_heads

    @property
    def score_shape(self) -> tuple[int, ...]:
        """``(..., H, L, S)``: the shape masks and biases broadcast to."""
        return (*self.batch, self.heads, self.length, self.key_length)


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.").removeprefix("array_api_strict.")


def resolve_dtype(xp: Any, compute_dtype: Any) -> Any:
    """The compute dtype: ``xp.float64`` by default; a dtype object or a name like ``"float32"``."""
    if compute_dtype is None:
        return xp.float64
    if isinstance(compute_dtype, str):
        if compute_dtype not in ("float64", "float32", "float16", "bfloat16") or not hasattr(xp, compute_dtype):
            raise ValueError(f"compute_dtype must name a floating dtype of {xp.__name__}; got {compute_dtype!r}")
        return getattr(xp, compute_dtype)
    return compute_dtype


def _check_float(xp: Any, name: str, x: Any) -> None:
    if not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(f"{name} must have a real floating dtype; got {_dtype_name(x.dtype)}")


def prepare(q: Any, k: Any, v: Any, *, compute_dtype: Any = None) -> Prepared:
    """Validate ``q (..., H, L, D)``, ``k (..., G, S, D)``, ``v (..., G, S, E)`` and cast them.

    Raises ``TypeError`` for non-float dtypes or mixed array libraries and ``ValueError`` naming the
    argument with expected vs actual shape for every mismatch. The inputs are not modified.
    """
    xp = namespace(q, k, v)
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_float(xp, name, x)
        if x.ndim < 3:
            raise ValueError(f"{name} must have shape (..., heads, length, dim) with at least 3 axes; got shape {tuple(x.shape)}")
    dev = device_of(q)
    for name, x in (("k", k), ("v", v)):
        if device_of(x) != dev:
            raise ValueError(f"{name} is on device {device_of(x)}; q is on {dev}: pass all inputs on one device")
    if not (q.ndim == k.ndim == v.ndim):
        raise ValueError(f"q, k, v must have the same number of axes; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    batch = tuple(q.shape[:-3])
    for name, x in (("k", k), ("v", v)):
        if tuple(x.shape[:-3]) != batch:
            raise ValueError(f"{name} has batch shape {tuple(x.shape[:-3])}; q has {batch} (batch axes are not broadcast)")
    heads, length, dim = (int(n) for n in q.shape[-3:])
    kv_heads, key_length, kdim = (int(n) for n in k.shape[-3:])
    if kdim != dim:
        raise ValueError(f"k has head dim {kdim}; q has {dim}: they must match")
    if tuple(v.shape[-3:-1]) != (kv_heads, key_length):
        raise ValueError(f"v has (heads, length) {tuple(v.shape[-3:-1])}; k has {(kv_heads, key_length)}: they must match")
    if kv_heads == 0 or heads % kv_heads != 0:
        raise ValueError(f"k has {kv_heads} heads; q has {heads}, which is not a multiple")
    dtype = resolve_dtype(xp, compute_dtype)
    if not xp.isdtype(dtype, "real floating"):
        raise TypeError(f"compute_dtype must be a real floating dtype; got {getattr(dtype, '__name__', None) or _dtype_name(dtype)}")
    return Prepared(
        xp=xp, device=dev,
        q=xp.astype(q, dtype, copy=False), k=xp.astype(k, dtype, copy=False), v=xp.astype(v, dtype, copy=False),
        batch=batch, heads=heads, kv_heads=kv_heads, length=length, key_length=key_length,
        dim=dim, value_dim=int(v.shape[-1]),
    )


def check_term(p: Prepared, name: str, term: Any, *, boolean: bool) -> Any:
    """Validate an array mask/bias against ``(..., H, L, S)`` and cast a bias to the compute dtype.

    Callables pass through (they are checked where they are evaluated).
    """
    if term is None or callable(term) and not hasattr(term, "shape"):
        return term
    xp = p.xp
    if namespace(term) is not xp:
        raise TypeError(f"{name} comes from a different array library than q")
    target = p.score_shape
    shape = tuple(int(n) for n in term.shape)
    fits = len(shape) <= len(target) and all(a in (1, b) for a, b in zip(shape[::-1], target[::-1]))
    if not fits:
        raise ValueError(f"{name} of shape {shape} does not broadcast to (..., H, L, S) = {target}")
    if device_of(term) != p.device:
        raise ValueError(f"{name} is on device {device_of(term)}; q is on {p.device}")
    if boolean:
        if not xp.isdtype(term.dtype, "bool"):
            raise TypeError(f"{name} must be a boolean array (True = attend); got dtype {_dtype_name(term.dtype)}")
        return term
    if not xp.isdtype(term.dtype, "real floating"):
        raise TypeError(f"{name} must be a real floating array (additive); got dtype {_dtype_name(term.dtype)}")
    return xp.astype(term, p.q.dtype)


def check_indices(p: Prepared, indices: Any, name: str = "indices") -> Any:
    """Validate a key index list broadcastable to ``(..., H, L, K)``; values in ``[-1, S)``."""
    xp = p.xp
    if namespace(indices) is not xp:
        raise TypeError(f"{name} comes from a different array library than q")
    if not xp.isdtype(indices.dtype, "integral"):
        raise TypeError(f"{name} must be an integer array of key positions; got dtype {_dtype_name(indices.dtype)}")
    if device_of(indices) != p.device:
        raise ValueError(f"{name} is on device {device_of(indices)}; q is on {p.device}")
    target = (*p.batch, p.heads, p.length)
    shape = tuple(int(n) for n in indices.shape)
    lead = shape[:-1]
    if len(shape) < 1 or len(lead) > len(target) or not all(a in (1, b) for a, b in zip(lead[::-1], target[::-1])):
        raise ValueError(f"{name} of shape {shape} does not broadcast to (..., H, L, K) with (..., H, L) = {target}")
    if shape[-1] > 0:
        lo, hi = int(xp.min(indices)), int(xp.max(indices))
        if lo < -1 or hi >= p.key_length:
            raise ValueError(f"{name} must lie in [-1, {p.key_length}) (-1 = padding); got values in [{lo}, {hi}]")
    return xp.astype(indices, xp.int64)


def resolve_scale(scale: Any, dim: int) -> float:
    """``scale`` as a float; ``None`` → 1/√D."""
    if scale is None:
        return 1.0 / math.sqrt(dim) if dim > 0 else 1.0
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite real number or None; got {scale!r}")
    return float(scale)


def resolve_softcap(softcap: Any) -> float | None:
    """``softcap`` as a positive float, or None."""
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not softcap > 0 or not math.isfinite(softcap):
        raise ValueError(f"softcap must be a positive finite number or None; got {softcap!r}")
    return float(softcap)


def check_array(xp: Any, device: Any, dtype: Any, name: str, x: Any, *, against: str = "q") -> Any:
    """An option array (weights, tables, projections, ...) next to ``against``: same array library
    and device, real floating; returned in the compute ``dtype``. Shapes are the caller's to check."""
    if namespace(x) is not xp:
        raise TypeError(f"{name} comes from a different array library than {against}")
    if device_of(x) != device:
        raise ValueError(f"{name} is on device {device_of(x)}; {against} is on {device}")
    if not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(f"{name} must be a real floating array; got dtype {_dtype_name(x.dtype)}")
    return xp.astype(x, dtype, copy=False)


def check_padding_mask(p: Prepared, mask: Any, name: str = "attention_mask") -> Any:
    """A Hugging Face-style padding mask: boolean ``(..., S)`` with q's batch axes, True = real token.

    Returns it unchanged (``None`` passes through). Raises ``TypeError`` for another library or a
    non-boolean dtype (HF's 0/1 integer masks: pass ``mask == 1``) and ``ValueError`` for another
    shape or device.
    """
    if mask is None:
        return None
    xp = p.xp
    if namespace(mask) is not xp:
        raise TypeError(f"{name} comes from a different array library than q")
    if not xp.isdtype(mask.dtype, "bool"):
        raise TypeError(f"{name} must be a boolean array (True = real token; for Hugging Face's 0/1 mask pass "
                        f"mask == 1); got dtype {_dtype_name(mask.dtype)}")
    target = (*p.batch, p.key_length)
    if tuple(int(n) for n in mask.shape) != target:
        raise ValueError(f"{name} must have shape (..., S) = {target}; got {tuple(mask.shape)}")
    if device_of(mask) != p.device:
        raise ValueError(f"{name} is on device {device_of(mask)}; q is on {p.device}")
    return mask

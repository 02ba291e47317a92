"""Rounding host float64 arrays to a lower precision (float32, float16, bfloat16, TF32, float8), bit
exactly, for :mod:`reflex.testing`'s low-precision baselines and floors."""

from __future__ import annotations

from typing import Any

import numpy

__all__ = ["round_to", "ml_dtype"]


def round_to(x: numpy.ndarray, dtype: str) -> numpy.ndarray:
    """``x`` (float64) rounded to ``dtype`` (round to nearest even) and returned as float64.

    bfloat16 has no NumPy type: the float32 value's low 16 bits are rounded away (after the
    float64 → float32 rounding; the double rounding can move a tie by one bfloat16 ulp, which is
    immaterial for the floor it serves)."""
    if dtype == "float64":
        return x
    if dtype.startswith("float8_"):
        with numpy.errstate(over="ignore", invalid="ignore"):
            return x.astype(ml_dtype(dtype)).astype(numpy.float64)
    if dtype not in ("bfloat16", "tf32"):
        with numpy.errstate(over="ignore"):
            return x.astype(dtype).astype(numpy.float64)
    dropped = 16 if dtype == "bfloat16" else 13  # float32 keeps 23 mantissa bits, bfloat16 7, TF32 10
    with numpy.errstate(over="ignore"):
        single = numpy.ascontiguousarray(x, dtype=numpy.float32)
    bits = single.view(numpy.uint32).astype(numpy.uint64)
    rounded = (bits + (1 << (dropped - 1)) - 1 + ((bits >> dropped) & 1)) & (0xFFFFFFFF ^ ((1 << dropped) - 1))
    out = rounded.astype(numpy.uint32).view(numpy.float32).astype(numpy.float64)
    return numpy.where(numpy.isfinite(single), out, single.astype(numpy.float64))


def ml_dtype(name: str) -> Any:
    """The NumPy dtype of a float8 format, from ``ml_dtypes`` (the ``float8`` extra)."""
    try:
        import ml_dtypes
    except ImportError:
        raise ValueError(f"dtype {name} needs the ml_dtypes package: pip install 'reflex-attention[float8]'") from None
    return getattr(ml_dtypes, name)

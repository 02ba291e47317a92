"""The option specs of the typed-option layer (:mod:`reflex.mechanisms._options`): typed checks of
booleans, integers, reals, seeds, ``causal`` and ``compute_dtype``, and the table of specs by
parameter name that every public function shares. Every error names the argument, what was expected
and what came.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

from reflex.backends import is_real_floating_dtype

__all__ = ["OptionTypeError", "Spec", "Bool", "Int", "IntOrPair", "Real", "Seed", "Causal", "ComputeDtype", "MAX_INT",
           "ALIGNMENTS", "BY_NAME", "BOOLEAN_ARRAYS", "INTEGER_ARRAYS", "check_bool", "check_int", "check_real"]

# Integer options (sizes, counts, offsets) must lie within int32: every kernel indexes with it, and a
# size beyond it could never be allocated anyway.
MAX_INT = 2**31 - 1
ALIGNMENTS = ("top_left", "bottom_right")


def _integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and type(value).__name__ != "bool_"


def _boolean(value: Any) -> bool:
    return isinstance(value, bool) or type(value).__name__ == "bool_"


class OptionTypeError(TypeError, ValueError):
    """An option of the wrong type (``causal="False"``, ``dilation=2.0``): a ``TypeError`` that is also a
    ``ValueError``, so callers catching either see it."""


def check_bool(name: str, value: Any) -> bool:
    """``value`` as a bool; anything but ``bool``/NumPy bool raises ``TypeError``."""
    if not _boolean(value):
        raise OptionTypeError(f"{name} must be a bool (True or False); got {value!r} ({type(value).__name__})")
    return bool(value)


def check_int(name: str, value: Any, *, minimum: int | None = None, maximum: int = MAX_INT) -> int:
    """``value`` as an int in ``[minimum, maximum]``; floats and bools raise ``TypeError``."""
    if not _integer(value):
        raise OptionTypeError(f"{name} must be an int; got {value!r} ({type(value).__name__})")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value}")
    if value > maximum:
        raise ValueError(f"{name} must be an int <= {maximum}; got {value}")
    return value


def check_real(name: str, value: Any, *, minimum: float | None = None, positive: bool = False) -> float:
    """``value`` as a finite float (``> 0`` if ``positive``, ``≥ minimum`` if given)."""
    if _boolean(value) or not isinstance(value, numbers.Real):
        raise OptionTypeError(f"{name} must be a real number; got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0; got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value!r}")
    return value


@dataclass(frozen=True)
class Spec:
    """How one keyword option is checked; ``optional`` lets ``None`` through."""

    optional: bool = False

    def check(self, name: str, value: Any) -> Any:
        if value is None and self.optional:
            return None
        return self._check(name, value)

    def _check(self, name: str, value: Any) -> Any:
        raise NotImplementedError


@dataclass(frozen=True)
class Bool(Spec):
    def _check(self, name: str, value: Any) -> Any:
        return check_bool(name, value)


@dataclass(frozen=True)
class Int(Spec):
    minimum: int | None = 0
    maximum: int = MAX_INT

    def _check(self, name: str, value: Any) -> Any:
        return check_int(name, value, minimum=self.minimum, maximum=self.maximum)


@dataclass(frozen=True)
class IntOrPair(Spec):
    """An int, or a pair of ints (e.g. a ``(query, key)`` block size; ``any_length``: a tuple of factors)."""

    minimum: int | None = 0
    maximum: int = MAX_INT
    any_length: bool = False

    def _check(self, name: str, value: Any) -> Any:
        if isinstance(value, (tuple, list)):
            if len(value) != 2 and not (self.any_length and len(value) >= 1):
                raise ValueError(f"{name} must be an int or {'a non-empty tuple' if self.any_length else 'a pair'} "
                                 f"of ints; got {value!r}")
            return tuple(check_int(f"{name}[{i}]", v, minimum=self.minimum, maximum=self.maximum)
                         for i, v in enumerate(value))
        return check_int(name, value, minimum=self.minimum, maximum=self.maximum)


@dataclass(frozen=True)
class Real(Spec):
    positive: bool = False
    minimum: float | None = None

    def _check(self, name: str, value: Any) -> Any:
        return check_real(name, value, minimum=self.minimum, positive=self.positive)


@dataclass(frozen=True)
class Seed(Spec):
    """An ``int ≥ 0`` or a tuple of them (``reflex.random`` seeds)."""

    def _check(self, name: str, value: Any) -> Any:
        parts = value if isinstance(value, tuple) else (value,)
        for part in parts:
            if not _integer(part) or int(part) < 0:
                raise OptionTypeError(f"{name} must be an int >= 0 or a tuple of them; got {value!r}")
        return value


@dataclass(frozen=True)
class Causal(Spec):
    """``causal``: ``False | True | "top_left" | "bottom_right"``; ``top_left_only`` refuses bottom-right."""

    top_left_only: bool = False

    def _check(self, name: str, value: Any) -> Any:
        if value is None:
            return False
        if _boolean(value):
            return bool(value)
        if isinstance(value, str) and value in ALIGNMENTS:
            if self.top_left_only and value == "bottom_right":
                raise ValueError(f"{name}='bottom_right' is not defined for this mechanism: it supports causal=True "
                                 f"(= 'top_left', key j <= i) or False")
            return True if self.top_left_only else value
        raise OptionTypeError(f"{name} must be False, True (= 'top_left'), 'top_left' (key j <= i) or 'bottom_right' "
                              f"(j <= i + S - L); got {value!r}")


@dataclass(frozen=True)
class ComputeDtype(Spec):
    """``compute_dtype``: ``None`` (float64), a floating dtype name, or a real floating dtype object."""

    def _check(self, name: str, value: Any) -> Any:
        if isinstance(value, str):
            if value not in ("float64", "float32", "float16", "bfloat16"):
                raise ValueError(f"{name} must name a real floating dtype (float64, float32, float16, bfloat16); "
                                 f"got {value!r}")
            return value
        if _boolean(value) or isinstance(value, numbers.Number) or not is_real_floating_dtype(value):
            shown = getattr(value, "__name__", None) or str(value).removeprefix("torch.")
            raise OptionTypeError(f"{name} must be a real floating dtype; got {shown} (e.g. float64, float32 or "
                                  f"numpy.longdouble; None means float64)")
        return value


# Options every mechanism that has them shares, by parameter name.
_COUNT = Int(minimum=1)
_NATURAL = Int(minimum=0)
BY_NAME: dict[str, Spec] = {
    **{name: Bool() for name in ("return_lse", "return_state", "return_weights", "return_average",
                                 "return_coefficients", "return_packed", "normalize", "symmetric",
                                 "include_self", "ring", "bidirectional", "enable_gqa")},
    **{name: _COUNT for name in ("block_size", "chunk_length", "n_buckets", "n_hashes", "num_landmarks", "num_projections", "num_samples", "topk", "levels",
                                 "kernel_size", "segment_length", "rate", "dilation", "max_distance", "num_heads",
                                 "num_kv_heads", "chunk_size", "factor")},
    "top_u": Int(minimum=0, optional=True),
    **{name: Int(minimum=1, optional=True) for name in ("num_clusters", "stride", "num_features")},
    "n_buckets": IntOrPair(minimum=1, any_length=True),
    **{name: _NATURAL for name in ("num_chunks_before", "num_chunks_after", "look_back", "memory_length",
                                   "compressed_length", "relay", "summary", "top_k")},
    **{name: Int(minimum=0, optional=True) for name in ("iterations", "num_random", "num_random_blocks",
                                                        "rotary_dim")},
    "query_offset": Int(minimum=None),
    "seed": Seed(optional=True),
    "scale": Real(optional=True),
    "softcap": Real(positive=True, optional=True),
    "eps": Real(minimum=0.0),
    "base": Real(positive=True),
    "ramp": Real(positive=True),
    "inverse_temperature": Real(),
    "beta_a": Real(),
    "beta_v": Real(),
    "alpha": Real(),
    "lowrank_scale": Real(optional=True),
    "causal": Causal(),
    "compute_dtype": ComputeDtype(optional=True),
}

# Array-valued keyword options of these names are boolean or integer; every other one is real floating.
BOOLEAN_ARRAYS = frozenset({"mask", "block_mask", "attention_mask", "dropout_mask", "global_mask"})
INTEGER_ARRAYS = frozenset({"indices", "indptr", "plan", "assignment", "global_indices", "sample_indices",
                            "key_positions", "positions", "block_table", "cache_seqlens",
                            "cu_seqlens_q", "cu_seqlens_k", "seqlens_q", "seqlens_k", "block_indices",
                            "key_leftpad"})

"""The mechanism registry: one record per mechanism, failing loudly on conflicts.

Each mechanism module builds a :class:`Mechanism` and calls :func:`register` at import time. The
registry is the single source of what reflex implements: the CLI lists it, the fixture generator
walks its case builders, and the tests check every record.

A *case builder* ``cases(size, seed)`` returns the named cases a mechanism wants tested and written
into golden fixtures: host NumPy inputs (every random array explicit) and JSON-able parameters.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

__all__ = ["Mechanism", "Case", "register", "get", "list_mechanisms", "SIZES"]

# Sizes a case builder understands, smallest first. Each maps to a rough (L, S, D) scale.
SIZES = ("tiny", "small", "medium", "large")


@dataclass(frozen=True)
class Case:
    """One named input set for a mechanism.

    ``inputs`` maps argument names to host NumPy arrays, passed positionally in ``positional``
    order and the rest as keywords; ``params`` are JSON-able keyword options.
    """

    variant: str
    inputs: Mapping[str, Any]
    params: Mapping[str, Any] = field(default_factory=dict)
    positional: tuple[str, ...] = ("q", "k", "v")
    seed: int = 0

    def call(self, mechanism: "Mechanism", convert: Callable[[Any], Any] = lambda a: a, **overrides: Any) -> Any:
        """Run ``mechanism`` on this case; ``convert`` moves each input to a backend."""
        args = [convert(self.inputs[name]) for name in self.positional]
        kwargs = {name: convert(value) for name, value in self.inputs.items() if name not in self.positional}
        kwargs.update(self.params)
        kwargs.update(overrides)
        return mechanism.function(*args, **kwargs)


@dataclass(frozen=True)
class Mechanism:
    """What reflex knows about one mechanism.

    - ``key``: registry name (``reflex.get(key)``), also the catalogue row.
    - ``function``: the public function, arrays positional and options keyword-only.
    - ``family``: catalogue section, e.g. ``"A. core"``, ``"B. position-sparse"``.
    - ``paper``: the reference(s), cited to the section where it matters.
    - ``params``: parameter name → one-line description.
    - ``cases``: ``cases(size, seed) -> list[Case]``, the case builder.
    - ``reference``: an independent dense path computing the same output (``None`` if none).
    - ``returns_lse``: whether ``return_lse=True`` is supported (restricted-softmax mechanisms).
    - ``row_separable``: output rows are independent given keys and values (shardable by query).
    - ``example``: ``example(seq, heads, dim, seed) -> Case`` for ``reflex run``; ``None`` means
      q, k, v of shape ``(1, heads, seq, dim)`` and default parameters.
    - ``pattern``: for restricted-softmax mechanisms, ``pattern(q, k, v, /, **params)`` returns the
      explicit boolean ``(..., H, L, S)`` mask (True = attended) that the mechanism's output equals
      ``full_attention`` under — the keys each query attended, for kernel authors and tests.
      Where a key can be attended more than once, it returns integer multiplicities instead.
    - ``vjp``: the reverse-mode derivative, ``vjp(inputs, d_out, *, d_lse=None, d_state=None,
      **params) -> dict[str, array]`` (``inputs`` maps every array argument's name to the caller's
      array); ``None`` when the mechanism has none. Called through :func:`reflex.vjp`, which
      validates its arguments and result.
    - ``returns_state``: whether ``return_state=True`` is supported (state-recurrent mechanisms;
      their VJP takes ``d_state``).
    """

    key: str
    function: Callable[..., Any]
    family: str
    paper: str
    params: Mapping[str, str]
    cases: Callable[[str, int], list[Case]]
    reference: Callable[..., Any] | None = None
    returns_lse: bool = False
    row_separable: bool = True
    example: Callable[[int, int, int, int], Case] | None = None
    pattern: Callable[..., Any] | None = None
    vjp: Callable[..., dict[str, Any]] | None = None
    returns_state: bool = False

    @property
    def has_vjp(self) -> bool:
        """Whether :func:`reflex.vjp` supports this mechanism."""
        return self.vjp is not None

    def example_case(self, seq: int, heads: int, dim: int, seed: int) -> Case:
        """Inputs for ``reflex run``: the mechanism's own example, or standard q, k, v."""
        if self.example is not None:
            return self.example(seq, heads, dim, seed)
        from reflex import random

        shape = (1, heads, seq, dim)
        inputs = {name: random.normal(shape, seed=(seed, i)) for i, name in enumerate(("q", "k", "v"))}
        return Case("example", inputs, {}, seed=seed)

    @property
    def summary(self) -> str:
        """The first line of the function's docstring."""
        doc = (self.function.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


_REGISTRY: dict[str, Mechanism] = {}


def register(mechanism: Mechanism) -> Mechanism:
    """Add ``mechanism``; a key registered twice raises ``ValueError``."""
    if not mechanism.key.isidentifier():
        raise ValueError(f"mechanism key must be an identifier; got {mechanism.key!r}")
    if mechanism.key in _REGISTRY:
        raise ValueError(f"mechanism {mechanism.key!r} is already registered (by {_REGISTRY[mechanism.key].function.__module__})")
    _REGISTRY[mechanism.key] = mechanism
    return mechanism


def get(key: str) -> Mechanism:
    """The record for ``key``; an unknown key raises ``KeyError`` with close matches."""
    _load_all()
    try:
        return _REGISTRY[key]
    except KeyError:
        close = difflib.get_close_matches(key, _REGISTRY, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown mechanism {key!r}{hint}") from None


def list_mechanisms() -> list[Mechanism]:
    """Every registered mechanism, sorted by family then key."""
    _load_all()
    return sorted(_REGISTRY.values(), key=lambda m: (m.family, m.key))


def _load_all() -> None:
    import reflex.mechanisms  # noqa: F401  (importing registers every mechanism)


def size_scale(size: str) -> int:
    """A base length for ``size``: tiny 4, small 16, medium 64, large 256."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}; got {size!r}")
    return 4 * int(math.pow(4, SIZES.index(size)))

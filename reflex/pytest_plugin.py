"""A pytest plugin for testing your attention kernels against reflex (registered as ``pytest11``).

Installing reflex installs the plugin; every pytest session in that environment gets:

- the ``oracle`` fixture (:class:`Oracle`): ``oracle(key, inputs, **params)`` is reflex's float64
  output for your inputs (any array library), ``oracle.assert_close(actual, key, inputs, ...)`` the
  per-dtype tolerance check, ``oracle.assert_flash_rule(actual, key, inputs, dtype=...)`` the
  FlashAttention rule (:func:`reflex.testing.assert_matches_oracle`);
- :func:`reflex_cases` for ``@pytest.mark.parametrize``: the registry's named cases of a
  mechanism (host NumPy inputs with GQA, L ≠ S, masks, ...), one test per case;
- the session-scoped ``reflex_fixture_set`` fixture: a golden fixture set
  (:func:`reflex.fixtures.generate`) written once per session into a temporary folder and loaded
  (:func:`reflex.fixtures.load`), or an existing set loaded from ``--reflex-fixtures PATH``. The ini
  options ``reflex_fixture_mechanisms`` (default ``full``), ``reflex_fixture_sizes`` (default
  ``tiny``) and ``reflex_fixture_seed`` (default 0) choose what is generated.

Importing this module imports only pytest: reflex itself is imported when a fixture or
:func:`reflex_cases` is first used, so the plugin costs nothing in sessions that do not use it.
A complete example: ``examples/test_with_reflex_plugin.py``; disable the plugin with
``-p no:reflex``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import pytest

__all__ = ["Oracle", "OracleCase", "reflex_cases"]


@dataclass(frozen=True)
class OracleCase:
    """One registered case of mechanism ``key`` at ``size``: host NumPy float64 ``inputs`` (every
    random array explicit), JSON-able ``params``, and the names passed positionally."""

    key: str
    size: str
    variant: str
    inputs: Mapping[str, Any]
    params: Mapping[str, Any]
    positional: tuple[str, ...]
    seed: int

    @property
    def id(self) -> str:
        """``<key>-<variant>-<n>``, the fixture-set case id (n: the size's index)."""
        from reflex.fixtures import case_id

        return case_id(self.key, self.variant, self.size)

    def args(self, convert: Callable[[Any], Any] = lambda a: a) -> list[Any]:
        """The positional arrays (``q, k, v`` for most mechanisms), each passed through ``convert``."""
        return [convert(self.inputs[name]) for name in self.positional]

    def kwargs(self, convert: Callable[[Any], Any] = lambda a: a) -> dict[str, Any]:
        """The keyword arrays (masks, plans, weights, ...) through ``convert``, and the params."""
        arrays = {name: convert(a) for name, a in self.inputs.items() if name not in self.positional}
        return {**arrays, **self.params}

    def expected(self) -> Any:
        """reflex's float64 output on this case (host NumPy; the first element of a tuple result)."""
        return Oracle()(self.key, self.inputs, **self.params)


def reflex_cases(key: str, sizes: Iterable[str] | str = ("tiny",), *, seed: int = 0,
                 variants: Iterable[str] | None = None) -> list[Any]:
    """``pytest.param(OracleCase, id=case id)`` for every registered case of ``key`` at ``sizes``.

    ``sizes`` among ``tiny``, ``small``, ``medium``, ``large``; ``variants`` keeps only the named
    variants (``"causal"``, ``"gqa"``, ...). Raises ``KeyError`` for an unknown mechanism (with close
    matches) and ``ValueError`` for an unknown size or variant. Use as
    ``@pytest.mark.parametrize("case", reflex_cases("full", sizes=("tiny", "small")))``.
    """
    from reflex import registry

    mechanism = registry.get(key)
    sizes = [sizes] if isinstance(sizes, str) else list(sizes)
    for size in sizes:
        if size not in registry.SIZES:
            raise ValueError(f"size must be one of {', '.join(registry.SIZES)}; got {size!r}")
    cases = [OracleCase(key, size, c.variant, dict(c.inputs), dict(c.params), tuple(c.positional), c.seed)
             for size in sizes for c in mechanism.cases(size, seed)]
    if variants is not None:
        wanted = [variants] if isinstance(variants, str) else list(variants)
        known = sorted({c.variant for c in cases})
        unknown = [v for v in wanted if v not in known]
        if unknown:
            raise ValueError(f"{key} has no variant {unknown[0]!r}; its variants: {', '.join(known)}")
        cases = [c for c in cases if c.variant in wanted]
    return [pytest.param(case, id=case.id) for case in cases]


class Oracle:
    """reflex as a test oracle: float64 reference outputs and the comparison rules of
    :mod:`reflex.testing`, for inputs from any array library (they are brought to the host in
    float64 first, exactly, so the reference sees the values your kernel saw)."""

    def __call__(self, key: str, inputs: Any, **params: Any) -> Any:
        """reflex's float64 output of mechanism ``key`` (host NumPy).

        ``inputs``: a mapping name → array (the positional arrays by the function's signature, the
        rest as keywords), a sequence of the positional arrays, or an :class:`OracleCase` /
        fixture case (its params are used, ``params`` override them).
        """
        from reflex import registry
        from reflex.testing import _host

        mechanism = registry.get(key)
        args, kwargs, params = _split(mechanism, inputs, params)
        args = [_host_if_array(a, _host) for a in args]
        kwargs = {n: _host_if_array(a, _host) for n, a in kwargs.items()}
        result = mechanism.function(*args, **kwargs, **params)
        return _host(result[0] if isinstance(result, tuple) else result)

    def assert_close(self, actual: Any, key: str, inputs: Any, *, dtype: Any = None, atol: float | None = None,
                     rtol: float | None = None, **params: Any) -> None:
        """``reflex.testing.assert_close(actual, oracle(key, inputs, **params))``: the per-dtype
        tolerance (by default ``actual``'s dtype) element-wise."""
        from reflex.testing import assert_close

        assert_close(actual, self(key, inputs, **params), dtype=dtype, atol=atol, rtol=rtol, name=f"{key} output")

    def assert_flash_rule(self, actual: Any, key: str, inputs: Any, *, dtype: Any, factor: float = 2.0,
                          **params: Any) -> Any:
        """The FlashAttention rule (:func:`reflex.testing.assert_matches_oracle`); returns its measurements."""
        from reflex.testing import assert_matches_oracle

        return assert_matches_oracle(actual, key, inputs, params=params or None, dtype=dtype, factor=factor)


def _split(mechanism: Any, inputs: Any, params: Mapping[str, Any]) -> tuple[list[Any], dict[str, Any], dict[str, Any]]:
    """(positional arrays, keyword arrays, params) from a case, a mapping or a sequence."""
    if hasattr(inputs, "inputs") and hasattr(inputs, "params"):  # OracleCase, fixture case, registry Case
        params = {**inputs.params, **params}
        order, inputs = list(inputs.positional), inputs.inputs
    else:
        order = [p.name for p in inspect.signature(mechanism.function).parameters.values()
                 if p.kind is inspect.Parameter.POSITIONAL_ONLY]
    if isinstance(inputs, Mapping):
        missing = [n for n in order if n not in inputs]
        if missing:
            raise ValueError(f"inputs for {mechanism.key} lack {', '.join(missing)}; expected {', '.join(order)}")
        return [inputs[n] for n in order], {n: a for n, a in inputs.items() if n not in order}, dict(params)
    if isinstance(inputs, (list, tuple)):
        if len(inputs) > len(order):
            raise ValueError(f"{mechanism.key} takes {len(order)} positional arrays ({', '.join(order)}); got {len(inputs)}")
        return list(inputs), {}, dict(params)
    raise TypeError(f"inputs must be a case, a mapping name → array or a list of arrays; got {type(inputs).__name__}")


def _host_if_array(value: Any, host: Callable[[Any], Any]) -> Any:
    from reflex.backends import is_array

    return host(value) if is_array(value) else value


# --- pytest hooks and fixtures ---------------------------------------------------------------------

def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("reflex", "reflex attention oracle")
    group.addoption("--reflex-fixtures", metavar="PATH", default=None,
                    help="load this fixture set for the reflex_fixture_set fixture instead of generating one")
    parser.addini("reflex_fixture_mechanisms", "comma-separated mechanism keys reflex_fixture_set generates",
                  default="full")
    parser.addini("reflex_fixture_sizes", "comma-separated sizes reflex_fixture_set generates (tiny, small, ...)",
                  default="tiny")
    parser.addini("reflex_fixture_seed", "case seed reflex_fixture_set generates with", default="0")


def _listed(text: str) -> list[str]:
    return [part.strip() for part in str(text).split(",") if part.strip()]


@pytest.fixture
def oracle() -> Oracle:
    """reflex as a float64 oracle: ``oracle(key, inputs, **params)``, ``oracle.assert_close``,
    ``oracle.assert_flash_rule``."""
    return Oracle()


@pytest.fixture(scope="session")
def reflex_fixture_set(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A :class:`reflex.fixtures.FixtureSet`, generated once per session (or loaded from
    ``--reflex-fixtures``); iterate it for cases with ``inputs``, ``params``, ``output``, ``lse``."""
    from reflex import fixtures

    given = request.config.getoption("--reflex-fixtures")
    if given:
        return fixtures.load(given)
    folder = tmp_path_factory.mktemp("reflex-fixtures")
    fixtures.generate(folder, _listed(request.config.getini("reflex_fixture_mechanisms")),
                      _listed(request.config.getini("reflex_fixture_sizes")),
                      int(request.config.getini("reflex_fixture_seed")))
    return fixtures.load(folder)

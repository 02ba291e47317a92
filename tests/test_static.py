"""Static house rules: the array-API surface reflex uses, and who may import which library."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import array_api_strict
import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "reflex"
SOURCES = sorted(PACKAGE.rglob("*.py"))
# Host-side modules that work on NumPy by design (DESIGN.md layout).
HOST_MODULES = {"backends/__init__.py", "random.py", "fixtures.py", "testing.py", "cli.py", "show.py",
                "certify_cli.py"}


def _rel(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def _xp_attributes(tree: ast.AST) -> set[str]:
    """Dotted names used as ``xp.<name>`` / ``xp.linalg.<name>`` anywhere in a module."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain = []
            cur = node
            while isinstance(cur, ast.Attribute):
                chain.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name) and cur.id == "xp":
                names.add(".".join(reversed(chain)))
    return names


@pytest.mark.parametrize("path", SOURCES, ids=_rel)
def test_xp_calls_exist_in_the_standard(path):
    """Every ``xp.<name>`` must exist in array-api-strict: no NumPy-only calls on the CuPy path."""
    missing = []
    for dotted in sorted(_xp_attributes(ast.parse(path.read_text()))):
        obj = array_api_strict
        for part in dotted.split("."):
            if part == "__name__":
                break
            if not hasattr(obj, part):
                missing.append(dotted)
                break
            obj = getattr(obj, part)
    assert not missing, f"{_rel(path)} calls xp.{', xp.'.join(missing)}, not in the array API standard"


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("path", SOURCES, ids=_rel)
def test_import_rule(path):
    """numpy/cupy/array_api_compat only in backends (and host modules); numba only in numba_kernels."""
    rel = _rel(path)
    imports = _imports(path)
    if not rel.startswith("backends/numba_kernels/"):
        assert "numba" not in imports, f"{rel} imports numba; only reflex/backends/numba_kernels/ may"
    if not rel.startswith("backends/") and rel not in HOST_MODULES:
        bad = imports & {"numpy", "cupy", "array_api_compat", "torch"}
        assert not bad, f"{rel} imports {sorted(bad)}; use the xp namespace (reflex.backends)"


@pytest.mark.parametrize("path", SOURCES, ids=_rel)
def test_no_fastmath_or_global_randomness(path):
    text = path.read_text()
    assert not re.search(r"fastmath\s*=\s*True", text), f"{_rel(path)} uses fastmath"
    if _rel(path) != "random.py":
        assert not re.search(r"np\.random\.|numpy\.random\.|default_rng\(", text), f"{_rel(path)} draws randomness outside reflex.random"


def test_numba_is_imported_lazily():
    import subprocess
    import sys

    code = "import sys, reflex; reflex.full_attention; print('numba' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False", "importing reflex imported numba; import it lazily through reflex.backends.numba_kernels()"

"""The documentation a user has: links resolve inside the repository, nothing points outside it,
the README's code runs, the license matches pyproject."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(line.lstrip("#")) for line in path.read_text().splitlines() if line.startswith("#")}


def _links() -> list[tuple[Path, str]]:
    found = []
    for doc in DOCS:
        text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)  # links, not code
        found += [(doc, target) for target in LINK.findall(text)]
    return found


def test_docs_have_links():
    targets = {target for _, target in _links()}
    assert "docs/conventions.md" in targets and "LICENSE" in targets and "conventions.md" in targets


@pytest.mark.parametrize("doc, target", _links(), ids=lambda x: x.name if isinstance(x, Path) else x)
def test_every_relative_link_resolves(doc, target):
    if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
        return
    path, _, anchor = target.partition("#")
    resolved = (doc.parent / path).resolve() if path else doc
    assert resolved.exists(), f"{doc.name} links to {target}, which does not exist"
    assert resolved.is_relative_to(ROOT), f"{doc.name} links outside the repository: {target}"
    if anchor:
        assert anchor in _anchors(resolved), f"{doc.name} links to #{anchor}, not a heading of {resolved.name}"


def test_slug():
    assert _slug(" Layout: (B…, H, L, D) — heads before positions") == "layout-b-h-l-d--heads-before-positions"
    assert _slug("Matching public implementations") == "matching-public-implementations"


def test_nothing_points_outside_the_repository():
    """Users never have the project's ../shared notes: no doc, docstring, example or script names them."""
    pattern = re.compile(r"shared/|INTEROP\.md|DESIGN\.md|STYLE\.md")
    files = [*DOCS, *ROOT.glob("reflex/**/*.py"), *ROOT.glob("examples/*.py"), *ROOT.glob("scripts/**/*.py"),
             *ROOT.glob("scripts/*.sh")]
    hits = [f"{f.relative_to(ROOT)}:{n}" for f in files for n, line in enumerate(f.read_text().splitlines(), 1)
            if pattern.search(line)]
    assert not hits, hits


def test_license_is_the_declared_one():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == {"text": "MIT"}
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "WITHOUT WARRANTY OF ANY KIND" in text


def test_readme_states_what_users_need():
    readme = (ROOT / "README.md").read_text()
    assert "--index-url https://download.pytorch.org/whl/cpu" in readme  # torch's CPU build, anywhere
    assert 'jax.config.update("jax_enable_x64", True)' in readme
    assert "reflex.vjp(" in readme and "(B, L, H, D)" in readme and 'layout="blhd"' in readme
    assert "wrong answers, not an error" in readme
    conventions = (ROOT / "docs" / "conventions.md").read_text()
    for phrase in ("True = attend", "j ≤ i + S − L", "lse = −∞", "h // (H/G)", "wrong answers, not an error",
                   'layout="blhd"', "FloatingPointError", "Masked keys are inert"):
        assert phrase in conventions, phrase


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_readme_python_example_runs():
    first = _python_blocks(ROOT / "README.md")[0]
    assert "reflex.full_attention" in first
    done = subprocess.run([sys.executable, "-c", first], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_readme_jax_example_runs():
    pytest.importorskip("jax")
    (block,) = [b for b in _python_blocks(ROOT / "README.md") if "jax_enable_x64" in b]
    program = ("import numpy as np, reflex\n" + block.split("out =")[0]
               + "import jax.numpy as jnp\nrng = np.random.default_rng(0)\n"
               + "q_jax, k_jax, v_jax = (jnp.asarray(rng.standard_normal((1, 2, 5, 4))) for _ in range(3))\n"
               + "out =" + block.split("out =")[1]
               + "assert out.dtype == jnp.float64 and type(out).__module__.startswith('jax')\n"
               + "ref = reflex.full_attention(*(np.asarray(a) for a in (q_jax, k_jax, v_jax)), causal=True)\n"
               + "assert np.max(np.abs(np.asarray(out) - ref)) < 1e-13\n")
    done = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    without_x64 = ("import numpy as np, reflex, jax.numpy as jnp\nq = jnp.ones((1, 1, 2, 4))\n"
                   "reflex.full_attention(q, q, q)\n")
    done = subprocess.run([sys.executable, "-c", without_x64], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "jax_enable_x64" in done.stderr

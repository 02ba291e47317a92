"""reflex.show: ASCII renderings of registered patterns, and the no-matplotlib PNG fallback."""

from __future__ import annotations

import importlib.util

import pytest

import reflex
from reflex.show import ascii_grid, pattern_grid, show

KEYS = ["sliding_window", "dilated", "global", "random", "block_local", "strided", "bigbird", "longformer", "star",
        "axial", "sparse_pattern"]


@pytest.mark.parametrize("key", KEYS)
def test_every_position_sparse_key_renders(key):
    text, code = show(key, 16)
    lines = text.splitlines()
    assert code == 0 and lines[0].startswith(key)
    grid = lines[2:]
    assert all(set(line) <= set(".#0123456789+") for line in grid) and len({len(line) for line in grid}) == 1


def test_sliding_window_grid_is_the_band():
    grid, case = pattern_grid("sliding_window", 10)
    left, right = case.params["window"]
    assert grid == [[int(-left <= j - i <= right) for j in range(10)] for i in range(10)]
    assert ascii_grid([[0, 1, 2]]) == ".#2"


def test_png_needs_matplotlib(tmp_path):
    out = tmp_path / "p.png"
    text, code = show("sliding_window", 8, str(out))
    if importlib.util.find_spec("matplotlib") is None:
        assert code == 1 and "matplotlib is not installed" in text and not out.exists()
    else:
        assert code == 0 and out.exists()


def test_mechanism_without_pattern_is_an_error():
    assert reflex.get("full").pattern is None
    with pytest.raises(ValueError, match="no explicit pattern"):
        show("full", 8)

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


def test_cli_writes_the_png(tmp_path, capsys):
    """`reflex show KEY --out pattern.png` (the [plot] extra) writes a PNG of the L × S pattern."""
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    from reflex.cli import main

    out = tmp_path / "pattern.png"
    assert main(["show", "sliding_window", "--seq", "24", "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(str(out))
    assert image.ndim == 3 and min(image.shape[:2]) > 100
    assert image.min() < 0.2 and image.max() > 0.8  # attended (dark) and masked (light) cells both drawn


def test_cli_png_in_a_missing_folder_is_one_line(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from reflex.cli import main

    assert main(["show", "sliding_window", "--seq", "8", "--out", str(tmp_path / "absent" / "p.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("reflex show: cannot write ") and err.count("\n") == 1

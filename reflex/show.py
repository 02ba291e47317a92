"""Draw a mechanism's attention pattern: an ASCII grid, or a PNG when matplotlib is installed.

``reflex show KEY --seq 64 [--out pattern.png]``: the registry record's ``pattern`` evaluated on the
mechanism's example inputs (``L = S = seq``, one head) — rows are queries, columns keys. The PNG
needs matplotlib, the ``plot`` extra: ``pip install 'reflex-attention[plot]'``.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from reflex import registry
from reflex.backends import to_numpy

__all__ = ["pattern_grid", "ascii_grid", "save_png", "show"]

# Cell glyphs: not attended, attended once; a key attended m > 1 times (BigBird) prints m (9+ → '+').
EMPTY, FULL = ".", "#"


def pattern_grid(key: str, seq: int = 64, *, seed: int = 0) -> tuple[list[list[int]], registry.Case]:
    """The first batch item and head of ``key``'s pattern on its example inputs, as rows of ints."""
    mechanism = registry.get(key)
    if mechanism.pattern is None:
        raise ValueError(f"mechanism {key!r} has no explicit pattern to show (not a restricted softmax)")
    case = mechanism.example_case(seq, 1, 8, seed)
    args = [case.inputs[name] for name in case.positional]
    kwargs = {name: value for name, value in case.inputs.items() if name not in case.positional}
    pattern = to_numpy(mechanism.pattern(*args, **kwargs, **case.params))
    while pattern.ndim > 2:
        pattern = pattern[0]
    return [[int(x) for x in row] for row in pattern.tolist()], case


def ascii_grid(grid: list[list[int]]) -> str:
    """One text line per query row."""
    def glyph(m: int) -> str:
        return EMPTY if m == 0 else FULL if m == 1 else (str(m) if m < 10 else "+")

    return "\n".join("".join(glyph(m) for m in row) for row in grid)


def save_png(grid: list[list[int]], path: str, title: str) -> None:
    """Write the grid as an image with matplotlib (ImportError when it is not installed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 6))
    ax.imshow(grid, cmap="Greys", interpolation="nearest", vmin=0)
    ax.set_xlabel("key j")
    ax.set_ylabel("query i")
    ax.set_title(title)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)


def show(key: str, seq: int = 64, out: str | None = None) -> tuple[str, int]:
    """``(text, exit code)`` for ``reflex show``: header and ASCII grid; the PNG when asked and possible."""
    grid, case = pattern_grid(key, seq)
    attended = sum(1 for row in grid for m in row if m)
    cells = max(1, sum(len(row) for row in grid))
    params = ", ".join(f"{k}={v}" for k, v in case.params.items())
    arrays = ", ".join(f"{k} {tuple(a.shape)}" for k, a in case.inputs.items() if k not in case.positional)
    header = [f"{key}  L={len(grid)} S={len(grid[0]) if grid else 0}  {params}" + (f"  [{arrays}]" if arrays else ""),
              f"attended {attended}/{cells} = {attended / cells:.1%}   ({FULL} attended, {EMPTY} masked; rows = queries)"]
    text = "\n".join(header) + "\n" + ascii_grid(grid)
    code = 0
    if out is not None:
        if importlib.util.find_spec("matplotlib") is None:
            text += (f"\nmatplotlib is not installed: no image written to {out} "
                     "(pip install 'reflex-attention[plot]', or pip install matplotlib)")
            code = 1
        else:
            save_png(grid, out, f"{key} ({params})")
            text += f"\nwrote {out}"
    return text, code


def _cmd_show(args: Any) -> int:
    """The ``reflex show`` subcommand (wired in :mod:`reflex.cli`)."""
    try:
        text, code = show(args.key, args.seq, args.out)
    except (KeyError, ValueError) as err:
        import sys

        print(f"reflex: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    except OSError as err:  # --out in a missing folder, no permission, ...
        import sys

        print(f"reflex show: cannot write {args.out}: {err.strerror or err}", file=sys.stderr)
        return 2
    print(text)
    return code


def _positive_int(text: str) -> int:
    from reflex.cli import _positive_int as parse

    return parse(text)


def add_parser(sub: Any) -> None:
    """Register ``show`` on the CLI's subparsers."""
    parser = sub.add_parser("show", help="draw a mechanism's attention pattern (ASCII, or PNG with matplotlib)")
    parser.add_argument("key", help="mechanism key (see `reflex list`)")
    parser.add_argument("--seq", type=_positive_int, default=64, help="sequence length L = S (default 64)")
    parser.add_argument("--out", default=None, help="write a PNG here (needs matplotlib: the [plot] extra)")
    parser.set_defaults(handler=_cmd_show)

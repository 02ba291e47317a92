#!/usr/bin/env python3
"""Write a golden fixture set: ``python scripts/generate_fixtures.py --out DIR [--mechanisms k1,k2] [--sizes tiny,small] [--seed S]``.

A thin wrapper over ``reflex fixtures generate`` (same options — also ``--lengths``, ``--head-dims``,
``--heads``, ``--kv-heads``, ``--batch``, ``--dtypes``, ``--format``, ``--quiet`` —, same exit codes);
the format is described in ``docs/fixtures.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from reflex.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["fixtures", "generate", *sys.argv[1:]]))

#!/usr/bin/env python3
"""Benchmarks, side by side with the peers in one run: ``python scripts/bench.py SUITE [options]``.

Each suite is a module ``scripts/benchmarks/<suite>.py`` with ``add_arguments(parser)`` and
``run(args)``; ``python scripts/bench.py --list`` names them. Figures are for closing notes and
READMEs, never assertions: these machines are small and noisy.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchmarks  # noqa: E402  (scripts/benchmarks)


def main() -> int:
    suites = sorted(info.name for info in pkgutil.iter_modules(benchmarks.__path__) if not info.name.startswith("_"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="list the suites")
    sub = parser.add_subparsers(dest="suite")
    for name in suites:
        module = importlib.import_module(f"benchmarks.{name}")
        suite_parser = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        module.add_arguments(suite_parser)
        suite_parser.set_defaults(module=module)
    args = parser.parse_args()
    if args.list or args.suite is None:
        print("\n".join(suites))
        return 0
    return args.module.run(args) or 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The ``reflex`` command line: ``reflex list`` and ``reflex run KEY``."""

from __future__ import annotations

import argparse
import hashlib
import inspect
import sys
import time
from typing import Any, Sequence

import numpy

from reflex import registry
from reflex.backends import BACKENDS, backend_namespace, from_numpy, library_name, to_numpy

__all__ = ["main"]


def _cmd_list(args: argparse.Namespace) -> int:
    rows = [(m.key, m.family, m.summary, m.paper) for m in registry.list_mechanisms()]
    widths = [max(len(r[i]) for r in rows + [("key", "family", "summary", "paper")]) for i in range(2)]
    print(f"{'key':<{widths[0]}}  {'family':<{widths[1]}}  summary")
    for key, family, summary, _ in rows:
        print(f"{key:<{widths[0]}}  {family:<{widths[1]}}  {summary}")
    print(f"{len(rows)} mechanisms")
    return 0


def _lookup(key: str) -> registry.Mechanism | None:
    try:
        return registry.get(key)
    except KeyError as err:
        print(f"reflex: {err.args[0]}", file=sys.stderr)
        return None


def _cmd_run(args: argparse.Namespace) -> int:
    mechanism = _lookup(args.key)
    if mechanism is None:
        return 2
    try:
        xp, device = backend_namespace(args.backend)
    except ValueError as err:
        print(f"reflex: {err}", file=sys.stderr)
        return 2
    case = mechanism.example_case(args.seq, args.heads, args.dim, args.seed)
    overrides: dict[str, Any] = {}
    accepts = inspect.signature(mechanism.function).parameters
    if "implementation" in accepts:
        overrides["implementation"] = args.implementation
    elif args.implementation != "auto":
        print(f"reflex: {args.key} has no implementation choice", file=sys.stderr)
        return 2
    convert = (lambda a: from_numpy(a, xp, device) if isinstance(a, numpy.ndarray) else a)
    start = time.perf_counter()
    result = case.call(mechanism, convert, **overrides)
    out = result[0] if isinstance(result, tuple) else result
    host = to_numpy(out)  # waits for the device
    elapsed = time.perf_counter() - start
    shapes = ", ".join(f"{name} {tuple(a.shape)}" for name, a in case.inputs.items() if hasattr(a, "shape"))
    digest = hashlib.sha256(numpy.ascontiguousarray(host, dtype=numpy.float64).tobytes()).hexdigest()[:16]
    print(f"mechanism       {mechanism.key}")
    print(f"inputs          {shapes}")
    print(f"output          {tuple(host.shape)} {host.dtype}")
    print(f"backend         {args.backend} ({library_name(out)}, device {device})")
    print(f"implementation  {overrides.get('implementation', 'n/a')}")
    print(f"wall time       {elapsed:.4f} s")
    print(f"checksum        sha256:{digest}  sum {float(numpy.sum(host)):.17g}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reflex", description="Reference attention mechanisms: list, run, fixtures.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the registered mechanisms as a table").set_defaults(handler=_cmd_list)
    run = sub.add_parser("run", help="run a mechanism on generated inputs")
    run.add_argument("key", help="mechanism key (see `reflex list`)")
    run.add_argument("--seq", type=int, default=1024, help="sequence length L = S (default 1024)")
    run.add_argument("--heads", type=int, default=4, help="heads H (default 4)")
    run.add_argument("--dim", type=int, default=64, help="head dim D (default 64)")
    run.add_argument("--backend", choices=BACKENDS, default="numpy", help="array library (default numpy)")
    run.add_argument("--seed", type=int, default=0, help="input seed (default 0)")
    run.add_argument("--implementation", default="auto", help="kernel choice where the mechanism has one")
    run.set_defaults(handler=_cmd_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())

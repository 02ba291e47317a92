"""The ``reflex`` command line: ``list``, ``run KEY``, ``info KEY``, ``fixtures generate|verify|check``.

Exit codes: 0 success; 1 a check or verification failed; 2 a usage error (unknown mechanism or
size, bad option), with a "did you mean" hint for unknown mechanism names.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import sys
import textwrap
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


def _cmd_info(args: argparse.Namespace) -> int:
    mechanism = _lookup(args.key)
    if mechanism is None:
        return 2
    function = mechanism.function
    print(f"{mechanism.key}: {mechanism.summary}")
    print(f"family          {mechanism.family}")
    print(f"paper           {mechanism.paper}")
    print(f"function        reflex.{function.__name__}{inspect.signature(function)}")
    print(f"returns lse     {'yes' if mechanism.returns_lse else 'no'}")
    print(f"row separable   {'yes' if mechanism.row_separable else 'no'}")
    print(f"cases (tiny)    {', '.join(c.variant for c in mechanism.cases('tiny', 0))}")
    print("parameters:")
    width = max((len(name) for name in mechanism.params), default=0)
    for name, description in mechanism.params.items():
        print(f"  {name:<{width}}  {description}")
    print()
    print(textwrap.indent(inspect.getdoc(function) or "(no docstring)", "  "))
    return 0


def _split(text: str | None) -> list[str] | None:
    return None if text is None else [part.strip() for part in text.split(",") if part.strip()]


def _cmd_fixtures_generate(args: argparse.Namespace) -> int:
    from reflex import fixtures

    start = time.perf_counter()
    try:
        manifest = fixtures.generate(args.out, _split(args.mechanisms), _split(args.sizes), args.seed, progress=True)
    except KeyError as err:  # unknown mechanism, with close matches
        print(f"reflex: {err.args[0]}", file=sys.stderr)
        return 2
    except fixtures.FixtureError as err:
        print(f"reflex: {err}", file=sys.stderr)
        return 1
    except ValueError as err:
        print(f"reflex: {err}", file=sys.stderr)
        return 2
    cases = manifest["cases"]
    total = sum(case["bytes"] for case in cases)
    print(f"wrote {len(cases)} cases of {len(manifest['mechanisms'])} mechanism(s) (sizes {', '.join(manifest['sizes'])}, "
          f"seed {manifest['seed']}) to {args.out}: {total / 2**20:.2f} MiB in {time.perf_counter() - start:.1f} s")
    return 0


def _cmd_fixtures_verify(args: argparse.Namespace) -> int:
    from reflex import fixtures

    try:
        results = fixtures.verify(args.dir, progress=True)
    except fixtures.FixtureError as err:
        print(f"reflex: verification failed: {err}", file=sys.stderr)
        return 1
    identical = sum(r.identical for r in results)
    worst = max((r.max_abs for r in results), default=0.0)
    print(f"verified {len(results)} cases in {args.dir}: hashes match, {identical} recomputed bitwise identical, "
          f"max abs difference {worst:.2e}")
    return 0


def _cmd_fixtures_check(args: argparse.Namespace) -> int:
    from reflex import fixtures

    try:
        report = fixtures.check(args.dir, args.exported, dtype=args.dtype, require_all=args.require_all)
    except fixtures.FixtureError as err:
        print(f"reflex: {err}", file=sys.stderr)
        return 1
    except ValueError as err:
        print(f"reflex: {err}", file=sys.stderr)
        return 2
    print(report.table())
    return 0 if report.passed else 1


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

    info = sub.add_parser("info", help="a mechanism's docstring (equation, parameters, paper)")
    info.add_argument("key", help="mechanism key (see `reflex list`)")
    info.set_defaults(handler=_cmd_info)

    fixtures = sub.add_parser("fixtures", help="golden fixture sets: generate, verify, check")
    fixtures_sub = fixtures.add_subparsers(dest="fixtures_command", required=True)
    generate = fixtures_sub.add_parser("generate", help="write a fixture set (deterministic)")
    generate.add_argument("--out", required=True, help="folder to write (created if needed)")
    generate.add_argument("--mechanisms", help="comma-separated keys (default: every registered mechanism)")
    generate.add_argument("--sizes", default="tiny,small", help="comma-separated sizes: tiny, small, medium, large "
                                                                "(default tiny,small)")
    generate.add_argument("--seed", type=int, default=0, help="case seed (default 0)")
    generate.set_defaults(handler=_cmd_fixtures_generate)
    verify = fixtures_sub.add_parser("verify", help="check hashes and recompute every case")
    verify.add_argument("dir", help="fixture folder")
    verify.set_defaults(handler=_cmd_fixtures_verify)
    check = fixtures_sub.add_parser("check", help="compare another implementation's exported outputs")
    check.add_argument("dir", help="fixture folder")
    check.add_argument("exported", help=".npz with one array per case id (and optionally <id>.lse)")
    check.add_argument("--dtype", help="tolerance dtype (default: each array's dtype), e.g. bfloat16")
    check.add_argument("--require-all", action="store_true", help="fail when a case is not exported")
    check.set_defaults(handler=_cmd_fixtures_check)

    from reflex.show import add_parser as add_show_parser  # `reflex show KEY`: draw a pattern (reflex/show.py)

    add_show_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())

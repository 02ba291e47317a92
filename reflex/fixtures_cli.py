"""``reflex fixtures generate | verify | check``: the fixture commands of the command line (``reflex/cli.py``).

Exit codes as the rest of the CLI: 0 success; 1 verification or a check failed (or a set is
refused: tampered, digest differs, malformed); 2 a usage error (unknown mechanism, size, dtype,
format or shape option, a malformed ``--digest``). Progress bars go to stderr only when it is a
terminal, never with ``--quiet``. Format and guarantees: ``docs/fixtures.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

__all__ = ["add_parser"]

_SHOWN_SKIPS = 10


def _split(text: str | None) -> list[str] | None:
    return None if text is None else [part.strip() for part in text.split(",") if part.strip()]


def _int_list(text: str) -> list[int]:
    """``64,128`` → ``[64, 128]``: positive integers, comma-separated."""
    values = []
    for part in text.split(","):
        try:
            value = int(part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated positive integers; got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"expected comma-separated positive integers; got {value}")
        values.append(value)
    return values


def _progress(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()


def _fail(message: str, code: int) -> int:
    print(f"reflex: {message}", file=sys.stderr)
    return code


def _generate(args: argparse.Namespace) -> int:
    from reflex import fixtures

    shapes = {option: getattr(args, option) for option in ("batch", "heads", "kv_heads", "lengths", "head_dims")
              if getattr(args, option) is not None}
    start = time.perf_counter()
    client = None
    if args.dask is not None:
        from reflex.distributed import connect

        client = connect(args.dask)
    try:
        manifest = fixtures.generate(args.out, _split(args.mechanisms), _split(args.sizes), args.seed,
                                     progress=_progress(args), shapes=shapes, dtypes=_split(args.dtypes),
                                     format=args.format, certify=args.certify, client=client)
    except KeyError as err:  # unknown mechanism, with close matches
        return _fail(err.args[0], 2)
    except fixtures.FixtureError as err:
        return _fail(str(err), 1)
    except ValueError as err:
        return _fail(str(err), 2)
    finally:
        if client is not None:
            cluster = getattr(client, "cluster", None) if args.dask == "local" else None
            client.close()
            if cluster is not None:
                cluster.close()
    digest = fixtures.digest(manifest)
    if args.quiet:
        print(digest)
        return 0
    cases, skipped = manifest["cases"], manifest["skipped"]
    total = sum(case["bytes"] for case in cases)
    print(f"wrote {len(cases)} cases of {len(manifest['mechanisms'])} mechanism(s) (sizes {', '.join(manifest['sizes'])}, "
          f"seed {manifest['seed']}) to {args.out}: {total / 2**20:.2f} MiB of {manifest['format']} in "
          f"{time.perf_counter() - start:.1f} s")
    if skipped:
        print(f"skipped {len(skipped)} case(s) that cannot take the requested shapes (all listed under \"skipped\" "
              f"in {fixtures.MANIFEST}):")
        for entry in skipped[:_SHOWN_SKIPS]:
            shape = "_".join(f"{k}{v}" for k, v in entry["shape"].items())
            print(f"  {entry['mechanism']} {entry['variant'] or '(every variant)'} at {entry['size']} {shape}: "
                  f"{entry['reason']}")
        if len(skipped) > _SHOWN_SKIPS:
            print(f"  ... and {len(skipped) - _SHOWN_SKIPS} more")
    print(f"set digest {digest}  (pin it: reflex fixtures verify {args.out} --digest {digest})")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from reflex import fixtures

    try:
        report = fixtures.verify(args.dir, progress=_progress(args), digest=args.digest)
    except fixtures.FixtureError as err:
        return _fail(f"verification failed: {err}", 1)
    except (TypeError, ValueError) as err:  # a malformed --digest
        return _fail(str(err), 2)
    if report.unlisted:
        print(f"reflex: note: {len(report.unlisted)} entries in {args.dir} are not listed in its manifest: "
              f"{', '.join(report.unlisted)}", file=sys.stderr)
    if not args.quiet:
        identical = sum(r.identical for r in report)
        worst = max((r.max_abs for r in report), default=0.0)
        print(f"verified {len(report)} cases in {args.dir}: hashes match, {identical} recomputed bitwise identical, "
              f"max abs difference {worst:.2e}, every recomputable manifest field matches; set digest {report.digest}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from reflex import fixtures

    try:
        report = fixtures.check(args.dir, args.exported, dtype=args.dtype, require_all=args.require_all,
                                digest=args.digest)
    except fixtures.FixtureError as err:
        return _fail(str(err), 1)
    except (TypeError, ValueError) as err:
        return _fail(str(err), 2)
    print(report.table(quiet=args.quiet))
    return 0 if report.passed else 1


def add_parser(sub: Any) -> None:
    """Add ``fixtures generate | verify | check`` to the subcommands ``sub`` of ``reflex``."""
    fixtures = sub.add_parser("fixtures", help="golden fixture sets: generate, verify, check")
    fixtures_sub = fixtures.add_subparsers(dest="fixtures_command", required=True, parser_class=type(fixtures))
    quiet = dict(action="store_true", help="no progress bar; print only what a script needs")
    generate = fixtures_sub.add_parser("generate", help="write a fixture set (deterministic) and print its digest")
    generate.add_argument("--out", required=True, help="folder to write (created if needed)")
    generate.add_argument("--mechanisms", help="comma-separated keys (default: every registered mechanism)")
    generate.add_argument("--sizes", default="tiny,small", help="comma-separated sizes: tiny, small, medium, large "
                                                                "(default tiny,small)")
    generate.add_argument("--seed", type=int, default=0, help="case seed (default 0)")
    generate.add_argument("--lengths", type=_int_list, help="query and key lengths L = S, e.g. 127,128,129,1000")
    generate.add_argument("--head-dims", dest="head_dims", type=_int_list, help="head dims D = E, e.g. 64,128")
    generate.add_argument("--heads", type=_int_list, help="query heads H, e.g. 8")
    generate.add_argument("--kv-heads", dest="kv_heads", type=_int_list, help="key/value heads G dividing H, e.g. 1,2")
    generate.add_argument("--batch", type=_int_list, help="batch sizes B, e.g. 1")
    generate.add_argument("--dtypes", help="comma-separated dtypes whose tolerances are recorded "
                                           "(default: every tested dtype)")
    generate.add_argument("--format", choices=("npz", "safetensors"), default="npz", help="case files (default npz)")
    generate.add_argument("--certify", action="store_true", help="record each case's float64 error against "
                          "higher precision in the manifest (docs/precision.md)")
    generate.add_argument("--dask", nargs="?", const="local", metavar="ADDRESS",
                          help="compute the cases as Dask tasks: on a new local cluster (bare) or on the scheduler "
                               "at ADDRESS; the set is byte-identical to the serial one (needs reflex-attention[distributed])")
    generate.add_argument("--quiet", **quiet)
    generate.set_defaults(handler=_generate)
    verify = fixtures_sub.add_parser("verify", help="check hashes, the manifest and recompute every case")
    verify.add_argument("dir", help="fixture folder")
    verify.add_argument("--digest", help="the set digest you pinned (sha256 hex); any other set is refused")
    verify.add_argument("--quiet", **quiet)
    verify.set_defaults(handler=_verify)
    check = fixtures_sub.add_parser("check", help="compare another implementation's exported outputs")
    check.add_argument("dir", help="fixture folder")
    check.add_argument("exported", help=".npz or .safetensors with one array per case id (optionally <id>.lse, "
                                        "<id>.grad.<input>)")
    check.add_argument("--dtype", help="tolerance dtype (default: each array's dtype), e.g. bfloat16")
    check.add_argument("--require-all", action="store_true", help="fail when a case is not exported")
    check.add_argument("--digest", help="the set digest you pinned (sha256 hex); any other set is refused")
    check.add_argument("--quiet", action="store_true", help="print only failures and the summary")
    check.set_defaults(handler=_check)

"""The ``reflex`` command line (also ``python -m reflex``): ``list``, ``run KEY``, ``info KEY``,
``show KEY``, ``fixtures generate|verify|check``, ``certify KEY...``; ``reflex --version``.

Exit codes: 0 success; 1 a check or verification failed; 2 a usage error (unknown mechanism or
size, bad option or input, a reader that closed the pipe early), with a "did you mean" hint for
unknown mechanism names. A usage error prints one line on stderr, never a traceback; set the
environment variable ``REFLEX_TRACEBACK=1`` to see the traceback behind it.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import os
import statistics
import sys
import textwrap
import time
import warnings
from typing import Any, Callable, Mapping, NoReturn, Sequence

import numpy

from reflex import __version__, registry
from reflex.mechanisms import _kernels
from reflex.backends import BACKENDS, backend_namespace, from_numpy, library_name, to_numpy

__all__ = ["main"]


def _cmd_list(args: argparse.Namespace) -> int:
    rows = [(m.key, m.family, m.summary, m.paper) for m in registry.list_mechanisms()
            if not getattr(args, "vjp", False) or m.has_vjp]
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


class UsageError(ValueError):
    """A mistake in the command line (reported as one line, exit code 2)."""


def _parse_params(pairs: Sequence[str], accepts: Mapping[str, inspect.Parameter], key: str) -> dict[str, Any]:
    """``--param NAME=VALUE`` pairs → keyword options; VALUE is JSON, else taken as a string."""
    params: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        name = name.strip()
        if not sep or not name:
            raise UsageError(f"--param expects NAME=VALUE; got {pair!r}")
        if name not in accepts or accepts[name].kind is not inspect.Parameter.KEYWORD_ONLY:
            options = ", ".join(n for n, p in accepts.items() if p.kind is inspect.Parameter.KEYWORD_ONLY)
            raise UsageError(f"{key} has no option {name!r}; its options: {options}")
        try:
            params[name] = json.loads(text)
        except json.JSONDecodeError:
            params[name] = text  # a bare word: --param convention=interleaved
    return params


def _keyword(accepts: Mapping[str, inspect.Parameter], name: str, key: str, flag: str) -> None:
    if name not in accepts:
        raise UsageError(f"{key} has no {name} option, so {flag} does not apply")


def _resize_kv(case: registry.Case, key: str, kv_heads: int | None, kv_seq: int | None, seed: int) -> registry.Case:
    """The example case with k and v redrawn as ``(1, G, S, D)`` / ``(1, G, S, E)``."""
    from reflex import random

    k, v = case.inputs.get("k"), case.inputs.get("v")
    if not (hasattr(k, "ndim") and hasattr(v, "ndim") and k.ndim == 4 and v.ndim == 4):
        raise UsageError(f"{key} does not take (B, G, S, D) keys and values, so --kv-heads/--kv-seq do not apply")
    heads = kv_heads if kv_heads is not None else k.shape[1]
    length = kv_seq if kv_seq is not None else k.shape[2]
    inputs = dict(case.inputs)
    inputs["k"] = random.normal((k.shape[0], heads, length, k.shape[3]), seed=(seed, 1))
    inputs["v"] = random.normal((v.shape[0], heads, length, v.shape[3]), seed=(seed, 2))
    return registry.Case(case.variant, inputs, case.params, case.positional, case.seed)


def _mover(xp: Any, device: Any, dtype: str | None) -> Callable[[Any], Any]:
    """Host array → backend array, floating arrays cast to ``dtype`` (``--dtype``)."""
    target = None
    if dtype is not None:
        target = getattr(xp, dtype, None)
        if target is None:
            raise UsageError(f"--dtype {dtype} is not available on this backend ({xp.__name__})"
                             + ("; use --backend torch" if dtype == "bfloat16" else ""))

    def move(a: Any) -> Any:
        if not isinstance(a, numpy.ndarray):
            return a
        moved = from_numpy(a, xp, device)
        return xp.astype(moved, target) if target is not None and a.dtype.kind == "f" else moved

    return move


def _host_float64(x: Any) -> numpy.ndarray:
    """The result on the host as float64 (exact for every floating dtype, bfloat16 included)."""
    from reflex.testing import _host

    return numpy.ascontiguousarray(_host(x), dtype=numpy.float64)


def _checksums(host: numpy.ndarray) -> tuple[str, str]:
    """(library-independent sums to 12 significant digits, sha256 of the exact float64 bytes)."""
    flat = host.ravel()
    total, magnitude = math.fsum(flat.tolist()), math.fsum(numpy.abs(flat).tolist())
    summary = f"sum {total:.12g}  sum|x| {magnitude:.12g}"
    return summary, hashlib.sha256(host.tobytes()).hexdigest()[:16]


def _describe_implementation(mechanism: registry.Mechanism, requested: str | None, case: registry.Case) -> str:
    if requested is None:
        return "n/a (one kernel)"
    if requested != "auto":
        return requested
    q, k = case.inputs.get("q"), case.inputs.get("k")
    if not (hasattr(q, "ndim") and hasattr(k, "ndim") and q.ndim >= 2 and k.ndim >= 2):
        return "auto (the mechanism's own rule)"
    length, key_length = int(q.shape[-2]), int(k.shape[-2])
    engine = _kernels.choose_implementation(length, key_length)
    if mechanism.key == "full":
        return f"auto → {engine} (L·S = {length * key_length:,}; tiled above {_kernels.AUTO_TILED_ELEMENTS:,})"
    return f"auto (the mechanism's own rule; the engine's softmax would run {engine} at L = {length}, S = {key_length})"


def _cmd_run(args: argparse.Namespace) -> int:
    mechanism = _lookup(args.key)
    if mechanism is None:
        return 2
    try:
        xp, device = backend_namespace(args.backend)
    except ValueError as err:
        print(f"reflex: {err}", file=sys.stderr)
        return 2
    key = mechanism.key
    accepts = inspect.signature(mechanism.function).parameters
    overrides = _parse_params(args.param, accepts, key)
    if "implementation" in accepts:
        overrides.setdefault("implementation", args.implementation)
    elif args.implementation != "auto":
        raise UsageError(f"{key} has no implementation choice")
    if args.causal is not None:
        _keyword(accepts, "causal", key, "--causal")
        overrides["causal"] = args.causal
    if args.compute_dtype is not None:
        _keyword(accepts, "compute_dtype", key, "--compute-dtype")
        overrides["compute_dtype"] = args.compute_dtype
    case = mechanism.example_case(args.seq, args.heads, args.dim, args.seed)
    if args.kv_heads is not None or args.kv_seq is not None:
        case = _resize_kv(case, key, args.kv_heads, args.kv_seq, args.seed)
    move = _mover(xp, device, args.dtype)
    if args.dask is not None:
        return _run_dask(args, mechanism, case, move, overrides)

    start = time.perf_counter()
    result = case.call(mechanism, move, **overrides)
    out = result[0] if isinstance(result, tuple) else result
    _host_float64(out)  # waits for the device
    first = time.perf_counter() - start
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        result = case.call(mechanism, move, **overrides)
        out = result[0] if isinstance(result, tuple) else result
        host = _host_float64(out)
        times.append(time.perf_counter() - start)

    shapes = ", ".join(f"{name} {tuple(a.shape)}" for name, a in case.inputs.items() if hasattr(a, "shape"))
    options = {**case.params, **overrides}
    summary, digest = _checksums(host)
    print(f"mechanism       {key}")
    print(f"inputs          {shapes}  ({args.dtype or 'float64'})")
    print(f"options         {', '.join(f'{n}={v!r}' for n, v in options.items()) or '(defaults)'}")
    print(f"output          {tuple(host.shape)} {_dtype_of(out)}")
    print(f"backend         {args.backend} ({library_name(out)}, device {device})")
    print(f"implementation  {_describe_implementation(mechanism, overrides.get('implementation'), case)}")
    print(f"first call      {first:.4f} s (warm-up: pays any Numba compilation and first-call costs)")
    print(f"wall time       {min(times):.4f} s (best of {len(times)} after the warm-up"
          + (f"; median {statistics.median(times):.4f} s)" if len(times) > 1 else ")"))
    print(f"checksum        {summary}  (host float64; equal across backends up to round-off)")
    print(f"bits            sha256:{digest}  (exact float64 bytes: the same run after run on one backend)")
    return 0


def _run_dask(args: argparse.Namespace, mechanism: Any, case: Any, move: Any, overrides: dict) -> int:
    """``reflex run KEY --dask [ADDRESS]``: the run as Dask tasks (reflex.distributed), with a progress bar."""
    from reflex import distributed

    inputs = {name: move(a) if hasattr(a, "shape") else a for name, a in case.inputs.items()}
    options = {**case.params, **overrides}
    client = distributed.connect(args.dask)
    try:
        workers = len(client.scheduler_info().get("workers", {}))
        start = time.perf_counter()
        out = distributed.run(mechanism.key, inputs, client=client, query_shards=args.query_shards,
                              kv_blocks=args.kv_blocks, progress=True, **options)
        host = _host_float64(out)
        wall = time.perf_counter() - start
    finally:
        cluster = getattr(client, "cluster", None) if args.dask == "local" else None
        client.close()
        if cluster is not None:
            cluster.close()
    summary, digest = _checksums(host)
    shapes = ", ".join(f"{name} {tuple(a.shape)}" for name, a in case.inputs.items() if hasattr(a, "shape"))
    print(f"mechanism       {mechanism.key}")
    print(f"inputs          {shapes}  ({args.dtype or 'float64'})")
    print(f"options         {', '.join(f'{n}={v!r}' for n, v in options.items()) or '(defaults)'}")
    print(f"output          {tuple(host.shape)} {_dtype_of(out)}")
    print(f"dask            {args.dask} ({workers} workers; query shards {args.query_shards or 'one per worker'}, "
          f"key/value blocks {args.kv_blocks})")
    print(f"wall time       {wall:.4f} s (one distributed run: scatter, tasks, merge)")
    print(f"checksum        {summary}  (host float64; equal to the single-process run up to round-off)")
    print(f"bits            sha256:{digest}")
    return 0


def _dtype_of(x: Any) -> str:
    return str(getattr(x, "dtype", type(x).__name__)).rsplit(".", 1)[-1]


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
    print(f"vjp             {'yes (reflex.vjp)' if mechanism.has_vjp else 'no'}")
    print(f"cases (tiny)    {', '.join(c.variant for c in mechanism.cases('tiny', 0))}")
    print("parameters:")
    width = max((len(name) for name in mechanism.params), default=0)
    for name, description in mechanism.params.items():
        print(f"  {name:<{width}}  {description}")
    print()
    print(textwrap.indent(inspect.getdoc(function) or "(no docstring)", "  "))
    return 0


INPUT_DTYPES = ("float64", "float32", "float16", "bfloat16")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``reflex run: argument --seq: ...; see reflex run --help``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="reflex", description="Reference attention mechanisms: list, run, fixtures.")
    parser.add_argument("--version", action="version", version=f"reflex {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    listing = sub.add_parser("list", help="the registered mechanisms as a table")
    listing.add_argument("--vjp", action="store_true", help="only mechanisms with a reverse-mode derivative (reflex.vjp)")
    listing.set_defaults(handler=_cmd_list)
    run = sub.add_parser("run", help="run a mechanism on generated inputs")
    run.add_argument("key", help="mechanism key (see `reflex list`)")
    run.add_argument("--seq", type=_positive_int, default=1024, help="sequence length L (default 1024; S too unless --kv-seq)")
    run.add_argument("--heads", type=_positive_int, default=4, help="query heads H (default 4)")
    run.add_argument("--dim", type=_positive_int, default=64, help="head dim D (default 64)")
    run.add_argument("--kv-heads", type=_positive_int, help="key/value heads G (GQA: H a multiple of G; default H)")
    run.add_argument("--kv-seq", type=_positive_int, help="key length S (default L)")
    run.add_argument("--backend", choices=BACKENDS, default="numpy", help="array library (default numpy)")
    run.add_argument("--dtype", choices=INPUT_DTYPES, help="input dtype (default float64; bfloat16 needs torch)")
    run.add_argument("--compute-dtype", choices=INPUT_DTYPES[:3], help="compute dtype (default float64)")
    run.add_argument("--causal", nargs="?", const=True, choices=(True, "top_left", "bottom_right"),
                     type=lambda text: text, help="causal mask: bare = top_left, or top_left | bottom_right")
    run.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                     help="a keyword option, VALUE as JSON (e.g. window=64, scale=0.5); repeatable")
    run.add_argument("--implementation", default="auto", help="kernel choice where the mechanism has one")
    run.add_argument("--repeat", type=_positive_int, default=1, help="timed calls after one warm-up call (default 1)")
    run.add_argument("--seed", type=int, default=0, help="input seed (default 0)")
    run.add_argument("--dask", nargs="?", const="local", metavar="ADDRESS",
                     help="run as Dask tasks: on a new local cluster (bare) or the scheduler at ADDRESS "
                          "(needs reflex-attention[distributed]; docs/distributed.md)")
    run.add_argument("--query-shards", type=_positive_int, help="with --dask: query shards (default one per worker)")
    run.add_argument("--kv-blocks", type=_positive_int, default=1,
                     help="with --dask: key/value blocks merged by logsumexp (default 1)")
    run.set_defaults(handler=_cmd_run)

    info = sub.add_parser("info", help="a mechanism's docstring (equation, parameters, paper)")
    info.add_argument("key", help="mechanism key (see `reflex list`)")
    info.set_defaults(handler=_cmd_info)

    from reflex.fixtures_cli import add_parser as add_fixtures_parser  # `reflex fixtures ...` (reflex/fixtures_cli.py)

    add_fixtures_parser(sub)

    from reflex.show import add_parser as add_show_parser  # `reflex show KEY`: draw a pattern (reflex/show.py)

    add_show_parser(sub)
    from reflex.certify_cli import add_parser as add_certify_parser  # `reflex certify KEY...` (reflex/certify_cli.py)

    add_certify_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code. A mistake in the command or its inputs prints
    one line (``reflex: ...``) and returns 2; set ``REFLEX_TRACEBACK=1`` to see the traceback."""
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            if args.command == "run":  # NumPy's overflow warnings: the overflow guard reports it in one line
                warnings.simplefilter("ignore", RuntimeWarning)
            return args.handler(args)
    except BrokenPipeError:  # `reflex info full | head -1`: the reader left early
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - flushing at exit must not raise again
        finally:
            print("reflex: output closed before it was all written (broken pipe)", file=sys.stderr)
        return 2
    except (UsageError, ValueError, TypeError, KeyError, FloatingPointError, MemoryError) as err:
        if os.environ.get("REFLEX_TRACEBACK"):
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        if isinstance(err, MemoryError):
            message = f"out of memory ({err or 'the inputs or scores do not fit'}); try a smaller --seq or --heads"
        command = " ".join(part for part in ("reflex", args.command, getattr(args, "key", None)) if part)
        print(f"{command}: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

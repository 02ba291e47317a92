"""Distributed execution on Dask: query shards × key/value blocks merged by logsumexp.

A mechanism runs as a grid of tasks on a ``dask.distributed.Client``. Each task calls the ordinary
mechanism on the full inputs (scattered to the workers once) inside an engine *window*
(:mod:`reflex.mechanisms._engine.window`): the engine computes only query rows ``[i0, i1)`` against
keys ``[j0, j1)`` while every index grid, causal offset, window, ALiBi/T5 distance, RoPE angle and
block index stays in absolute positions. So no mechanism needs its own offset option.

- **Query shards** (``query_shards``) for mechanisms whose rows are independent given K and V
  (the registry's ``row_separable``). Shards are concatenated in order: the same rows as the
  single-process call (the engine's per-row arithmetic is unchanged; a tiled kernel may cut its
  query blocks differently, so compare at round-off, ~1e-13). A mechanism that needs all queries
  (Nyström landmarks, LSH buckets, clustering and k-means routing centroids, ...) is refused.
  A row-separable mechanism that does not reach the engine as full-length calls (linear
  attention, inducing points, score-map mixing, ...) is detected by the first shard and then runs
  as one task: correct, not parallel.
- **Key/value blocks** (``kv_blocks``) for mechanisms whose output is *one* engine call's result
  (``full``, ``sliding_window``, ``alibi`` and most restricted-softmax mechanisms): each task returns
  ``(O_k, L_k)`` over its key block; partials merge by ``L = logsumexp_k L_k``,
  ``O = Σ_k e^{L_k − L} O_k`` in block order (deterministic), empty partials (``L_k = −∞``) skipped,
  never multiplied by 0 (:func:`reflex.mechanisms._merge.merge_partials`; Dao 2023 §3.1 split-KV;
  Liu et al. 2023, ring attention). Whether the forward made exactly one engine call whose result
  it returned is checked in each task (:func:`reflex.mechanisms._engine.record.run_recorded`);
  anything else (sinks added after the kernel, a transposed layout, two engine calls) raises
  ``NotImplementedError`` naming the reason.

Workers: ``client=None`` starts a ``LocalCluster`` with one single-threaded worker process per core
(closed at the end); a ``Client`` or a scheduler address (``"tcp://host:8786"``) uses that cluster.
CuPy inputs stay CuPy on the workers (Dask moves CuPy arrays between GPU workers); results come
back as the caller's library. Failures: Dask reschedules the tasks of a lost worker (its
``allowed-failures``); if a task still fails, :func:`run` raises and returns nothing — never a
partial result.

Needs the optional extra ``reflex-attention[distributed]`` (``dask[distributed]``).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from reflex.backends import namespace
from reflex.mechanisms._engine.record import positional_names, run_recorded
from reflex.mechanisms._engine.window import window
from reflex.mechanisms._merge import merge_partials
from reflex.registry import get

__all__ = ["run", "spans", "local_client", "connect", "build_fixture_cases"]

_KERNELS = ("dense", "tiled", "gather")


def _import_distributed() -> Any:
    try:
        import distributed
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError("reflex.distributed needs Dask: pip install 'reflex-attention[distributed]' "
                          "(dask[distributed])") from err
    return distributed


def spans(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous, nearly equal ``(start, stop)`` spans covering ``range(n)`` (no empty span
    unless ``n = 0``, then ``[(0, 0)]``)."""
    parts = max(1, min(parts, n))
    if n == 0:
        return [(0, 0)]
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def local_client(n_workers: int | None = None, *, processes: bool = True) -> Any:
    """A ``Client`` on a new ``LocalCluster``: ``n_workers`` (default: the core count) single-threaded
    workers, as processes unless ``processes=False``. Close it (``client.close(); client.cluster.close()``)."""
    distributed = _import_distributed()
    n = n_workers if n_workers is not None else (os.cpu_count() or 1)
    cluster = distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=processes,
                                       dashboard_address=":0")
    return distributed.Client(cluster)


def _geometry(key: str, inputs: Mapping[str, Any], params: Mapping[str, Any]) -> tuple[int, int, int]:
    """``(L, S, row axis)`` of a call: the first positional input's rows and ``k``'s (default: L)."""
    function = get(key).function
    names = positional_names(function)
    missing = [n for n in names if n not in inputs]
    if missing:
        raise TypeError(f"{key}: inputs lacks the positional argument(s) {', '.join(missing)}")
    axis = -3 if params.get("layout") == "blhd" else -2
    first = inputs[names[0]]
    if not hasattr(first, "shape") or len(first.shape) < -axis:
        raise ValueError(f"{key}: input {names[0]!r} must be an array with at least {-axis} axes")
    keys = inputs.get("k", first)
    return int(first.shape[axis]), int(keys.shape[axis]), axis


def _windowed_problem(calls: list, seen: list, length: int, key_length: int | None) -> str | None:
    """Why a windowed run did not compute what the window asked (``None``: it did)."""
    if not calls:
        return "the forward made no engine call (its rows are not computed by the engine)"
    others = sorted({c.kernel for c in calls if c.kernel not in _KERNELS})
    if others:
        return f"the forward uses the score map(s) {', '.join(others)}, which are not windowed"
    for n, s in seen:
        if n != length or (key_length is not None and s != key_length):
            return (f"an engine call runs on {n} queries × {s} keys, not on the mechanism's "
                    f"{length} × {key_length if key_length is not None else '·'}")
    return None


def _task(key: str, inputs: Mapping[str, Any], params: Mapping[str, Any], rows: tuple[int, int],
          keys: tuple[int, int] | None, return_lse: bool, fallback: bool) -> tuple[str, Any]:
    """One grid cell: ``("rows", result)``, ``("block", (out, lse))`` or, for a query shard the engine
    cannot window (``fallback``), ``("whole", result)`` computed without a window."""
    function = get(key).function
    length, key_length, axis = _geometry(key, inputs, params)
    if keys is not None:  # a key/value block: exactly one engine call whose (out, lse) is returned
        with window(rows=rows, keys=keys) as w:
            result, calls = run_recorded(function, inputs, params, return_lse=True)
        problem = _windowed_problem(calls, w.seen, length, key_length)
        if problem is None and (len(calls) != 1 or not isinstance(result, tuple)
                                or calls[0].out is not result[0] or calls[0].lse is not result[1]):
            kinds = ", ".join(c.kernel for c in calls)
            problem = (f"the output is not one engine call's (out, lse): this forward made {len(calls)} engine "
                       f"call(s) ({kinds}) and returned {'them changed' if len(calls) == 1 else 'a combination'}")
        if problem is not None:
            raise NotImplementedError(f"{key}: key/value blocks (kv_blocks > 1) need the mechanism's output to be "
                                      f"one engine call's result, merged by logsumexp; {problem}. Use kv_blocks=1.")
        return "block", result
    problem = None
    try:
        with window(rows=rows) as w:
            result, calls = run_recorded(function, inputs, params, return_lse=return_lse)
        problem = _windowed_problem(calls, w.seen, length, None)
        out = result[0] if return_lse else result
        if problem is None and isinstance(out, tuple):
            problem = "the forward returns a tuple of results"
        elif problem is None and int(out.shape[axis]) != rows[1] - rows[0]:
            problem = f"the output has {int(out.shape[axis])} rows, not the shard's {rows[1] - rows[0]}"
    except Exception as err:  # the same call without a window decides whether the inputs are at fault
        problem = f"the windowed run raised {type(err).__name__}: {err}"
    if problem is None:
        return "rows", result
    if not fallback:
        raise RuntimeError(f"{key}: query shard {rows} could not be windowed ({problem}), though the first "
                           f"shard could")
    args = [inputs[n] for n in positional_names(function)]
    kwargs = {n: x for n, x in inputs.items() if n not in positional_names(function)}
    return "whole", function(*args, **kwargs, **params, **({"return_lse": True} if return_lse else {}))


def _count(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int or None; got {value!r}")
    return value


def run(key: str, inputs: Mapping[str, Any], *, client: Any = None, query_shards: int | None = None,
        kv_blocks: int = 1, return_lse: bool = False, progress: bool = False, **params: Any) -> Any:
    """Run mechanism ``key`` on ``inputs`` as a grid of Dask tasks; the same result as one process.

    ``inputs``: array name → array (``q (..., H, L, D)``, ``k (..., G, S, D)``, ``v (..., G, S, E)`` and
    any other array inputs of the mechanism), scattered to the workers once. ``params``: the
    mechanism's keyword options, unchanged.

    ``client``: a ``dask.distributed.Client``, a scheduler address, or ``None`` (a ``LocalCluster``
    with one worker per core, closed afterwards). ``query_shards``: contiguous query shards
    (default: one per worker for row-separable mechanisms, else 1); ``kv_blocks``: contiguous key
    blocks merged by logsumexp (default 1). ``return_lse``: also return ``lse (..., H, L)`` where the
    mechanism supports it. ``progress``: print Dask's progress bar.

    Returns what ``reflex.get(key).function(**inputs, **params)`` returns (``out (..., H, L, E)``, or
    ``(out, lse)``), equal to it up to summation order (≤ 1e-13 in float64).

    Raises ``ValueError`` when query shards are asked of a mechanism that needs all queries
    (``row_separable=False``) or for bad counts; ``NotImplementedError`` when key/value blocks are
    asked of a mechanism whose output is not one engine call's result; whatever a
    task raised (e.g. ``distributed.KilledWorker`` after a worker died too often) — never a partial
    result. Source: INTEROP notes on split-KV merging (Dao 2023 §3.1; Liu et al. 2023).
    """
    mechanism = get(key)
    query_shards, kv_blocks = _count("query_shards", query_shards), _count("kv_blocks", kv_blocks)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool; got {return_lse!r}")
    if return_lse and not mechanism.returns_lse:
        raise ValueError(f"{key} does not return an lse (return_lse=True is not supported)")
    if query_shards is not None and query_shards > 1 and not mechanism.row_separable:
        raise ValueError(f"{key} cannot be split into query shards: it needs all queries (its output rows are "
                         f"not independent given the keys and values; registry row_separable=False). "
                         f"Use query_shards=1 (key/value blocks may still apply).")
    if kv_blocks > 1 and not mechanism.returns_lse:
        raise NotImplementedError(f"{key}: key/value blocks (kv_blocks > 1) need the mechanism's output to be one "
                                  f"engine call's result with its lse, merged by logsumexp; {key} returns no lse. "
                                  f"Use kv_blocks=1.")
    length, key_length, axis = _geometry(key, inputs, params)
    distributed = _import_distributed()
    own = client is None
    if own:
        client = local_client()
    elif isinstance(client, str):
        client, own = distributed.Client(client), True
    try:
        workers = max(1, len(client.scheduler_info().get("workers", {})))
        if query_shards is None:
            query_shards = workers if mechanism.row_separable else 1
        names = list(inputs)  # a list, not the dict: scattering a dict names the Dask keys after its keys
        scattered = dict(zip(names, client.scatter([inputs[n] for n in names], broadcast=True, hash=False)))
        params = dict(params)
        row_spans, key_spans = spans(length, query_shards), spans(key_length, kv_blocks)
        if kv_blocks > 1:
            return _run_blocks(distributed, client, key, scattered, params, row_spans, key_spans, axis,
                               return_lse, progress)
        return _run_rows(distributed, client, key, scattered, params, row_spans, axis, return_lse, progress)
    finally:
        if own:
            cluster = getattr(client, "cluster", None)
            client.close()
            if cluster is not None:
                cluster.close()


def _gather(distributed: Any, client: Any, futures: list, progress: bool) -> list:
    if progress:
        distributed.progress(futures)
    return client.gather(futures)  # raises the first failed task's error: never a partial result


def _run_rows(distributed: Any, client: Any, key: str, scattered: Any, params: dict, row_spans: list,
              axis: int, return_lse: bool, progress: bool) -> Any:
    first = client.submit(_task, key, scattered, params, row_spans[0], None, return_lse, True, pure=False)
    kind, result = _gather(distributed, client, [first], progress)[0]
    if kind == "whole" or len(row_spans) == 1:
        return result
    rest = [client.submit(_task, key, scattered, params, span, None, return_lse, False, pure=False)
            for span in row_spans[1:]]
    results = [result] + [r for _, r in _gather(distributed, client, rest, progress)]
    outs = [r[0] if return_lse else r for r in results]
    xp = namespace(outs[0])
    out = xp.concat(outs, axis=axis)
    if not return_lse:
        return out
    return out, xp.concat([r[1] for r in results], axis=-1)


def _run_blocks(distributed: Any, client: Any, key: str, scattered: Any, params: dict, row_spans: list,
                key_spans: list, axis: int, return_lse: bool, progress: bool) -> Any:
    grid = [[client.submit(_task, key, scattered, params, rows, keys, True, False, pure=False)
             for keys in key_spans] for rows in row_spans]
    flat = _gather(distributed, client, [f for row in grid for f in row], progress)
    width = len(key_spans)
    outs, lses = [], []
    for a in range(len(row_spans)):
        parts = [r for _, r in flat[a * width:(a + 1) * width]]
        xp = namespace(parts[0][0])
        out, lse = merge_partials(xp, [p[0] for p in parts], [p[1] for p in parts])
        outs.append(out)
        lses.append(lse)
    xp = namespace(outs[0])
    out = xp.concat(outs, axis=axis) if len(outs) > 1 else outs[0]
    lse = xp.concat(lses, axis=-1) if len(lses) > 1 else lses[0]
    return (out, lse) if return_lse else out


def connect(address: str | None = None, *, n_workers: int | None = None) -> Any:
    """A ``Client``: on the scheduler at ``address``, or on a new local cluster when ``address`` is
    ``None`` or ``"local"`` (``n_workers`` processes, default one per core)."""
    if address is None or address == "local":
        return local_client(n_workers)
    return _import_distributed().Client(address)


def _fixture_case(cid: str, size: str, shape: dict, key: str, case: Any, dtypes: list, fmt: str,
                  certify: bool) -> tuple[Any, Any]:
    """One fixture case on a worker: ``(_build(...) result, certificate or None)``."""
    from reflex.fixture_build import _build

    mechanism = get(key)
    built = _build(cid, size, shape, mechanism, case, dtypes, fmt)
    certificate = None
    if certify and not isinstance(built, str):
        from reflex.certify import case_record, default_method

        certificate = case_record(mechanism, case, method=default_method(size))
    return built, certificate


def build_fixture_cases(client: Any, cases: list, dtypes: list, fmt: str, certify: bool, *,
                        progress: bool = False) -> list[tuple[Any, Any]]:
    """The fixture cases ``(cid, size, shape, mechanism, case)`` computed as Dask tasks, in order.

    Each task runs the serial builder (:func:`reflex.fixture_build._build`) on one case, so the
    arrays (and the files :func:`reflex.fixtures.generate` writes from them) are the serial ones.
    ``client``: a ``Client`` or a scheduler address. Any failed task raises; nothing is returned.
    """
    distributed = _import_distributed()
    own = isinstance(client, str)
    if own:
        client = connect(client)
    try:
        futures = [client.submit(_fixture_case, cid, size, dict(shape), mechanism.key, case, list(dtypes), fmt,
                                 certify, pure=False) for cid, size, shape, mechanism, case in cases]
        return _gather(distributed, client, futures, progress)
    finally:
        if own:
            cluster = getattr(client, "cluster", None)
            client.close()
            if cluster is not None:
                cluster.close()

"""reflex.distributed on a LocalCluster (1 and 2 worker processes) vs the single-process call.

Two workloads (issue 18): sliding_window (±256) at L = 1,048,576 and full attention at L = 65,536,
float64, one head, D = 16 by default, both with ``implementation="tiled"`` (the kernel the
distributed tasks run; the band kernels have no window). The single-process call runs once in a
fresh interpreter; each distributed run starts its own cluster (start-up not timed), scatters the
inputs (timed) and runs ``query_shards`` = 4 × workers shards (and ``--kv-blocks`` key blocks).
Peak memory: each process's maximum resident set at the end of the run (interpreter, inputs and
work; per worker: the largest over the workers). Every distributed output is compared with the single-process one.
Each configuration runs once: the machine may be shared, so figures are indicative.
"""

from __future__ import annotations

import time

from benchmarks._timing import in_subprocess, table

WORKLOADS = {"sliding_window": dict(window=(256, 256)), "full": dict()}


def add_arguments(parser) -> None:
    parser.add_argument("--sliding-length", type=int, default=1_048_576, help="L = S for sliding_window (default 2^20)")
    parser.add_argument("--full-length", type=int, default=65_536, help="L = S for full (default 65536)")
    parser.add_argument("--dim", type=int, default=16, help="head dim D = E (default 16)")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts (default 1,2)")
    parser.add_argument("--kv-blocks", type=int, default=1, help="key/value blocks per query shard (default 1)")


def _inputs(length: int, dim: int):
    from reflex import random

    return {name: random.normal((1, 1, length, dim), seed=(0, i)) for i, name in enumerate("qkv")}


def measure(key: str, length: int, dim: int) -> dict:
    """Runs in a fresh interpreter: the single-process call's time, peak RSS rise and output file."""
    import resource
    import tempfile

    import numpy

    import reflex

    inputs = _inputs(length, dim)
    start = time.perf_counter()
    out = reflex.get(key).function(*inputs.values(), implementation="tiled", **WORKLOADS[key])
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    path = tempfile.NamedTemporaryFile(suffix=".npy", delete=False).name
    numpy.save(path, out)
    return {"seconds": seconds, "peak_bytes": peak, "path": path}


def _worker_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _distributed(key: str, length: int, dim: int, workers: int, kv_blocks: int) -> dict:
    from reflex import distributed

    client = distributed.local_client(workers)
    try:
        inputs = _inputs(length, dim)
        start = time.perf_counter()
        out = distributed.run(key, inputs, client=client, query_shards=4 * workers, kv_blocks=kv_blocks,
                              implementation="tiled", **WORKLOADS[key])
        seconds = time.perf_counter() - start
        after = client.run(_worker_rss)
        peak = max(after.values())
        return {"seconds": seconds, "peak_bytes": peak, "out": out}
    finally:
        cluster = client.cluster
        client.close()
        cluster.close()


def run(args) -> int:
    import os

    import numpy

    rows = []
    lengths = {"sliding_window": args.sliding_length, "full": args.full_length}
    for key, length in lengths.items():
        single = in_subprocess("distributed", f"{key} L={length} single", key, length, args.dim)
        reference = None
        if single is not None:
            reference = numpy.load(single["path"])
            os.unlink(single["path"])
            rows.append([key, length, "single process", f"{single['seconds']:.2f}", "1.00",
                         f"{single['peak_bytes'] / 2**20:.0f}", ""])
        for workers in (int(n) for n in args.workers.split(",")):
            r = _distributed(key, length, args.dim, workers, args.kv_blocks)
            speedup = f"{single['seconds'] / r['seconds']:.2f}" if single else "n/a"
            error = f"{float(numpy.max(numpy.abs(r['out'] - reference))):.1e}" if reference is not None else "n/a"
            rows.append([key, length, f"{workers} worker(s)", f"{r['seconds']:.2f}", speedup,
                         f"{r['peak_bytes'] / 2**20:.0f}", error])
        if reference is not None and key == "full":
            per_second = length * length / single["seconds"]  # score entries of the one head
            print(f"full: {per_second:.3e} score entries / s in one process (the throughput docs/distributed.md "
                  f"extrapolates from)")
    print(f"reflex.distributed, float64, H=1, D={args.dim}, implementation='tiled', query shards = 4 x workers, "
          f"key/value blocks {args.kv_blocks}; peak MiB: max RSS of the process (per worker: the largest); "
          f"max |diff| vs single process; cores: {os.cpu_count()}")
    print(table(rows, ["mechanism", "L=S", "run", "seconds", "speed-up", "peak MiB", "max |diff|"]))
    return 0

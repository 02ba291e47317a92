"""reflex.distributed: query shards and key/value blocks on a Dask cluster ≡ the single-process call."""

from __future__ import annotations

import math
import os
import signal
import threading
import time

import numpy
import pytest

import reflex
from reflex import random
from reflex.mechanisms._engine.window import window
from reflex.mechanisms._merge import merge_partials
from reflex.registry import list_mechanisms
from tests.helpers import max_abs, qkv_host

distributed = pytest.importorskip("distributed")
from reflex import distributed as rd  # noqa: E402

TOL = 1e-13


@pytest.fixture(scope="module")
def client():
    """Two in-process workers (threads): no pickling, fast start."""
    c = rd.local_client(2, processes=False)
    yield c
    cluster = c.cluster
    c.close()
    cluster.close()


def _host(x):
    return numpy.asarray(reflex.backends.to_numpy(x), dtype=numpy.float64)


def _nan_same(a, b):
    a, b = _host(a), _host(b)
    assert numpy.array_equal(numpy.isnan(a), numpy.isnan(b))
    return max_abs(numpy.nan_to_num(a), numpy.nan_to_num(b))


ROW_SEPARABLE = sorted(m.key for m in list_mechanisms() if m.row_separable)
NOT_SEPARABLE = sorted(m.key for m in list_mechanisms() if not m.row_separable)


def test_spans_cover_in_order():
    assert rd.spans(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert rd.spans(2, 5) == [(0, 1), (1, 2)]
    assert rd.spans(0, 4) == [(0, 0)]


@pytest.mark.parametrize("key", ROW_SEPARABLE)
def test_query_shards_match_single_process(client, key):
    mechanism = reflex.get(key)
    cases = mechanism.cases("tiny", 0)
    assert cases
    for case in cases[:3]:
        reference = case.call(mechanism)
        got = rd.run(key, dict(case.inputs), client=client, query_shards=3, **case.params)
        if isinstance(reference, tuple):  # e.g. (out, scores): every part
            assert isinstance(got, tuple) and len(got) == len(reference)
            assert all(_nan_same(g, r) <= TOL for g, r in zip(got, reference)), (key, case.variant)
        else:
            assert _nan_same(got, reference) <= TOL, (key, case.variant)


@pytest.mark.parametrize("key", NOT_SEPARABLE)
def test_mechanisms_needing_all_queries_refuse_query_shards(key):
    case = reflex.get(key).cases("tiny", 0)[0]
    with pytest.raises(ValueError, match="needs all queries"):
        rd.run(key, dict(case.inputs), client=object(), query_shards=2, **case.params)


def _fully_masked_rows(batch, heads, length, key_length):
    mask = random.normal((*batch, 1, length, key_length), seed=(7, 7)) > -0.3
    mask[..., 2, :] = False  # row 2: nothing to attend
    return mask


KV_CASES = [
    ("full", dict(causal="bottom_right"), dict(length=9, key_length=13)),
    ("full", dict(causal="top_left"), dict(length=13, key_length=9)),
    ("full", dict(mask="fully_masked"), dict(length=8, key_length=11)),
    ("full", dict(softcap=2.0, implementation="tiled"), dict(length=10, key_length=10)),
    ("sliding_window", dict(window=(3, 1)), dict(length=12, key_length=12)),
    ("sliding_window", dict(window=(2, 0)), dict(length=7, key_length=12)),
    ("sliding_window", dict(window=(2, 2), implementation="gather"), dict(length=12, key_length=12)),
    ("alibi", dict(), dict(length=11, key_length=11)),
    ("alibi", dict(causal="bottom_right"), dict(length=6, key_length=11)),
]


@pytest.mark.parametrize("key, params, shape", KV_CASES)
@pytest.mark.parametrize("query_shards, kv_blocks", [(1, 3), (2, 4), (3, 11)])
def test_kv_blocks_merge_to_single_process(client, key, params, shape, query_shards, kv_blocks):
    q, k, v = qkv_host(3, batch=(2,), heads=4, kv_heads=2, dim=5, value_dim=3, **shape)  # GQA 4/2
    params = dict(params)
    if params.get("mask") == "fully_masked":
        params["mask"] = _fully_masked_rows((2,), 4, shape["length"], shape["key_length"])
    function = reflex.get(key).function
    out, lse = function(q, k, v, return_lse=True, **params)
    got_out, got_lse = rd.run(key, dict(q=q, k=k, v=v), client=client, query_shards=query_shards,
                              kv_blocks=kv_blocks, return_lse=True, **params)
    assert not numpy.isnan(got_out).any() and not numpy.isnan(got_lse).any()
    assert max_abs(got_out, out) <= TOL
    assert max_abs(got_lse, lse) <= TOL
    if "mask" in params:
        assert numpy.all(got_out[..., 2, :] == 0) and numpy.all(got_lse[..., 2] == -math.inf)


def test_dropout_shards_like_the_whole_run(client):
    q, k, v = qkv_host(3, batch=(1,), length=9, key_length=11)
    keep = random.normal((1, 4, 9, 11), seed=(4, 4)) > -0.5
    params = dict(dropout_mask=keep, dropout_p=0.3, causal="bottom_right")
    reference = reflex.get("full").function(q, k, v, **params)
    got = rd.run("full", dict(q=q, k=k, v=v), client=client, query_shards=2, kv_blocks=3, **params)
    assert max_abs(got, reference) <= TOL


def test_kv_blocks_on_the_backend_matrix(client, backend):
    xp = backend.xp
    q, k, v = (backend.asarray(a) for a in qkv_host(5, length=6, key_length=10))
    reference = reflex.get("full").function(q, k, v, causal="bottom_right")
    got = rd.run("full", dict(q=q, k=k, v=v), client=client, query_shards=2, kv_blocks=3, causal="bottom_right")
    assert type(got) is type(reference)
    assert got.dtype == xp.float64
    assert max_abs(backend.to_numpy(got), backend.to_numpy(reference)) <= TOL


def test_empty_partials_merge_without_nan():
    xp = reflex.backends.numpy_namespace()
    out = numpy.full((1, 2, 3), numpy.nan)  # an empty partial's output may be anything
    lse = numpy.full((1, 2), -math.inf)
    real_out, real_lse = numpy.ones((1, 2, 3)), numpy.zeros((1, 2))
    merged, merged_lse = merge_partials(xp, [out, real_out, out], [lse, real_lse, lse])
    assert numpy.array_equal(merged, real_out) and numpy.array_equal(merged_lse, real_lse)
    merged, merged_lse = merge_partials(xp, [out, out], [lse, lse])
    assert numpy.all(merged == 0) and numpy.all(merged_lse == -math.inf)


def test_engine_window_keeps_absolute_positions():
    q, k, v = qkv_host(1, batch=(), heads=2, kv_heads=1, length=9, key_length=9)
    full = reflex.get("full").function
    out, lse = full(q, k, v, causal=True, return_lse=True)
    with window(rows=(4, 7), keys=(0, 5)):
        a = full(q, k, v, causal=True, return_lse=True)
    with window(rows=(4, 7), keys=(5, 9)):
        b = full(q, k, v, causal=True, return_lse=True)
    merged, merged_lse = merge_partials(numpy, [a[0], b[0]], [a[1], b[1]])
    assert a[0].shape == (2, 3, 3)
    assert numpy.all(b[1][:, 0] == -math.inf)  # row 4 sees no key in 5..8: an empty partial
    assert max_abs(merged, out[..., 4:7, :]) <= TOL and max_abs(merged_lse, lse[..., 4:7]) <= TOL


def test_kv_blocks_refuse_a_combined_output(client):
    q, k, v = qkv_host(2, batch=(1,), length=5, key_length=5)
    sinks = numpy.zeros(4)
    with pytest.raises(NotImplementedError, match="one engine call"):
        rd.run("full", dict(q=q, k=k, v=v), client=client, kv_blocks=2, sinks=sinks)
    with pytest.raises(NotImplementedError, match="one engine call"):
        rd.run("linear", dict(q=q, k=k, v=v), client=client, kv_blocks=2)


def test_bad_arguments():
    q, k, v = qkv_host(2, batch=(1,), length=5, key_length=5)
    with pytest.raises(ValueError, match="query_shards"):
        rd.run("full", dict(q=q, k=k, v=v), client=object(), query_shards=0)
    with pytest.raises(ValueError, match="kv_blocks"):
        rd.run("full", dict(q=q, k=k, v=v), client=object(), kv_blocks=True)
    with pytest.raises(TypeError, match="positional"):
        rd.run("full", dict(q=q, k=k), client=object())


def test_fixture_generation_on_dask_is_byte_identical(client, tmp_path):
    from reflex import fixtures

    serial, remote = tmp_path / "serial", tmp_path / "remote"
    keys = ["full", "sliding_window", "linear", "nystrom"]
    fixtures.generate(serial, keys, ["tiny"], 0)
    fixtures.generate(remote, keys, ["tiny"], 0, client=client)
    names = sorted(p.name for p in serial.iterdir())
    assert names == sorted(p.name for p in remote.iterdir()) and len(names) > 4
    for name in names:
        assert (serial / name).read_bytes() == (remote / name).read_bytes(), name


def test_fixture_cli_on_a_scheduler_address(client, tmp_path):
    from reflex.cli import main

    assert main(["fixtures", "generate", "--out", str(tmp_path / "a"), "--mechanisms", "alibi", "--sizes", "tiny",
                 "--quiet"]) == 0
    assert main(["fixtures", "generate", "--out", str(tmp_path / "b"), "--mechanisms", "alibi", "--sizes", "tiny",
                 "--quiet", "--dask", client.scheduler.address]) == 0
    for path in (tmp_path / "a").iterdir():
        assert path.read_bytes() == (tmp_path / "b" / path.name).read_bytes()


def test_run_cli_on_a_scheduler_address(client, capsys):
    from reflex.cli import main

    assert main(["run", "full", "--seq", "33", "--heads", "2", "--dim", "8", "--causal", "bottom_right",
                 "--dask", client.scheduler.address, "--kv-blocks", "3"]) == 0
    printed = capsys.readouterr().out
    assert "2 workers" in printed and "key/value blocks 3" in printed


@pytest.mark.slow
def test_a_worker_killed_mid_run_gives_the_same_bits_or_an_error():
    """A processes=True cluster; one worker process is killed while the tasks run. Dask reschedules its
    tasks on the surviving (or restarted) worker: the result has the same bits, or the run raises."""
    c = rd.local_client(2, processes=True)
    try:
        q, k, v = qkv_host(9, batch=(1,), heads=4, kv_heads=4, length=1024, key_length=1024, dim=32, value_dim=32)
        inputs, params = dict(q=q, k=k, v=v), dict(causal=True, implementation="dense")
        clean = rd.run("full", inputs, client=c, query_shards=16, kv_blocks=2, **params)
        pids = list(c.run(os.getpid).values())
        box: dict = {}

        def work():
            try:
                box["out"] = rd.run("full", inputs, client=c, query_shards=16, kv_blocks=2, **params)
            except Exception as err:  # noqa: BLE001 - any failure must surface as an error, not a result
                box["error"] = err

        thread = threading.Thread(target=work)
        thread.start()
        deadline = time.monotonic() + 20
        while not any(c.processing().values()) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert thread.is_alive(), "the run ended before a worker could be killed: make it longer"
        os.kill(pids[0], signal.SIGKILL)
        thread.join(120)
        assert not thread.is_alive()
        if "out" in box:
            assert numpy.array_equal(box["out"], clean)
        else:
            assert "error" in box and str(box["error"])
        single = reflex.get("full").function(q, k, v, **params)
        assert max_abs(clean, single) <= TOL
    finally:
        cluster = c.cluster
        c.close()
        cluster.close()

"""sliding_window agrees with the ONNX Attention operator's window attributes (opset 25, reference evaluator).

ONNX: a query at absolute position p = P + i (P = past length) attends key j iff
p − left_window_size ≤ j ≤ p + right_window_size; −1 leaves a side unbounded. With a past of
length P = S − L this is reflex's ``alignment="bottom_right"``; without one, ``"top_left"``.
The reference evaluator computes in the input dtype (float64 here), so agreement is to round-off —
as long as the ``scale`` attribute is left out: ONNX attributes are float32, and the reference takes
``sqrt(scale)`` in float32 (≈ 4e-8 relative), so these tests use the default scale 1/√D.
"""

from __future__ import annotations

import pytest

import reflex
from tests.helpers import max_abs, qkv_host

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

OPSET = 25


def _model(left: int, right: int, with_past: bool):
    schema = onnx.defs.get_schema("Attention", OPSET)
    if "left_window_size" not in schema.attributes:
        pytest.skip("this onnx has no Attention window attributes")
    names = ["Q", "K", "V", "", "past_key", "past_value"] if with_past else ["Q", "K", "V"]
    node = helper.make_node("Attention", names, ["Y"], left_window_size=left, right_window_size=right)
    inputs = [helper.make_tensor_value_info(n, TensorProto.DOUBLE, None) for n in names if n]
    graph = helper.make_graph([node], "window", inputs, [helper.make_tensor_value_info("Y", TensorProto.DOUBLE, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


@pytest.mark.parametrize("window", [(2, 1), (3, 0), (0, 0), (-1, 2), (4, -1), (-1, -1), (20, 20)])
def test_no_cache_is_top_left(window):
    q, k, v = qkv_host(1, length=9, key_length=9, heads=4, kv_heads=2, dim=5, value_dim=3)
    ref = ReferenceEvaluator(_model(*window, False)).run(None, {"Q": q, "K": k, "V": v})[0]
    ours = reflex.sliding_window_attention(q, k, v, window=window)
    assert max_abs(ours, ref) <= 1e-13


@pytest.mark.parametrize("window", [(2, 1), (3, 0), (0, 2), (-1, 0)])
def test_past_cache_is_bottom_right(window):
    # ONNX concatenates past_key/past_value in front of K/V: S = P + L_new keys, queries offset by P.
    q, k, v = qkv_host(2, length=5, key_length=12, heads=2, kv_heads=2, dim=5, value_dim=3)
    past = 12 - 5
    feeds = {"Q": q, "K": k[..., past:, :], "V": v[..., past:, :], "past_key": k[..., :past, :],
             "past_value": v[..., :past, :]}
    ref = ReferenceEvaluator(_model(*window, True)).run(None, feeds)[0]
    ours = reflex.sliding_window_attention(q, k, v, window=window, alignment="bottom_right")
    assert max_abs(ours, ref) <= 1e-13

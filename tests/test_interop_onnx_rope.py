"""apply_rope agrees with the ONNX ``RotaryEmbedding`` reference (opset 23), both ``interleaved`` values.

The ONNX operator takes cos/sin caches ``(max_position, r/2)`` and ``position_ids (B, L)``; the
caches here are built with the textbook θ_t = base^(−2t/r) on the host in float64.
"""

from __future__ import annotations

import numpy
import pytest

import reflex
from reflex import random

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402


def onnx_rotary(x, positions, *, base, rotary_dim, interleaved):
    max_position = int(positions.max()) + 1
    theta = 1.0 / base ** (2 * numpy.arange(rotary_dim // 2) / rotary_dim)  # Hugging Face inv_freq
    angles = numpy.arange(max_position, dtype=numpy.float64)[:, None] * theta
    node = helper.make_node("RotaryEmbedding", ["X", "cos", "sin", "pos"], ["Y"], interleaved=int(interleaved),
                            rotary_embedding_dim=rotary_dim)
    graph = helper.make_graph(
        [node], "rope",
        [helper.make_tensor_value_info("X", TensorProto.DOUBLE, list(x.shape)),
         helper.make_tensor_value_info("cos", TensorProto.DOUBLE, list(angles.shape)),
         helper.make_tensor_value_info("sin", TensorProto.DOUBLE, list(angles.shape)),
         helper.make_tensor_value_info("pos", TensorProto.INT64, list(positions.shape))],
        [helper.make_tensor_value_info("Y", TensorProto.DOUBLE, list(x.shape))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    (y,) = ReferenceEvaluator(model).run(None, {"X": x, "cos": numpy.cos(angles), "sin": numpy.sin(angles), "pos": positions})
    return y


@pytest.mark.parametrize("interleaved", [0, 1])
@pytest.mark.parametrize("rotary_dim", [8, 4])
def test_matches_onnx_rotary_embedding(backend, interleaved, rotary_dim):
    x = random.normal((2, 3, 6, 8), seed=interleaved * 10 + rotary_dim)  # (B, H, L, D)
    positions = random.integers((2, 6), seed=rotary_dim, low=0, high=4096)  # (B, L)
    ref = onnx_rotary(x, positions, base=10000.0, rotary_dim=rotary_dim, interleaved=interleaved)
    got = reflex.apply_rope(backend.asarray(x), positions=backend.asarray(positions[:, None, :]), rotary_dim=rotary_dim,
                            convention="interleaved" if interleaved else "half")
    diff = numpy.max(numpy.abs(backend.to_numpy(got) - ref))
    assert diff < 1e-15, diff

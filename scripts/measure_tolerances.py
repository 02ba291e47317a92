#!/usr/bin/env python3
"""Measure the errors behind the ``tf32`` and float8 rows of ``reflex.testing.TOLERANCES``.

    python scripts/measure_tolerances.py [--sizes tiny,small,medium,large]

For every registered ``full`` case (MHA, GQA, both causal alignments, mask, bias, softcap; not sinks or
the blhd layout, which these kernels do not implement) at the
given sizes, torch 2.x on the CPU computes attention the way a GPU kernel in that format does, from
the case's float64 inputs, and the script prints the error against reflex's float64 output on the
float64 inputs — the comparison a fixture consumer makes — as the smallest ``tol`` with
``|err| ≤ tol + tol·|ref|`` element-wise:

- ``tf32``: torch's CPU matmuls have no TF32 mode on this hardware, so TF32 tensor-core matmuls are
  emulated: q, k (for QKᵀ) and P, v (for PV) are rounded to TF32 (10 mantissa bits, round to
  nearest even) and multiplied and accumulated in float32; softmax, scale, softcap and bias in
  float32 (the FlashAttention-2 data flow with ``allow_tf32``).
- ``float8_e4m3fn`` / ``float8_e5m2``: q, k, v cast to the format (``Tensor.to``, round to
  nearest); QKᵀ by ``torch._scaled_mm`` (float8 operands, float32 accumulation, unit scales);
  softmax in float32; P cast to the format and PV by ``torch._scaled_mm`` (FlashAttention-3's FP8
  forward), output float32.

It also prints, per format, the FlashAttention-rule ratio ``max|kernel − oracle| / max|naive −
oracle|`` with reflex's naive baseline for that format (``reflex.testing``) on the inputs the kernel
received, the largest over the cases, and the largest ``error / bound`` of the rule as
:func:`reflex.testing.assert_matches_oracle` applies it (factor 2, 3 with softcap, plus the
rounding floor; ≤ 1 passes).

Measured (torch 2.13 CPU, tiny to large): tol needed 7.8e-4 / 0.11 / 0.28, ratio 1.72 / 2.63 /
1.56, error/bound 0.45 / 0.49 / 0.37 for tf32 / float8_e4m3fn / float8_e5m2.
"""

from __future__ import annotations

import argparse
import sys

import numpy
import torch

import reflex
from reflex import testing

FORMATS = {"tf32": None, "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}


def round_tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 → the nearest TF32 value (10 mantissa bits, ties to even), still stored as float32."""
    bits = x.float().contiguous().view(torch.int32)
    rounded = (bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF
    return torch.where(torch.isfinite(x.float()), rounded.view(torch.float32), x.float())


def _matmul(a: torch.Tensor, b: torch.Tensor, fmt: str) -> torch.Tensor:
    """a @ b over the leading axes, operands in ``fmt``, accumulation float32."""
    if fmt == "tf32":
        return round_tf32(a) @ round_tf32(b)
    dtype = FORMATS[fmt]
    one = torch.tensor(1.0)
    a8, b8 = a.to(dtype), b.to(dtype)
    flat_a, flat_b = a8.reshape(-1, *a8.shape[-2:]), b8.reshape(-1, *b8.shape[-2:])
    out = [torch._scaled_mm(x.contiguous(), y.t().contiguous().t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
           for x, y in zip(flat_a, flat_b)]
    return torch.stack(out).reshape(*a.shape[:-1], b.shape[-1])


def kernel(inputs: dict, params: dict, fmt: str) -> numpy.ndarray:
    """Attention as a ``fmt`` kernel computes it (see the module docstring)."""
    q, k, v = (torch.from_numpy(inputs[n]).float() for n in "qkv")
    if fmt != "tf32":  # the kernel receives float8 tensors
        q, k, v = (x.to(FORMATS[fmt]).float() for x in (q, k, v))
    group = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    scale = params.get("scale", 1.0 / q.shape[-1] ** 0.5)
    scores = _matmul(q, k.transpose(-1, -2), fmt) * scale
    if params.get("softcap"):
        scores = params["softcap"] * torch.tanh(scores / params["softcap"])
    if "bias" in inputs:
        scores = scores + torch.from_numpy(inputs["bias"]).float()
    length, key_length = scores.shape[-2:]
    allowed = torch.ones(length, key_length, dtype=torch.bool)
    if "mask" in inputs:
        allowed = allowed & torch.from_numpy(inputs["mask"])
    causal = params.get("causal", False)
    if causal:
        offset = key_length - length if causal == "bottom_right" else 0
        allowed = allowed & (torch.arange(key_length)[None, :] <= torch.arange(length)[:, None] + offset)
    scores = scores.masked_fill(~allowed, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    weights = torch.exp(scores - torch.where(torch.isfinite(row_max), row_max, 0))
    total = weights.sum(dim=-1, keepdim=True)
    probabilities = weights / torch.where(total > 0, total, 1)
    return _matmul(probabilities, v, fmt).double().numpy()


def supported(case: reflex.Case) -> bool:
    """Whether :func:`kernel` implements this case of ``full`` (not sinks, not the blhd layout)."""
    return set(case.inputs) <= {"q", "k", "v", "mask", "bias"} and set(case.params) <= {"causal", "scale", "softcap"}


def received(inputs: dict, fmt: str) -> dict:
    """The inputs as the kernel received them (float32 for tf32, the float8 values otherwise), in float64."""
    out = {}
    for name, a in inputs.items():
        if name in "qkv" and a.dtype.kind == "f":
            t = torch.from_numpy(a).float()
            out[name] = (t if fmt == "tf32" else t.to(FORMATS[fmt])).double().numpy()
        else:
            out[name] = a
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,small,medium,large")
    args = parser.parse_args(argv)
    mechanism = reflex.get("full")
    print(f"torch {torch.__version__}, reflex {reflex.__version__}; cases of 'full' at {args.sizes}")
    print(f"{'format':<15}{'tol needed (max over cases)':>30}{'worst case':>28}{'FA-rule ratio (max)':>22}"
          f"{'error/bound (max)':>20}")
    for fmt in FORMATS:
        worst, worst_case, ratio, used = 0.0, "", 0.0, 0.0
        for size in args.sizes.split(","):
            for case in filter(supported, mechanism.cases(size, 0)):
                inputs, params = dict(case.inputs), dict(case.params)
                got = kernel(inputs, params, fmt)
                expected = numpy.asarray(reflex.full_attention(inputs["q"], inputs["k"], inputs["v"], **params,
                                                               **{n: a for n, a in inputs.items() if n not in "qkv"}))
                need = float(numpy.max(numpy.abs(got - expected) / (1 + numpy.abs(expected))))
                if need > worst:
                    worst, worst_case = need, f"{case.variant}/{size}"
                rule = testing.assert_matches_oracle(got, "full", received(inputs, fmt), params=params, dtype=fmt,
                                                     factor=float("inf"))
                ratio = max(ratio, rule.ratio)
                try:  # the rule as users get it: factor 2 (3 with softcap) and the rounding floor
                    rule = testing.assert_matches_oracle(got, "full", received(inputs, fmt), params=params, dtype=fmt)
                    used = max(used, rule.error / rule.bound)
                except AssertionError:
                    used = float("inf")
        print(f"{fmt:<15}{worst:>30.3e}{worst_case:>28}{ratio:>22.3g}{used:>20.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

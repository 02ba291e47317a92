#!/usr/bin/env python3
"""The torch consumer with a deliberate bug — GQA heads tiled instead of interleaved — which the fixtures catch.

    python examples/torch_consumer_broken.py fixtures --export broken_outputs.npz   # exits 1

Query head h should use kv head h // (H/G) (``repeat_interleave``); ``repeat`` tiles the heads so
head h uses kv head h % G. Cases with G = H pass; every GQA case fails, and
``reflex fixtures check`` names each one with its max error and worst element.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch_consumer  # noqa: E402


def tiled_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    """The bug: (..., G, S, D) → (..., G·group, S, D) by tiling, so query head h uses kv head h % G."""
    return x.repeat(*([1] * (x.ndim - 3)), group, 1, 1)


if __name__ == "__main__":
    raise SystemExit(torch_consumer.main(expand=tiled_kv))
